"""The eta tuner's pure parts on hand-computable numbers: constraints against the base, the
margin surrogate and its calibration, candidate ranking, bootstrap intervals, the Pareto front,
the evaluation counts, and the config's checks."""

from __future__ import annotations

import pytest

from prefvec_ds import PrefvecError
from prefvec_ds.config.evaluation import EvalConfig
from prefvec_ds.config.tune import EtaRange, TuneConfig
from prefvec_ds.eval import tuning

PREFS = ["helpful", "harmless"]


def cfg(**kw) -> TuneConfig:
    return TuneConfig(**{"objective": "helpful", "constraints": [
        {"score": "harmless", "op": ">=", "relative_to": "base", "value": 0.1},
        {"score": "over_refusal", "op": "<=", "relative_to": "absolute", "value": 0.2}], **kw})


BASE = {"helpful": 0.5, "harmless": 0.3, "over_refusal": 0.1}


def test_constraints_relative_and_absolute():
    got = tuning.check_constraints({"helpful": 0.6, "harmless": 0.4, "over_refusal": 0.25},
                                   BASE, cfg())
    assert [c["bound"] for c in got] == pytest.approx([0.4, 0.2])
    assert [c["met"] for c in got] == [True, False]  # 0.4 >= 0.3 + 0.1 (exactly); 0.25 > 0.2
    assert [c["slack"] for c in got] == pytest.approx([0.0, -0.05])
    with pytest.raises(PrefvecError, match="over_refusal.*not measured"):
        tuning.check_constraints({"helpful": 1.0, "harmless": 1.0}, BASE, cfg())


def test_surrogate_needs_the_proxy_margin_to_rise_for_a_positive_offset():
    base_m = {"helpful": -2.0, "harmless": 2.0}
    # harmless must rise by 0.1 -> its margin must rise (strictly); over_refusal has no proxy
    up = tuning.surrogate({"helpful": -1.5, "harmless": 2.2}, base_m, cfg(), PREFS, BASE)
    flat = tuning.surrogate({"helpful": -1.0, "harmless": 2.0}, base_m, cfg(), PREFS, BASE)
    down = tuning.surrogate({"helpful": -0.5, "harmless": 1.7}, base_m, cfg(), PREFS, BASE)
    assert up == {"objective": -1.5, "feasible": True, "shortfall": 0.0}
    assert flat["feasible"] is False and flat["shortfall"] == 0.0
    assert down["feasible"] is False and down["shortfall"] == pytest.approx(0.3)
    # an allowance (harmless >= base - 0.1) accepts an unchanged margin
    loose = cfg(constraints=[{"score": "harmless", "op": ">=", "value": -0.1}])
    assert tuning.surrogate({"helpful": -1.0, "harmless": 2.0}, base_m, loose, PREFS,
                            BASE)["feasible"]


def test_calibration_turns_margins_into_score_units():
    base_m = {"helpful": -2.0, "harmless": 2.0}
    confirmed = [{"margins": {"helpful": -2.0, "harmless": 2.1}, "scores": {"harmless": 0.32}},
                 {"margins": {"helpful": -2.0, "harmless": 2.3}, "scores": {"harmless": 0.36}}]
    # least squares through the base: (0.1*0.02 + 0.3*0.06) / (0.01 + 0.09) = 0.2 per unit
    slopes = tuning.calibrate(confirmed, base_m, BASE, cfg(), PREFS)
    assert slopes == {"harmless": pytest.approx(0.2)}
    # +0.1 in harmless now needs +0.5 of margin: 2.4 falls short by 0.02, 2.5 is enough
    short = tuning.surrogate({"helpful": -2, "harmless": 2.4}, base_m, cfg(), PREFS, BASE,
                             slopes)
    assert short["feasible"] is False and short["shortfall"] == pytest.approx(0.02)
    assert tuning.surrogate({"helpful": -2, "harmless": 2.5}, base_m, cfg(), PREFS, BASE,
                            slopes)["feasible"]
    against = [{"margins": {"helpful": -2.0, "harmless": 2.1}, "scores": {"harmless": 0.2}}]
    assert tuning.calibrate(against, base_m, BASE, cfg(), PREFS) == {}  # not trusted


def test_a_failed_point_rules_out_points_whose_proxy_moved_no_further():
    base_m = {"helpful": -2.0, "harmless": 2.0}
    # harmless must reach 0.4; the point at margin 2.2 reached only 0.3: a failure at +0.2
    failed = [{"margins": {"helpful": -1.0, "harmless": 2.2}, "scores": {"harmless": 0.3,
                                                                         "over_refusal": 0.1}},
              {"margins": {"helpful": -1.0, "harmless": 2.1}, "scores": {"harmless": 0.35,
                                                                         "over_refusal": 0.1}},
              {"margins": {"helpful": -1.0, "harmless": 2.6}, "scores": {"harmless": 0.45,
                                                                         "over_refusal": 0.1}}]
    floors = tuning.failure_floors(failed, base_m, BASE, cfg(), PREFS)
    assert floors == {"harmless": pytest.approx(0.2)}  # the met point (2.6) sets no floor
    same = tuning.surrogate({"helpful": -0.5, "harmless": 2.2}, base_m, cfg(), PREFS, BASE,
                            None, floors)
    further = tuning.surrogate({"helpful": -1.5, "harmless": 2.25}, base_m, cfg(), PREFS, BASE,
                               None, floors)
    assert same["feasible"] is False and same["shortfall"] == pytest.approx(0.0, abs=1e-6)
    assert further["feasible"] is True
    ranked = tuning.rank_candidates([{"surrogate": same}, {"surrogate": further}], 2)
    assert ranked == [1, 0]  # the better objective (same) comes after the feasible one


