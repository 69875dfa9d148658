"""Eta grids and what is read off them: the sweep's points, lines along one preference, trends.

Pure functions over plain dicts ({preference: eta}); no torch. A point is the merge
theta_base + sum_p eta_p * phi_p; the all-zero point is theta_base itself.
"""

from __future__ import annotations

import itertools

from prefvec_ds import PrefvecError
from prefvec_ds.config.evaluation import EvalConfig

Point = dict[str, float]


def check_names(ecfg: EvalConfig, preferences: list[str], seed: int) -> None:
    """Preference names in pipeline.eval must exist in data.preferences."""
    known = set(preferences)
    for pair in ecfg.pairs:
        unknown = sorted(set(pair) - known)
        if unknown:
            raise PrefvecError(f"config parameter pipeline.eval.pairs: unknown preference(s) "
                               f"{', '.join(unknown)}; expected some of {', '.join(preferences)}")
    unknown = sorted(set(ecfg.diagnostic_preferences) - known)
    if unknown:
        raise PrefvecError(f"config parameter pipeline.eval.diagnostic_preferences: unknown "
                           f"preference(s) {', '.join(unknown)}; expected some of "
                           f"{', '.join(preferences)}")
    if seed in ecfg.diagnostic_seeds:
        raise PrefvecError(f"config parameter pipeline.eval.diagnostic_seeds: {seed} is the "
                           "run's own seed; expected other seeds")


def grid_kind(ecfg: EvalConfig, n_preferences: int) -> str:
    if ecfg.grid != "auto":
        return ecfg.grid
    return "product" if n_preferences <= 2 else "pairs"


def sweep_points(preferences: list[str], ecfg: EvalConfig) -> list[Point]:
    """Every point of the grid, each once, the all-zero point (theta_base) first.

    product: etas^P; pairs: for each pair (a, b) the etas x etas grid with the others at
    rest_eta; axes: each preference alone along etas, the others at rest_eta.
    """
    etas, rest = ecfg.etas, ecfg.rest_eta
    kind = grid_kind(ecfg, len(preferences))
    if kind == "pairs" and len(preferences) < 2:
        kind = "axes"  # one preference: its line
    if kind == "product":
        combos = [dict(zip(preferences, values))
                  for values in itertools.product(etas, repeat=len(preferences))]
    elif kind == "pairs":
        pairs = [tuple(p) for p in ecfg.pairs] or list(itertools.combinations(preferences, 2))
        combos = []
        for a, b in pairs:
            for ea, eb in itertools.product(etas, etas):
                combos.append({**{p: rest for p in preferences}, a: ea, b: eb})
    else:
        combos = [{**{q: rest for q in preferences}, p: e} for p in preferences for e in etas]
    zero = {p: 0.0 for p in preferences}
    out, seen = [zero], {key(zero)}
    for point in combos:
        if key(point) not in seen:
            seen.add(key(point))
            out.append(point)
    return out


def key(point: Point) -> tuple:
    return tuple(sorted(point.items()))


def label(point: Point) -> str:
    """'helpful=+0.5 harmless=-1'"""
    return " ".join(f"{p}={e:+g}" for p, e in point.items())


def axis_line(points: list[Point], preference: str, rest: float = 0.0) -> list[int]:
    """Indices of the points where only `preference` varies (every other eta == rest), sorted
    by its eta."""
    idx = [i for i, pt in enumerate(points)
           if all(v == rest for p, v in pt.items() if p != preference)]
    return sorted(idx, key=lambda i: points[i][preference])


def trend(values: list[float | None], tol: float = 0.0) -> str:
    """rises | falls (monotone, ends differ by more than tol) | flat | mixed | n/a."""
    vals = [v for v in values if v is not None]
    if len(vals) < 2:
        return "n/a"
    steps = [b - a for a, b in zip(vals, vals[1:])]
    if abs(vals[-1] - vals[0]) <= tol and all(abs(s) <= tol for s in steps):
        return "flat"
    if vals[-1] > vals[0] + tol and all(s >= -tol for s in steps):
        return "rises"
    if vals[-1] < vals[0] - tol and all(s <= tol for s in steps):
        return "falls"
    return "mixed"
