"""The eta tuner's decisions, as pure functions over plain dicts (no torch): the margin
surrogate, constraint checks, the choice, bootstrap intervals, the Pareto front, the counts.

Surrogate (used to pick which points are worth generating answers for). Each score column may
have a proxy preference p with a sign s (pipeline.eval.tune.proxies; a score named like a
preference is its own proxy): g(eta) = s * margin_p(eta), the held-out log-prob margin of p at
eta. DPO on p+ raises exactly margin_p, so g moves the way the score should, in other units.
- objective proxy: g_objective(eta), to be maximised (minimised for lower-is-better axes);
- a constraint `score op base + v` (an absolute bound b counts as v = b - base score) with
  d = +1 for >=, -1 for <=, asks d * (score - base) >= d * v. Its surrogate asks
  d * (g(eta) - g(base)) > 0 when d * v > 0 (the score must improve: so must its margin) and
  >= 0 otherwise (the score may not get worse than the allowance: its margin may not get
  worse at all, a conservative reading). Constraints without a proxy pass the surrogate.
Calibration: candidates are confirmed one at a time. After each, every proxied constraint score
gets a slope c = sum(dg * ds) / sum(dg^2) over the confirmed points (dg = g(eta) - g(base),
ds = score - base score: least squares through the base). With a positive slope the surrogate
predicts ds = c * dg and asks d * c * dg >= d * v, in score units; the next candidate is ranked
with it. (Without it, points that raise a margin by a hair pass a +0.1 constraint: measured on
the shrunken quickstart run.)
Monotone floors: a confirmed point that fails a proxied constraint also rules out every point
whose proxy margin moved no further in the constraint's direction (the score is taken to be
monotone in its margin). Without it, on the full quickstart, four candidates with
eta_helpful > 0 were spent before any point with more harmless margin than the failures.
Candidates: the surrogate-feasible points by objective proxy, best first; if none is feasible,
the point of least total shortfall (margin units, or score units once calibrated), then
objective proxy.
"""

from __future__ import annotations

from prefvec_ds import PrefvecError
from prefvec_ds.config.tune import TuneConfig, TuneConstraint
from prefvec_ds.eval.scorers import LOWER_IS_BETTER

Point = dict[str, float]


def direction(op: str) -> int:
    return 1 if op == ">=" else -1


def objective_sign(objective: str) -> int:
    """+1: the objective is maximised; -1: a lower-is-better axis (cost, over_refusal)."""
    return -1 if objective.split("@")[0] in LOWER_IS_BETTER else 1  # cost@harmful too


def proxy_of(score: str, tcfg: TuneConfig, preferences: list[str]) -> tuple[str, int] | None:
    """(preference, sign) whose margin the surrogate reads for `score`, or None."""
    name = tcfg.proxies.get(score, score if score in preferences else None)
    if name is None:
        return None
    sign = -1 if name.startswith("-") else 1
    pref = name.lstrip("-")
    if pref not in preferences:
        raise PrefvecError(f"config parameter pipeline.eval.tune.proxies.{score}: unknown "
                           f"preference {pref}; expected one of {', '.join(preferences)}")
    return pref, sign


def check_names(tcfg: TuneConfig, preferences: list[str], axes: list[str]) -> None:
    """Objective and constraint scores are axes of the scorers; proxies name preferences
    (checked before any model is loaded)."""
    for param, score in [("objective", tcfg.objective)] + [
            ("constraints", c.score) for c in tcfg.constraints]:
        if score not in axes:
            raise PrefvecError(f"config parameter pipeline.eval.tune.{param}: score {score!r} "
                               f"is not scored; expected one of {', '.join(axes)} (the axes of "
                               "pipeline.eval.scorers)")
        proxy_of(score, tcfg, preferences)


def bound(c: TuneConstraint, base_scores: dict) -> float:
    """The bound the constraint's score is compared with."""
    if c.relative_to == "absolute":
        return c.value
    return score_of(base_scores, c.score, "constraints") + c.value


def score_of(scores: dict, name: str, param: str) -> float:
    value = scores.get(name)
    if value is None:
        axes = sorted(k for k, v in scores.items() if not k.startswith("n_") and v is not None)
        raise PrefvecError(f"config parameter pipeline.eval.tune.{param}: score {name!r} was "
                           f"not measured; expected one of {', '.join(axes)} (the axes of "
                           "pipeline.eval.scorers)")
    return float(value)


