"""The eval report: trends along each eta axis, the full table, heatmaps and line plots (PNG),
the eta = 0 check, merged models, and vector diagnostics, as `<out>/report.md`.

Plots use matplotlib's Agg backend (no display); without matplotlib the report is written
without them and says so.
"""

from __future__ import annotations

import math
from pathlib import Path

from prefvec_ds.atomic import write_text_atomic
from prefvec_ds.eval.grid import axis_line, label, trend
from prefvec_ds.eval.sweep import axes_of, scores_table

RATE_HINT = {"helpful": "benign prompts answered correctly",
             "harmless": "harmful prompts refused",
             "over_refusal": "benign prompts refused",
             "verbosity": "words per answer"}


def axis_lines(summary: dict, rest: float) -> dict[str, list[int]]:
    """preference -> indices of its line (the other etas at 0, else at `rest`)."""
    points = [row["eta"] for row in summary["points"]]
    out = {}
    for pref in summary["preferences"]:
        line = axis_line(points, pref, 0.0)
        if len(line) < 2 and rest != 0.0:
            line = axis_line(points, pref, rest)
        if len(line) >= 2:
            out[pref] = line
    return out


def trends(summary: dict, rest: float = 0.0) -> dict[str, dict[str, dict]]:
    """preference -> column -> {etas, values, trend}: what moving one eta does to each score."""
    table = scores_table(summary)
    points = [row["eta"] for row in summary["points"]]
    out: dict[str, dict[str, dict]] = {}
    for pref, line in axis_lines(summary, rest).items():
        out[pref] = {}
        for col in axes_of(summary):
            values = [table[i].get(col) for i in line]
            out[pref][col] = {"etas": [points[i][pref] for i in line], "values": values,
                              "trend": trend(values, tol=1e-9)}
    return out


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def _trend_section(summary: dict, tr: dict) -> list[str]:
    lines = ["## Trends along each eta (the other etas at 0)", ""]
    for pref, cols in tr.items():
        etas = next(iter(cols.values()))["etas"]
        header = ["column", *[f"eta_{pref}={e:+g}" for e in etas], "trend"]
        rows = [[f"{c} ({RATE_HINT[c]})" if c in RATE_HINT else c, *d["values"], d["trend"]]
                for c, d in cols.items()]
        lines += [f"### eta_{pref}", "", *_md_table(header, rows), ""]
    return lines


def _zero_section(summary: dict) -> list[str]:
    base = summary["base"]
    zero = next(r for r in summary["points"] if not any(r["eta"].values()))
    d = summary["drift"]
    cols = [c for c in base["scores"] if not c.startswith("n_")]
    lines = ["## eta = 0 reproduces theta_base", "",
             f"theta_base was scored on the fresh load, the all-zero point after {d['cycles']} "
             f"apply/remove cycles on the same model: {d['zero_point_same_answers']} of "
             f"{d['prompts']} prompts got identical answers; the largest parameter difference "
             f"from the files on disk is {d['max_abs_param_diff']:.3g}.", ""]
    lines += _md_table(["model", *cols], [["theta_base", *[base["scores"][c] for c in cols]],
                                          ["eta = 0", *[zero["scores"][c] for c in cols]]])
    return lines + [""]


def _table_section(summary: dict) -> list[str]:
    table = scores_table(summary)
    header = list(table[0])
    lines = ["## Every point", "", f"{len(table)} points; rates are over all sampled answers, "
             "margins are mean log p(chosen) - log p(rejected) of held-out pairs, acc the share "
             "of pairs with a positive margin.", ""]
    return lines + _md_table(header, [[row.get(c) for c in header] for row in table]) + [""]


def _models_section(summary: dict) -> list[str]:
    if not summary["models"]:
        return []
    cols = [c for c in summary["base"]["scores"] if not c.startswith("n_")]
    rows = []
    for name, row in summary["models"].items():
        eta = summary.get("merge_etas", {}).get(name, {})
        rows.append([f"{name} ({label(eta)})" if eta else name,
                     *[row["scores"][c] for c in cols],
                     *[m["margin"] for m in row["margins"].values()]])
    margins = [f"margin_{p}" for p in next(iter(summary["models"].values()))["margins"]]
    return ["## Merged and baseline models (folders scored as written)", "",
            *_md_table(["model", *cols, *margins], rows), ""]


