"""The figures of a MORA run, from its records: target mining per category and the paper's core
claim, the maximum combined reward reachable at Pass@n on rewritten vs original prompts."""

from __future__ import annotations

from collections import Counter
from statistics import mean, median

from prefvec_ds.config.mora import MoraConfig


def histogram(values: list[float], digits: int = 3) -> dict[str, int]:
    """value -> count (values rounded), sorted by value: a distribution that fits in JSON."""
    counts = Counter(round(v, digits) for v in values)
    return {f"{k:g}": counts[k] for k in sorted(counts)}


def _stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": mean(values), "median": median(values),
            "min": min(values), "max": max(values), "hist": histogram(values)}


def mining_summary(records: list[dict], mora: MoraConfig) -> dict:
    """Per category: how prompts split (single-reward, both, none) and, at each n, the
    distribution of the best score per dimension and the share of prompts reaching `high`."""
    out = {}
    for category in sorted({r["category"] for r in records}):
        recs = [r for r in records if r["category"] == category]
        per_n = {}
        for n in mora.pass_at:
            row = {}
            for dim, cfg in mora.dimensions.items():
                best = [max(r["mine"]["scores"][dim][:n]) for r in recs]
                row[dim] = {"pass_rate": sum(b >= cfg.high for b in best) / len(best),
                            "hist": histogram(best)}
            per_n[str(n)] = row
        out[category] = {"prompts": len(recs), "kinds": dict(Counter(r["mine"]["kind"]
                                                                   for r in recs)),
                         "targets": sum(r["target"] for r in recs), "at_n": per_n}
    return out


def ceiling_summary(records: list[dict], mora: MoraConfig) -> dict:
    """Max combined reward at Pass@n of each rewritten target vs its original prompt: over
    all targets (`all`) and per category, for every n <= K."""
    played = [r for r in records if r["selfplay"] is not None]
    ns = [n for n in mora.pass_at if n <= mora.selfplay_k]
    out = {}
    for category in ["all", *sorted({r["category"] for r in played})]:
        recs = [r for r in played if category in ("all", r["category"])]
        per_n = {}
        for n in ns:
            orig = [r["mine"]["pass_at"][str(n)] for r in recs]
            new = [r["selfplay"]["pass_at"][str(n)] for r in recs]
            diff = [b - a for a, b in zip(orig, new)]
            per_n[str(n)] = {"original": _stats(orig), "rewritten": _stats(new),
                             "difference": _stats(diff),
                             "share_higher": sum(d > 0 for d in diff) / len(diff) if diff else None,
                             "share_lower": sum(d < 0 for d in diff) / len(diff) if diff else None}
        out[category] = per_n
    return out


def summarize(records: list[dict], mora: MoraConfig) -> dict:
    pairs = [r["pair"] for r in records if r["pair"]]
    return {
        "prompts": len(records),
        "targets": sum(r["target"] for r in records),
        "rewritten": sum(r["rewrite"] is not None for r in records),
        "pairs": len(pairs),
        "mean_margin": mean(p["margin"] for p in pairs) if pairs else None,
        "dropped": dict(Counter(r["drop"] for r in records if r["target"] and r["drop"])),
        "pass_n": mora.pass_n, "selfplay_k": mora.selfplay_k,
        "mining": mining_summary(records, mora),
        "ceiling": ceiling_summary(records, mora),
    }


def format_summary(summary: dict) -> str:
    """The lines `prefvec mora` prints."""
    lines = [f"mora: {summary['prompts']} prompts, {summary['targets']} single-reward targets, "
             f"{summary['rewritten']} rewritten, {summary['pairs']} pairs "
             f"(mean margin {summary['mean_margin'] or 0:.3f}); dropped {summary['dropped']}"]
    for category, m in summary["mining"].items():
        top = m["at_n"][max(m["at_n"], key=int)]
        rates = ", ".join(f"{d} {v['pass_rate']:.3f}" for d, v in top.items())
        lines.append(f"  mining {category:<8} {m['prompts']:>5} prompts, kinds {m['kinds']}, "
                     f"reach at Pass@{max(m['at_n'], key=int)}: {rates}")
    lines.append("  max combined reward at Pass@n, rewritten targets: original -> rewritten "
                 "(mean; difference; share higher / lower; distributions)")
    for category, per_n in summary["ceiling"].items():
        for n, c in per_n.items():
            if c["original"]["n"]:
                lines.append(f"    {category:<8} n={n:>3} ({c['original']['n']}): "
                             f"{c['original']['mean']:.3f} -> {c['rewritten']['mean']:.3f}; "
                             f"{c['difference']['mean']:+.3f}; {c['share_higher']:.3f} / "
                             f"{c['share_lower']:.3f}; original {c['original']['hist']} "
                             f"rewritten {c['rewritten']['hist']}")
    return "\n".join(lines)