def surrogate(margins: dict[str, float], base_margins: dict[str, float], tcfg: TuneConfig,
              preferences: list[str], base_scores: dict, slopes: dict | None = None,
              floors: dict | None = None) -> dict:
    """{'objective': proxy value (higher is better), 'feasible', 'shortfall'} of one point;
    margins: preference -> mean held-out margin at the point; slopes: score -> calibrated
    score per unit of its proxy's signed margin; floors: score -> the largest d * dg of a
    confirmed point that failed that constraint (see the module docstring)."""
    obj = proxy_of(tcfg.objective, tcfg, preferences)
    if obj is None:
        raise PrefvecError(f"config parameter pipeline.eval.tune.proxies: the objective "
                           f"{tcfg.objective!r} has no proxy preference; expected "
                           f"proxies.{tcfg.objective}: <one of {', '.join(preferences)}>")
    objective = objective_sign(tcfg.objective) * obj[1] * margins[obj[0]]
    feasible, shortfall = True, 0.0
    for c in tcfg.constraints:
        proxy = proxy_of(c.score, tcfg, preferences)
        if proxy is None:
            continue
        d, v = direction(c.op), relative_offset(c, base_scores)
        dg = proxy[1] * (margins[proxy[0]] - base_margins[proxy[0]])
        slope = (slopes or {}).get(c.score)
        if slope:
            short = d * v - d * slope * dg
            feasible &= short <= 1e-12
        else:
            feasible &= d * dg > 0 if d * v > 0 else d * dg >= 0
            short = -d * dg
        floor = (floors or {}).get(c.score)
        if floor is not None and d * dg <= floor:  # no further than a point that failed it
            feasible = False
            short = max(short, floor - d * dg + 1e-9)
        shortfall += max(0.0, short)
    return {"objective": objective, "feasible": bool(feasible), "shortfall": shortfall}


def relative_offset(c: TuneConstraint, base_scores: dict) -> float:
    """v: the constraint as `score op base + v` (an absolute bound b gives v = b - base)."""
    if c.relative_to == "base":
        return c.value
    return c.value - score_of(base_scores, c.score, "constraints")


def calibrate(confirmed: list[dict], base_margins: dict, base_scores: dict, tcfg: TuneConfig,
              preferences: list[str]) -> dict[str, float]:
    """score -> slope of (score - base) over (signed proxy margin - base), least squares through
    the base over the confirmed points ({'margins', 'scores'}); only positive slopes (a proxy
    that moves against its score is not trusted)."""
    out = {}
    for c in tcfg.constraints:
        proxy = proxy_of(c.score, tcfg, preferences)
        if proxy is None or c.score in out:
            continue
        sxy = sxx = 0.0
        for row in confirmed:
            dg = proxy[1] * (row["margins"][proxy[0]] - base_margins[proxy[0]])
            ds = row["scores"].get(c.score)
            if ds is not None and base_scores.get(c.score) is not None:
                sxy += dg * (ds - base_scores[c.score])
                sxx += dg * dg
        if sxx > 0 and sxy > 0:
            out[c.score] = sxy / sxx
    return out


def failure_floors(confirmed: list[dict], base_margins: dict, base_scores: dict,
                   tcfg: TuneConfig, preferences: list[str]) -> dict[str, float]:
    """score -> the largest d * dg (signed proxy margin move, in the constraint's direction)
    among confirmed points that failed that constraint. A score is taken to be monotone in its
    proxy margin, so a point whose proxy moved no further is predicted to fail too."""
    out: dict[str, float] = {}
    for c in tcfg.constraints:
        proxy = proxy_of(c.score, tcfg, preferences)
        if proxy is None:
            continue
        d, b = direction(c.op), bound(c, base_scores)
        for row in confirmed:
            value = row["scores"].get(c.score)
            if value is None or d * (value - b) >= 0:
                continue
            dg = d * proxy[1] * (row["margins"][proxy[0]] - base_margins[proxy[0]])
            out[c.score] = max(out.get(c.score, dg), dg)
    return out