def _diag_section(diag: dict | None) -> list[str]:
    if not diag:
        return []
    lines = ["## Vector diagnostics", ""]
    lines += _md_table(["vector", "L2 norm"], [[k, v] for k, v in diag["norms"].items()])
    prefs = list(diag["cosine"])
    lines += ["", "Cosine between preference vectors (paper: cos(helpful, harmless) "
              "~0.34-0.40):", ""]
    lines += _md_table(["", *prefs], [[a, *[diag["cosine"][a][b] for b in prefs]]
                                      for a in prefs])
    if diag.get("cross_seed_cosine"):
        lines += ["", "Cross-seed cosine (the same preference, DPO trained with another seed; "
                  "paper: 0.998-0.999):", ""]
        lines += _md_table(["preference", "seed", "cosine"],
                           [[p, s, c] for p, by in diag["cross_seed_cosine"].items()
                            for s, c in by.items()])
    if "sti" in diag:
        s = diag["sti"]
        lines += ["", f"Subspace Task Interference (rank-{s['rank']} SVD over the "
                  f"{s['matrices']} largest-norm matrices, summed over {s['pairs']} pair(s)): "
                  f"**{s['sti']:.3f}**; random subspaces of these matrices would give "
                  f"{s['sti_chance']:.3f} (paper: 0.41 for 2 preferences, 2.33 for 4, on 8B "
                  "models where chance is ~0.016 per pair)."]
    return lines + [""]


def _interference_section(inter: dict | None) -> list[str]:
    """Per merge method: the vectors' cosines and STI as the method uses them, kept share,
    and the composition's scores."""
    if not inter:
        return []
    methods = inter["methods"]
    first = next(iter(methods.values()))
    prefs = list(first["cosine"])
    pairs = [(a, b) for i, a in enumerate(prefs) for b in prefs[i + 1:]]
    cols = [c for c in first.get("scores", {}) if not c.startswith("n_")]
    header = ["method", "density", *[f"cos({a},{b})" for a, b in pairs], "STI",
              *[f"kept {p}" for p in prefs], *cols]
    rows = [[m, r["density"], *[r["cosine"][a][b] for a, b in pairs], r["sti"],
             *[r["kept"][p] for p in prefs], *[r.get("scores", {}).get(c) for c in cols]]
            for m, r in methods.items()]
    return ["## Interference by merge method", "",
            f"The vectors as each method uses them (trimmed or dropped, sign-elected) at the "
            f"merge etas {label(inter['etas'])}: pairwise cosines, STI (same matrices for every "
            "method), the share of each vector's nonzero elements kept, and the scores of the "
            "merge by that method (written and scored like the merged models). Lower "
            "cosine/STI with scores held is trimming reducing the alignment tax.", "", *_md_table(header, rows), ""]


