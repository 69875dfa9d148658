"""Eta grids, lines, trends and the eval config's checks (pure functions, no torch)."""

from __future__ import annotations

import pytest

from prefvec_ds import PrefvecError
from prefvec_ds.config.evaluation import EvalConfig
from prefvec_ds.eval.grid import axis_line, check_names, key, sweep_points, trend

PREFS2 = ["helpful", "harmless"]
PREFS3 = ["helpful", "harmless", "concise"]


def test_product_grid_is_the_papers_5x5_with_the_base_first():
    points = sweep_points(PREFS2, EvalConfig())
    assert len(points) == 25 and len({key(p) for p in points}) == 25
    assert points[0] == {"helpful": 0.0, "harmless": 0.0}
    assert {p["helpful"] for p in points} == {-1.0, -0.5, 0.0, 0.5, 1.0}


def test_three_preferences_default_to_pair_grids_and_axes_is_cheapest():
    pairs = sweep_points(PREFS3, EvalConfig())  # auto -> pairs, the third preference at 0
    # base + 3 axes x 4 non-zero values + 3 pairs x 16 interior points
    assert len(pairs) == 1 + 12 + 48
    assert all(sum(v != 0 for v in p.values()) <= 2 for p in pairs)
    axes = sweep_points(PREFS3, EvalConfig(grid="axes"))
    assert len(axes) == 1 + 12
    one = sweep_points(PREFS3, EvalConfig(grid="pairs", pairs=[["helpful", "concise"]],
                                          rest_eta=1.0))
    assert len(one) == 1 + 25 and all(p["harmless"] == 1.0 for p in one[1:])
    assert len(sweep_points(PREFS3, EvalConfig(grid="product"))) == 125


def test_axis_line_and_trend():
    points = sweep_points(PREFS2, EvalConfig(etas=[1, -1, 0]))
    line = axis_line(points, "helpful")
    assert [points[i]["helpful"] for i in line] == [-1.0, 0.0, 1.0]
    assert all(points[i]["harmless"] == 0.0 for i in line)
    assert trend([0.1, 0.2, 0.2, 0.4]) == "rises"
    assert trend([0.4, 0.2]) == "falls"
    assert trend([0.1, 0.3, 0.2]) == "mixed"
    assert trend([0.2, 0.2]) == "flat"
    assert trend([None, 0.3]) == "n/a"


def test_eval_config_checks_name_the_parameter():
    with pytest.raises(PrefvecError, match="pipeline.eval.grid"):
        EvalConfig(grid="cube")
    with pytest.raises(PrefvecError, match="pipeline.eval.scorers"):
        EvalConfig(scorers=["oracle"])
    with pytest.raises(PrefvecError, match="generation.num_samples"):
        EvalConfig(generation={"num_samples": 4})  # greedy samples would all be the same
    with pytest.raises(PrefvecError, match="pipeline.eval.pairs: unknown preference"):
        check_names(EvalConfig(grid="pairs", pairs=[["helpful", "honest"]]), PREFS2, 42)
    with pytest.raises(PrefvecError, match="diagnostic_seeds: 42 is the run's own seed"):
        check_names(EvalConfig(diagnostic_seeds=[42]), PREFS2, 42)


@pytest.mark.parametrize("module", ["prefvec_ds.eval.generate", "prefvec_ds.config.evaluation",
                                    "prefvec_ds.eval.grid", "prefvec_ds.eval.runner"])
def test_eval_modules_import_first_without_a_cycle(module):
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
