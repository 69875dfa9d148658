"""One table of Preference Vectors against theta_base and the baselines of a run, with the
training cost of each system, and a helpful-vs-harmless scatter (`prefvec compare RUN`; the eval
stage writes it as <run_dir>/eval/comparison.{md,json,png} when pipeline.baselines is set).

Rows: theta_base; each merge of pipeline.merges (PV at its etas); PV at the sweep point the run
would pick (the best mean rank over the helpful and harmless score columns, ties to the smaller
|eta|); each baseline. Columns: every score of the eval (rates over sampled answers), the held-out
log-prob margins, then cost: wall time and rank-hours summed over the stages the system needs
(from their manifests), and the peak resident memory of any rank (from their done.json).
"""

from __future__ import annotations

import json
from pathlib import Path

from prefvec_ds import PrefvecError
from prefvec_ds.atomic import write_json_atomic, write_text_atomic
from prefvec_ds.config.layout import RunLayout, merge_etas
from prefvec_ds.config.schema import RunConfig
from prefvec_ds.pipeline import manifest
from prefvec_ds.pipeline.baselines import BASELINES, soup_etas
from prefvec_ds.pipeline.dag import Stage


def _label(eta: dict[str, float]) -> str:
    return ", ".join(f"{p} {v:g}" for p, v in eta.items())


def sweep_choice(sweep: dict, columns: list[str]) -> dict:
    """The sweep point with the best mean rank over `columns` (higher is better)."""
    points = sweep["points"]
    ranks = [0.0] * len(points)
    for col in columns:  # rank = how many points score strictly better (ties share a rank)
        values = [p["scores"].get(col) or 0.0 for p in points]
        for i, v in enumerate(values):
            ranks[i] += sum(w > v for w in values)
    best = min(range(len(points)), key=lambda i: (ranks[i], sum(abs(e) for e in
                                                               points[i]["eta"].values())))
    return points[best]


def _needs(cfg: RunConfig, stages: list[Stage], system: str) -> list[Stage]:
    """The stages whose cost a system carries (theta_base's own SFT is shared by all)."""
    if system.startswith("baseline/"):
        name = system.split("/", 1)[1]
        names = {f"ref_logps/{p}" for p in cfg.pipeline.baseline_roles.values()} | {system}
        if BASELINES[name].kind == "baseline_merge":
            names |= {f"dpo/{p}+" for p in soup_etas(cfg, name)}
    else:  # "pv" (the sweep's choice) or "merge/<name>": the vectors, plus that merge
        names = ({f"ref_logps/{p}" for p in cfg.data.preferences}
                 | {f"dpo/{d}" for d in cfg.directions()}
                 | {f"vectors/{p}" for p in cfg.data.preferences}
                 | ({system} if system.startswith("merge/") else set()))
    return [s for s in stages if s.name in names]


def cost(run_dir: Path, stages: list[Stage], world: int) -> dict:
    wall = rank_s = 0.0
    peak = None
    for stage in stages:
        record = manifest.read(run_dir, stage.name) or {}
        wall += record.get("wall_s") or 0.0
        rank_s += (record.get("wall_s") or 0.0) * (world if stage.distributed else 1)
        done = run_dir / stage.done_file
        if done.suffix == ".json" and done.is_file():
            rss = json.loads(done.read_text()).get("peak_rss_mb_per_rank") or []
            if rss:
                peak = max(peak or 0.0, max(rss))
    return {"wall_s": round(wall, 1), "rank_hours": round(rank_s / 3600, 4),
            "peak_rss_mb": round(peak, 1) if peak else None}