def write_report(summary: dict, diag: dict | None, out_dir: Path, title: str = "",
                 interference: dict | None = None) -> Path:
    """report.md (and its PNGs) in out_dir; returns the report's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tr = trends(summary)
    pngs, note = plot_all(summary, tr, out_dir)
    g = summary["generation"]
    decoding = (f"sampled (T={g['temperature']}, top_p={g['top_p']}, {g['num_samples']} per "
                f"prompt, seed {g['seed']})" if g["do_sample"] else "greedy")
    lines = [f"# Eta sweep{': ' + title if title else ''}", "",
             f"theta_base `{summary['base_model']}`; vectors "
             + ", ".join(f"`{p}` = `{v}`" for p, v in summary["vectors"].items()) + ".",
             f"{summary['prompts']} held-out prompts, {decoding}, up to {g['max_new_tokens']} "
             f"new tokens; scorers: {', '.join(summary['scorers'])}; held-out margin pairs: "
             + (", ".join(f"{p} {n}" for p, n in summary["margin_pairs"].items()) or "none")
             + f". Sweep time {summary['seconds']} s.", ""]
    lines += [f"![{p.stem}]({p.name})" for p in pngs] + ([note, ""] if note else [""])
    lines += _trend_section(summary, tr) + _zero_section(summary) + _models_section(summary)
    lines += _diag_section(diag) + _interference_section(interference) + _table_section(summary)
    path = out_dir / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: PLC0415
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def plot_all(summary: dict, tr: dict, out_dir: Path) -> tuple[list[Path], str]:
    """Line plots along each eta and heatmaps of every 2-D grid; ([paths], note)."""
    plt = pyplot()
    if plt is None:
        return [], "(plots skipped: matplotlib is not installed; `pip install matplotlib`)"
    paths = []
    if tr:
        paths.append(plot_lines(plt, tr, out_dir / "lines.png"))
    for a, b, grid in grids_2d(summary):
        paths.append(plot_heatmaps(plt, summary, a, b, grid, out_dir / f"heatmap_{a}_{b}.png"))
    return paths, ""


def _panels(columns: list[str]) -> list[tuple[str, list[str]]]:
    """Group columns into panels: the rule rates of the answers, held-out margins, held-out
    accuracies, then every other column (verbosity, reward, cost) alone."""
    groups = [("answers: rates", [c for c in columns if c in ("helpful", "harmless",
                                                              "over_refusal")]),
              ("held-out log-prob margin", [c for c in columns if c.startswith("margin_")]),
              ("held-out margin > 0", [c for c in columns if c.startswith("acc_")])]
    grouped = {c for _, cols in groups for c in cols}
    return [g for g in groups if g[1]] + [(c, [c]) for c in columns if c not in grouped]


def plot_lines(plt, tr: dict, path: Path) -> Path:
    """Rows: preferences; columns: panels of related scores; x: that preference's eta."""
    prefs = list(tr)
    panels = _panels(list(next(iter(tr.values()))))
    fig, axes = plt.subplots(len(prefs), len(panels), squeeze=False,
                             figsize=(4.2 * len(panels), 3.2 * len(prefs)))
    for r, pref in enumerate(prefs):
        for c, (title, cols) in enumerate(panels):
            ax = axes[r][c]
            for col in cols:
                d = tr[pref][col]
                ax.plot(d["etas"], [math.nan if v is None else v for v in d["values"]],
                        marker="o", label=col)
            ax.axvline(0.0, color="grey", lw=0.6, ls=":")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(f"eta_{pref} (others 0)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def grids_2d(summary: dict) -> list[tuple[str, str, dict]]:
    """(a, b, {(eta_a, eta_b): point index}) for every pair of preferences whose full 2-D grid
    (the others at one common value) is among the points."""
    points = [row["eta"] for row in summary["points"]]
    prefs = summary["preferences"]
    out = []
    for i, a in enumerate(prefs):
        for b in prefs[i + 1:]:
            others = [p for p in prefs if p not in (a, b)]
            best: dict = {}
            for rest in sorted({pt[o] for pt in points for o in others} or {0.0}):
                grid = {(pt[a], pt[b]): k for k, pt in enumerate(points)
                        if all(pt[o] == rest for o in others)}
                if len(grid) > len(best):
                    best = grid
            ea = {x for x, _ in best}
            eb = {y for _, y in best}
            if len(ea) >= 2 and len(eb) >= 2 and len(best) == len(ea) * len(eb):
                out.append((a, b, best))
    return out


def plot_heatmaps(plt, summary: dict, a: str, b: str, grid: dict, path: Path) -> Path:
    """One heatmap per column over (eta_a, eta_b), values written in the cells."""
    table = scores_table(summary)
    cols = [c for c in axes_of(summary) if not c.startswith("acc_")]
    ea = sorted({x for x, _ in grid})
    eb = sorted({y for _, y in grid})
    ncol = min(4, len(cols))
    nrow = math.ceil(len(cols) / ncol)
    fig, axes = plt.subplots(nrow, ncol, squeeze=False, figsize=(3.6 * ncol, 3.2 * nrow))
    for k, col in enumerate(cols):
        ax = axes[k // ncol][k % ncol]
        values = [[table[grid[(x, y)]].get(col) for x in ea] for y in eb]
        data = [[math.nan if v is None else v for v in row] for row in values]
        im = ax.imshow(data, origin="lower", cmap="viridis", aspect="auto")
        finite = [v for row in data for v in row if not math.isnan(v)] or [0.0]
        lo, hi = min(finite), max(finite)
        for yi, row in enumerate(data):
            for xi, v in enumerate(row):
                if not math.isnan(v):  # dark text on the bright (yellow) end of viridis
                    bright = hi > lo and (v - lo) / (hi - lo) > 0.6
                    ax.text(xi, yi, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if bright else "white")
        ax.set_xticks(range(len(ea)), [f"{x:g}" for x in ea])
        ax.set_yticks(range(len(eb)), [f"{y:g}" for y in eb])
        ax.set_xlabel(f"eta_{a}")
        ax.set_ylabel(f"eta_{b}")
        ax.set_title(col, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046)
    for k in range(len(cols), nrow * ncol):
        axes[k // ncol][k % ncol].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
