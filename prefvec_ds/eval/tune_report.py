"""tune.md: what `prefvec tune-eta` chose, the confirmed points with bootstrap intervals, the
Pareto front, the surrogate's best points, and the evaluations spent against the full grid."""

from __future__ import annotations

from pathlib import Path

from prefvec_ds.atomic import write_text_atomic
from prefvec_ds.eval.grid import label


def _ci(ci: dict) -> str:
    if ci["mean"] is None:
        return "-"
    if ci["lo"] is None:
        return f"{ci['mean']:.3f}"
    return f"{ci['mean']:.3f} [{ci['lo']:.3f}, {ci['hi']:.3f}]"


def _constraint_text(c: dict) -> str:
    return (f"{c['score']} {c['op']} {c['bound']:.3f}: {c['value']:.3f} "
            f"({'met' if c['met'] else 'not met'})")


def _chosen_section(r: dict) -> list[str]:
    ch, cfg = r["chosen"], r["config"]
    obj = cfg["objective"]
    if ch["met"]:
        head = f"**Chosen: {label(ch['eta'])}** ({obj} = {_ci(ch['ci'][obj])})."
    else:
        head = (f"**No confirmed point met every constraint.** Closest: {label(ch['eta'])} "
                f"(total shortfall {ch['shortfall']:.3f}); no merged model was written.")
    lines = [head, ""] + [f"- {_constraint_text(c)}" for c in ch["constraints"]]
    if r.get("merged"):
        lines += ["", f"Written as `{r['merged']}` (theta_base + sum eta * phi)."]
    return lines + [""]


def _confirmed_section(r: dict) -> list[str]:
    cols = r["front_axes"]
    conf = r["config"]
    lines = ["## Confirmed points (generated answers)", "",
             f"Mean scores over {r['prompts']} prompts with {conf['confidence']:.0%} bootstrap "
             f"intervals ({conf['bootstrap']} resamples of the prompts).", "",
             "| eta | " + " | ".join(cols) + " | constraints met | surrogate objective |",
             "|" + "---|" * (len(cols) + 3)]
    for row in [r["base"] | {"label": "theta_base"}] + r["confirmed"]:
        met = (f"{sum(c['met'] for c in row['constraints'])}/{len(row['constraints'])}"
               if "constraints" in row else "(reference)")
        sur = f"{row['surrogate']['objective']:.3f}" if "surrogate" in row else "-"
        name = row.get("label") or label(row["eta"])
        lines.append(f"| {name} | " + " | ".join(_ci(row["ci"][c]) for c in cols)
                     + f" | {met} | {sur} |")
    return lines + [""]


def _front_section(r: dict) -> list[str]:
    lines = ["## Pareto front of the evaluated points", ""]
    for p in r["pareto_front"]:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in p["scores"].items()
                          if k in r["front_axes"] and v is not None)
        lines.append(f"- {label(p['eta'])}: {shown}")
    return lines + [""]


def _search_section(r: dict, shown: int = 10) -> list[str]:
    rows = sorted(r["search"], key=lambda s: (not s["surrogate"]["feasible"],
                                              -s["surrogate"]["objective"]))[:shown]
    prefs = r["preferences"]
    lines = [f"## Search by held-out margins ({len(r['search'])} points, best {len(rows)})", "",
             "| eta | " + " | ".join(f"margin_{p}" for p in prefs)
             + " | surrogate objective | surrogate-feasible |", "|" + "---|" * (len(prefs) + 3)]
    for s in rows:
        lines.append(f"| {label(s['eta'])} | " + " | ".join(f"{s['margins'][p]:.3f}"
                                                           for p in prefs)
                     + f" | {s['surrogate']['objective']:.3f} | {s['surrogate']['feasible']} |")
    return lines + [""]


def write_tune_report(r: dict, out_dir: Path) -> Path:
    """tune.md in out_dir; returns its path."""
    cfg, n = r["config"], r["counts"]
    axes = [cfg["objective"]] + [c["score"] for c in cfg["constraints"]]
    r = {**r, "front_axes": list(dict.fromkeys(axes))}
    cons = "; ".join(f"{c['score']} {c['op']} " + ("base + " if c["relative_to"] == "base"
                                                    else "") + f"{c['value']:g}"
                     for c in cfg["constraints"]) or "none"
    lines = ["# Eta tuned under constraints", "",
             f"Maximise **{cfg['objective']}** subject to: {cons}.", "",
             *_chosen_section(r),
             "## Evaluations spent", "",
             f"{n['margin_passes']} margin passes (held-out pairs: "
             + ", ".join(f"{p} {k}" for p, k in r["margin_pairs"].items())
             + f") and **{n['generation_passes']} generation passes** ({r['prompts']} prompts "
             f"each); the full grid of the same resolution ({n['grid']['points']} points) "
             f"would answer and score all {n['grid']['generation_passes']} "
             f"(and measure their margins). Time {r['seconds']} s.", "",
             *_confirmed_section(r), *_front_section(r), *_search_section(r)]
    path = out_dir / "tune.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