def rank_candidates(rows: list[dict], k: int, skip: set[int] = frozenset()) -> list[int]:
    """Indices of the k best rows ({'surrogate': surrogate(...)}) not in skip, best first
    (see the module docstring)."""
    rows = [r if i not in skip else None for i, r in enumerate(rows)]
    feasible = [i for i, r in enumerate(rows) if r and r["surrogate"]["feasible"]]
    feasible.sort(key=lambda i: -rows[i]["surrogate"]["objective"])
    rest = [i for i, r in enumerate(rows) if r and not r["surrogate"]["feasible"]]
    rest.sort(key=lambda i: (rows[i]["surrogate"]["shortfall"],
                             -rows[i]["surrogate"]["objective"]))
    return (feasible + rest)[:k]


def check_constraints(scores: dict, base_scores: dict, tcfg: TuneConfig) -> list[dict]:
    """Each constraint on measured scores: bound, value, slack (>= 0: met), met."""
    out = []
    for c in tcfg.constraints:
        b, value = bound(c, base_scores), score_of(scores, c.score, "constraints")
        slack = direction(c.op) * (value - b)
        out.append({"score": c.score, "op": c.op, "bound": b, "value": value,
                    "slack": slack, "met": slack >= -1e-12})
    return out


def choose(confirmed: list[dict], objective: str) -> dict:
    """The best confirmed point ({'scores', 'constraints'}) meeting every constraint, or the
    one closest to meeting them (least total shortfall) when none does."""
    sign = objective_sign(objective)
    met = [i for i, r in enumerate(confirmed) if all(c["met"] for c in r["constraints"])]
    if met:
        best = max(met, key=lambda i: sign * confirmed[i]["scores"][objective])
        return {"index": best, "met": True}
    short = [sum(max(0.0, -c["slack"]) for c in r["constraints"]) for r in confirmed]
    best = min(range(len(confirmed)),
               key=lambda i: (short[i], -sign * confirmed[i]["scores"][objective]))
    return {"index": best, "met": False, "shortfall": short[best]}


def bootstrap_mean(per_prompt: list[list[float]], samples: int, confidence: float,
                   seed: int = 0) -> dict:
    """Mean over every value and its percentile interval when prompts are resampled with
    replacement (a prompt's answers stay together). per_prompt: the values of each prompt
    (empty where the axis does not apply)."""
    import numpy as np  # noqa: PLC0415

    sums = np.array([sum(v) for v in per_prompt], dtype=np.float64)
    counts = np.array([len(v) for v in per_prompt], dtype=np.float64)
    mean = float(sums.sum() / counts.sum()) if counts.sum() else None
    if not samples or mean is None:
        return {"mean": mean, "lo": None, "hi": None}
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(per_prompt), size=(samples, len(per_prompt)))
    n = counts[picks].sum(axis=1)
    means = sums[picks].sum(axis=1)[n > 0] / n[n > 0]
    tail = (1 - confidence) / 2
    return {"mean": mean, "lo": float(np.quantile(means, tail)),
            "hi": float(np.quantile(means, 1 - tail))}


def pareto_front(rows: list[dict], columns: dict[str, int]) -> list[int]:
    """Indices of the rows ({'scores': {...}}) no other row dominates on `columns`
    (column -> +1 maximised, -1 minimised), in input order."""
    def vec(r):
        return [s * r["scores"][c] for c, s in columns.items()]

    vals = [vec(r) for r in rows]
    front = []
    for i, a in enumerate(vals):
        dominated = any(all(x >= y for x, y in zip(b, a)) and any(x > y for x, y in zip(b, a))
                        for j, b in enumerate(vals) if j != i)
        if not dominated:
            front.append(i)
    return front


def front_columns(tcfg: TuneConfig) -> dict[str, int]:
    """The objective and every constrained score, each with the direction it is better in."""
    cols = {tcfg.objective: objective_sign(tcfg.objective)}
    for c in tcfg.constraints:
        cols.setdefault(c.score, direction(c.op))
    return cols


def evaluation_counts(grid_points: int, generated: int) -> dict:
    """What the tuner spent against the full grid of the same resolution, where the sweep
    generates, scores and measures margins at every point."""
    return {"margin_passes": grid_points, "generation_passes": generated,
            "grid": {"points": grid_points, "margin_passes": grid_points,
                     "generation_passes": grid_points},
            "generation_saved": grid_points - generated}
