"""Figures of a MORA run (matplotlib, imported only here; absent -> no figures, a note):
- `mining_<dim>.png`: per category (helpful-only, safety prompts), the histogram of the best
  score on <dim> among the first n answers, one outline per n;
- `mining_pass_rate.png`: share of prompts whose first n answers reach `high` on each dimension
  (e.g. the safety pass rate), per category, against n;
- `ceiling.png`: max combined reward at Pass@n on the targets, original vs rewritten: the
  distributions at the largest common n, and the means against n.
"""

from __future__ import annotations

from pathlib import Path

from prefvec_ds.eval.report import pyplot as _pyplot


def _expand(hist: dict[str, int]) -> list[float]:
    return [float(v) for v, c in hist.items() for _ in range(c)]


def plot_mining(plt, summary: dict, dims: list[str], folder: Path) -> list[str]:
    mining = summary["mining"]
    cats = list(mining)
    written = []
    for dim in dims:
        fig, axes = plt.subplots(1, len(cats), figsize=(4.5 * len(cats), 3.4), squeeze=False)
        for ax, cat in zip(axes[0], cats):
            at_n = mining[cat]["at_n"]
            values = [float(v) for row in at_n.values() for v in row[dim]["hist"]]
            lo, hi = min(values), max(values)
            span = (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)  # one shared grid for all n
            for n, row in at_n.items():
                ax.hist(_expand(row[dim]["hist"]), bins=20, range=span, histtype="step",
                        label=f"n={n}")
            ax.set_title(f"{cat} prompts ({mining[cat]['prompts']})")
            ax.set_xlabel(f"best {dim} score among first n answers")
            ax.set_ylabel("prompts")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / f"mining_{dim}.png", dpi=110)
        plt.close(fig)
        written.append(f"mining_{dim}.png")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for cat in cats:
        at_n = mining[cat]["at_n"]
        ns = sorted(at_n, key=int)
        for dim in dims:
            ax.plot([int(n) for n in ns], [at_n[n][dim]["pass_rate"] for n in ns], marker="o",
                    label=f"{dim} | {cat} prompts")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n (answers per prompt)")
    ax.set_ylabel("share of prompts reaching high")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "mining_pass_rate.png", dpi=110)
    plt.close(fig)
    return written + ["mining_pass_rate.png"]


def plot_ceiling(plt, summary: dict, folder: Path) -> list[str]:
    ceiling = {n: c for n, c in summary["ceiling"].get("all", {}).items()
               if c["original"]["n"]}
    if not ceiling:
        return []
    ns = sorted(ceiling, key=int)
    top = ceiling[ns[-1]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    orig, new = _expand(top["original"]["hist"]), _expand(top["rewritten"]["hist"])
    lo, hi = min(orig + new), max(orig + new)
    bins = [lo + (hi - lo + 1e-9) * i / 20 for i in range(21)] if hi > lo else 5
    left.hist([orig, new], bins=bins, label=["original", "rewritten"])
    left.set_title(f"max combined reward at Pass@{ns[-1]} ({top['original']['n']} targets)")
    left.set_xlabel("max combined reward")
    left.set_ylabel("prompts")
    left.legend()
    for key in ("original", "rewritten"):
        right.plot([int(n) for n in ns], [ceiling[n][key]["mean"] for n in ns], marker="o",
                   label=key)
    right.set_xscale("log", base=2)
    right.set_xlabel("n (answers per prompt)")
    right.set_ylabel("mean max combined reward")
    right.legend()
    fig.tight_layout()
    fig.savefig(folder / "ceiling.png", dpi=110)
    plt.close(fig)
    return ["ceiling.png"]


def write_plots(summary: dict, dims: list[str], folder: Path) -> list[str] | str:
    """The figures' file names, or why there are none."""
    plt = _pyplot()
    if plt is None:
        return "matplotlib is not installed (pip install matplotlib): no figures"
    folder.mkdir(parents=True, exist_ok=True)
    return plot_mining(plt, summary, dims, folder) + plot_ceiling(plt, summary, folder)