def test_ranking_feasible_by_objective_then_least_shortfall():
    rows = [{"surrogate": s} for s in (
        {"objective": 1.0, "feasible": False, "shortfall": 0.5},
        {"objective": 0.2, "feasible": True, "shortfall": 0.0},
        {"objective": 0.9, "feasible": True, "shortfall": 0.0},
        {"objective": 3.0, "feasible": False, "shortfall": 0.1})]
    assert tuning.rank_candidates(rows, 3) == [2, 1, 3]
    assert tuning.rank_candidates(rows, 2, skip={2}) == [1, 3]


def test_proxies_signs_and_errors():
    c = cfg(proxies={"over_refusal": "-helpful"})
    assert tuning.proxy_of("over_refusal", c, PREFS) == ("helpful", -1)
    assert tuning.proxy_of("harmless", c, PREFS) == ("harmless", 1)
    assert tuning.proxy_of("verbosity", c, PREFS) is None
    with pytest.raises(PrefvecError, match="proxies.x: unknown preference nope"):
        tuning.proxy_of("x", cfg(proxies={"x": "nope"}), PREFS)
    with pytest.raises(PrefvecError, match="objective 'verbosity' has no proxy"):
        tuning.surrogate({"helpful": 0, "harmless": 0}, {"helpful": 0, "harmless": 0},
                         cfg(objective="verbosity"), PREFS, BASE)


def test_choose_best_met_or_closest():
    def row(h, slacks):
        return {"scores": {"helpful": h}, "constraints": [{"slack": s, "met": s >= 0}
                                                          for s in slacks]}
    assert tuning.choose([row(0.9, [-0.1, 0]), row(0.5, [0, 0.2]), row(0.7, [0.1, 0])],
                         "helpful") == {"index": 2, "met": True}
    got = tuning.choose([row(0.9, [-0.3, 0]), row(0.5, [-0.1, -0.05])], "helpful")
    assert got["index"] == 1 and got["met"] is False
    assert got["shortfall"] == pytest.approx(0.15)


def test_bootstrap_keeps_answers_of_a_prompt_together():
    assert tuning.bootstrap_mean([[1.0, 1.0], [0.0], []], 0, 0.95) == {
        "mean": pytest.approx(2 / 3), "lo": None, "hi": None}
    same = tuning.bootstrap_mean([[0.5], [0.5], [0.5]], 200, 0.9, seed=1)
    assert same["lo"] == same["hi"] == same["mean"] == 0.5
    got = tuning.bootstrap_mean([[0.0]] * 10 + [[1.0]] * 10, 500, 0.95, seed=0)
    assert got["mean"] == 0.5 and 0.2 < got["lo"] < 0.5 < got["hi"] < 0.8
    assert got == tuning.bootstrap_mean([[0.0]] * 10 + [[1.0]] * 10, 500, 0.95, seed=0)


def test_pareto_front_with_a_minimised_column():
    rows = [{"scores": {"h": h, "r": r}} for h, r in
            ((0.5, 0.1), (0.6, 0.2), (0.4, 0.1), (0.6, 0.3), (0.5, 0.1))]
    # (0.4, 0.1) is beaten by (0.5, 0.1); (0.6, 0.3) by (0.6, 0.2); the equal pair both stay
    assert tuning.pareto_front(rows, {"h": 1, "r": -1}) == [0, 1, 4]
    assert tuning.front_columns(cfg()) == {"helpful": 1, "harmless": 1, "over_refusal": -1}


def test_counts_against_the_grid():
    assert tuning.evaluation_counts(81, 4) == {
        "margin_passes": 81, "generation_passes": 4, "generation_saved": 77,
        "grid": {"points": 81, "margin_passes": 81, "generation_passes": 81}}


def test_config_ranges_and_checks():
    assert EtaRange(-1, 1, 0.5).values() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert EtaRange(0, 0.3, 0.1).values() == [0.0, 0.1, 0.2, 0.3]
    t = EvalConfig(tune={"space": {"helpful": {"min": 0, "max": 1, "step": 0.5}}}).tune
    assert t.etas_of("helpful") == [0.0, 0.5, 1.0] and len(t.etas_of("harmless")) == 9
    for bad, match in (({"constraints": [{"score": "h", "op": ">"}]}, "op"),
                       ({"constraints": [{"score": "h", "relative_to": "x"}]}, "relative_to"),
                       ({"default_range": {"step": 0}}, "step"),
                       ({"default_range": {"min": 1, "max": 0}}, "max"),
                       ({"candidates": 0}, "candidates"), ({"confidence": 1}, "confidence"),
                       ({"merge_to": "a/b"}, "merge_to")):
        with pytest.raises(PrefvecError, match=match):
            EvalConfig(tune=bad)
    with pytest.raises(PrefvecError, match="interference_methods"):
        EvalConfig(interference_methods=["task_arithmetic"])


def test_names_are_checked_before_a_model_loads():
    tuning.check_names(cfg(), PREFS, ["helpful", "harmless", "over_refusal"])
    with pytest.raises(PrefvecError, match=r"tune.objective: score 'cost' is not scored"):
        tuning.check_names(cfg(objective="cost"), PREFS, ["helpful", "harmless",
                                                          "over_refusal"])
    with pytest.raises(PrefvecError, match=r"tune.constraints: score 'over_refusal'"):
        tuning.check_names(cfg(), PREFS, ["helpful", "harmless"])