def comparison(cfg: RunConfig, stages: list[Stage]) -> dict:
    """Rows of the table (see the module docstring) from eval/sweep.json and the manifests."""
    lay = RunLayout.of(cfg)
    path = lay.eval / "sweep.json"
    if not path.is_file():
        raise PrefvecError(f"{path}: no eval results yet (run the eval stage, or `prefvec sweep "
                           f"{lay.root}`)")
    sweep = json.loads(path.read_text())
    world = cfg.distributed.nproc_per_node * cfg.distributed.nnodes
    columns = [c for c in sweep["base"]["scores"] if not c.startswith("n_")]
    roles = list(cfg.pipeline.eval.headline)
    unknown = [c for c in roles if c not in columns]
    if unknown:
        raise PrefvecError(f"config parameter pipeline.eval.headline: {unknown[0]!r} is not a "
                           f"score column of {path}; its columns: {', '.join(columns)}")
    roles = roles or [c for c in cfg.pipeline.baseline_roles if c in columns] or columns[:2]
    chosen = sweep_choice(sweep, roles)

    def row(system: str, scored: dict, needs: str | None, eta=None) -> dict:
        out = {"system": system, "eta": eta,
               **{c: scored["scores"].get(c) for c in columns},
               **{f"margin_{p}": m["margin"] for p, m in scored["margins"].items()}}
        if needs:
            out.update(cost(lay.root, _needs(cfg, stages, needs), world))
        return out

    rows = [row("theta_base", sweep["base"], None)]
    for name, eta in merge_etas(cfg).items():
        if name in sweep["models"]:
            rows.append(row(f"PV {name} ({_label(eta)})", sweep["models"][name],
                            f"merge/{name}", eta))
    rows.append(row(f"PV sweep choice ({_label(chosen['eta'])})", chosen, "pv", chosen["eta"]))
    for name in cfg.pipeline.baselines:
        if name in sweep["models"]:
            rows.append(row(name, sweep["models"][name], f"baseline/{name}"))
    grid = [{"eta": p["eta"], **{c: p["scores"].get(c) for c in roles}} for p in sweep["points"]]
    return {"columns": columns, "axes": roles, "rows": rows, "grid": grid,
            "chosen_by": f"best mean rank over {', '.join(roles)}"}


def markdown(table: dict) -> str:
    keys: list[str] = []
    for r in table["rows"]:  # theta_base has no cost columns: the union, in first-seen order
        keys += [k for k in r if k not in keys and k not in ("system", "eta")]
    lines = ["| system | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in table["rows"]:
        cells = [r.get(k) for k in keys]
        lines.append(f"| {r['system']} | " + " | ".join(
            "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
            for v in cells) + " |")
    return "\n".join(lines)


def plot(table: dict, path: Path) -> Path | None:
    """Scatter of the two axes: one point per system, the sweep grid as a grey line (etas
    equal along the diagonal) and dots. None when matplotlib is missing."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    x, y = table["axes"][:2] if len(table["axes"]) > 1 else (table["axes"][0],) * 2
    fig, ax = plt.subplots(figsize=(6, 5))
    grid = table["grid"]
    ax.scatter([g[x] for g in grid], [g[y] for g in grid], s=8, c="0.75", label="PV sweep grid")
    diag = sorted((g for g in grid if len(set(g["eta"].values())) == 1),
                  key=lambda g: next(iter(g["eta"].values())))
    ax.plot([g[x] for g in diag], [g[y] for g in diag], c="0.6", lw=1)
    for r in table["rows"]:
        ax.scatter([r[x]], [r[y]], s=40)
        ax.annotate(r["system"], (r[x], r[y]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title("Preference Vectors against the baselines")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_comparison(cfg: RunConfig, stages: list[Stage]) -> Path:
    """eval/comparison.{json,md,png}; returns the markdown's path."""
    table = comparison(cfg, stages)
    out = RunLayout.of(cfg).eval
    write_json_atomic(out / "comparison.json", table)
    png = plot(table, out / "comparison.png")
    text = ["# Preference Vectors against the baselines", "",
            f"PV sweep choice: {table['chosen_by']}. Cost: wall time and rank-hours summed "
            "over the stages each system needs (theta_base's SFT, shared by all, excluded); "
            "peak RSS of any rank.", "", markdown(table), ""]
    if png:
        text += [f"![comparison]({png.name})", ""]
    path = out / "comparison.md"
    write_text_atomic(path, "\n".join(text))
    return path
