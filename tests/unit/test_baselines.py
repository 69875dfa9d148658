"""The baselines of pipeline.baselines: their training sets (hand-built pairs), reference rows,
DAG stages, and the merged baselines' arithmetic on real checkpoint files."""

from __future__ import annotations

import pytest
import torch

from prefvec_ds import PrefvecError
from prefvec_ds.config.loader import load_config
from prefvec_ds.data.baselines import joint, safe_first
from prefvec_ds.data.tokenize import TokenizedPair
from prefvec_ds.pipeline.arithmetic import baseline_merge_call, run_merge
from prefvec_ds.pipeline.baselines import soup_etas
from prefvec_ds.pipeline.dag import build_dag, stage_by_name
from prefvec_ds.train.baselines import _reference
from tests.ckpt_fixtures import pico_state_dict, write_hf_folder, write_synthetic_zero3
from tests.conftest import REPO

pytestmark = pytest.mark.unit


def pair(key, chosen, rejected, chosen_safe=None, rejected_safe=None):
    return TokenizedPair((0,), (chosen,), (rejected,), key, chosen_safe, rejected_safe)


HELPFUL = [pair("both-safe", 1, 2, True, True),
           pair("unsafe-chosen", 3, 4, False, True),      # the harmless set ranks this row
           pair("unsafe-only-helpful", 5, 6, False, True),  # no harmless pair: safe first
           pair("both-unsafe", 7, 8, False, False)]         # no harmlessness order: dropped
HARMLESS = [pair("unsafe-chosen", 4, 3, True, False),
            pair("both-safe", 2, 1, True, True),
            pair("harmless-only", 9, 10, True, False)]


def test_safe_first_takes_helpful_when_both_safe_else_harmless():
    rows = {(r.pair.key, r.role): r for r in safe_first(HELPFUL, HARMLESS)}
    assert set(rows) == {("both-safe", "helpful"), ("unsafe-chosen", "harmless"),
                         ("unsafe-only-helpful", "helpful"), ("harmless-only", "harmless")}
    assert rows["both-safe", "helpful"].pair.chosen_ids == (1,)
    assert rows["unsafe-chosen", "harmless"].pair.chosen_ids == (4,)  # the safe response
    flipped = rows["unsafe-only-helpful", "helpful"]
    assert flipped.sign == -1 and flipped.pair.chosen_ids == (6,) and flipped.pair.chosen_safe


def test_joint_is_the_union_as_labelled():
    rows = joint(HELPFUL, HARMLESS)
    assert [r.role for r in rows] == ["helpful"] * 4 + ["harmless"] * 3
    assert all(r.sign == 1 for r in rows) and rows[4].pair.chosen_ids == (4,)


def test_reference_rows_come_from_the_source_table_swapped_when_flipped():
    rows = safe_first(HELPFUL, HARMLESS)
    tables = {"helpful": {p.key: (-1.0 * i, -10.0 * i, i, 2 * i) for i, p in enumerate(HELPFUL)},
              "harmless": {p.key: (-3.0, -4.0, 7, 8) for p in HARMLESS}}
    ref = _reference(rows, tables)
    by_key = {r.pair.key: ref[i].tolist() for i, r in enumerate(rows)}
    assert by_key["both-safe"] == [-0.0, -0.0, 0, 0]
    assert by_key["unsafe-chosen"] == [-3.0, -4.0, 7, 8]
    assert by_key["unsafe-only-helpful"] == [-20.0, -2.0, 4, 2]  # (r, c, nr, nc) of row 2


def cfg_with(tmp_path, *extra):
    return load_config(REPO / "recipes" / "quickstart.yaml",
                       [f"run_dir={tmp_path}", "pipeline.eval.diagnostic_seeds=[]", *extra])


def test_baselines_are_stages_the_eval_waits_for(tmp_path):
    cfg = cfg_with(tmp_path, "pipeline.baselines=[dpo_safe_first,dpo_soup]",
                   "pipeline.merges=[{name: default, eta: {helpful: 0.5}}]")
    stages = build_dag(cfg)
    trained = stage_by_name(stages, "baseline/dpo_safe_first")
    assert trained.kind == "baseline_dpo" and trained.distributed
    assert trained.deps == ("ref_logps/helpful", "ref_logps/harmless")
    soup = stage_by_name(stages, "baseline/dpo_soup")
    assert soup.deps == ("sft", "dpo/helpful+", "dpo/harmless+") and not soup.distributed
    assert {"baseline/dpo_safe_first", "baseline/dpo_soup"} <= set(stage_by_name(stages,
                                                                                 "eval").deps)
    assert soup_etas(cfg, "dpo_soup") == {"helpful": 0.5, "harmless": 0.5}
    assert soup_etas(cfg, "positive_only") == {"helpful": 0.5, "harmless": 1.0}


def test_bad_baseline_settings_are_one_clear_error(tmp_path):
    with pytest.raises(PrefvecError, match="pipeline.baselines"):
        cfg_with(tmp_path, "pipeline.baselines=[reward_soup]")
    with pytest.raises(PrefvecError, match="pipeline.baseline_roles.harmless: 'safety'"):
        build_dag(cfg_with(tmp_path, "pipeline.baselines=[dpo_joint]",
                           "pipeline.baseline_roles={helpful: helpful, harmless: safety}"))
    with pytest.raises(PrefvecError, match="name 'bfpo' is also a baseline"):
        build_dag(cfg_with(tmp_path, "pipeline.baselines=[bfpo]",
                           "pipeline.merges=[{name: bfpo, eta: {}}]"))


def test_a_run_without_baselines_may_lack_the_preferences_their_roles_name(tmp_path):
    """pipeline.baseline_roles defaults to helpful/harmless; a one-preference run (the MORA
    quickstart) that trains no baseline must not trip on it."""
    cfg = cfg_with(tmp_path, "pipeline.baselines=[]",
                   "data.preferences={helpful: {source: embedded}}",
                   "pipeline.merges=[{name: default, eta: {helpful: 1.0}}]")
    names = [s.name for s in build_dag(cfg)]
    assert "eval" in names and not any(n.startswith("baseline/") for n in names)


def test_soup_and_positive_only_are_the_weighted_moves_from_theta_base(tmp_path):
    """On real checkpoint files: theta_base (HF), two + models (ZeRO-3 layout, 2 ranks)."""
    base_sd = pico_state_dict(0)
    plus = {"helpful": pico_state_dict(1), "harmless": pico_state_dict(2)}
    base = write_hf_folder(tmp_path / "base", base_sd, {"architectures": ["Pico"]})
    for pref, sd in plus.items():
        write_synthetic_zero3(tmp_path / "run" / "dpo" / f"{pref}+" / "ckpt", sd, world=2)
    for name, w in (("dpo_soup", {"helpful": 0.5, "harmless": 0.5}),
                    ("positive_only", {"helpful": 1.0, "harmless": -0.25})):
        cfg = cfg_with(tmp_path / "run", f"model.base={base}", f"pipeline.baselines=[{name}]",
                       "pipeline.merges=[{name: default, eta: {harmless: -0.25}}]")
        call = baseline_merge_call(cfg, stage_by_name(build_dag(cfg), f"baseline/{name}"))
        run_merge(call)
        from safetensors.torch import load_file

        out = load_file(str(call.out / "model.safetensors"))
        for key, theta in base_sd.items():
            want = theta + sum(w[p] * (plus[p][key] - theta) for p in w)
            torch.testing.assert_close(out[key], want, rtol=0, atol=1e-6)


def test_sweep_choice_is_the_best_mean_rank_ties_to_the_smaller_eta():
    from prefvec_ds.pipeline.compare import sweep_choice

    def point(h, s, helpful, harmless):
        return {"eta": {"helpful": h, "harmless": s},
                "scores": {"helpful": helpful, "harmless": harmless}}

    sweep = {"points": [point(0, 0, 0.2, 0.2), point(1, 0, 0.6, 0.1), point(0, 1, 0.1, 0.6),
                        point(2, 2, 0.5, 0.5), point(1, 1, 0.5, 0.5)]}
    assert sweep_choice(sweep, ["helpful", "harmless"])["eta"] == {"helpful": 1, "harmless": 1}
    assert sweep_choice(sweep, ["helpful"])["eta"] == {"helpful": 1, "harmless": 0}


def test_compare_before_the_eval_is_one_clear_error(tmp_path):
    from prefvec_ds.pipeline.compare import comparison

    cfg = cfg_with(tmp_path, "pipeline.baselines=[dpo_joint]")
    with pytest.raises(PrefvecError, match="eval/sweep.json: no eval results yet"):
        comparison(cfg, build_dag(cfg))


def test_headline_picks_the_compared_columns_and_a_wrong_name_is_one_error(tmp_path):
    import json

    from prefvec_ds.pipeline.compare import comparison

    cfg = cfg_with(tmp_path, "pipeline.eval.headline=[reward@alpaca,refusal@advbench]")
    row = {"scores": {"reward@alpaca": 0.1, "refusal@advbench": 0.2, "refusal@xstest": 0.3},
           "margins": {}}
    sweep = {"base": row, "models": {},
             "points": [{**row, "eta": {"helpful": 0.0, "harmless": 0.0}}]}
    (tmp_path / "eval").mkdir(parents=True)
    (tmp_path / "eval" / "sweep.json").write_text(json.dumps(sweep))
    assert comparison(cfg, build_dag(cfg))["axes"] == ["reward@alpaca", "refusal@advbench"]
    cfg.pipeline.eval.headline = ["reward@alpaca", "refusal@harmbench"]
    with pytest.raises(PrefvecError, match="pipeline.eval.headline: 'refusal@harmbench' is not "
                                           "a score column"):
        comparison(cfg, build_dag(cfg))


def test_comparison_markdown_has_one_column_per_figure():
    from prefvec_ds.pipeline.compare import markdown

    table = {"rows": [{"system": "theta_base", "eta": None, "helpful": 0.5},
                      {"system": "bfpo", "eta": None, "helpful": 0.25, "wall_s": 12.0},
                      {"system": "dpo_soup", "eta": None, "helpful": 0.75, "wall_s": 3.0}]}
    lines = markdown(table).splitlines()
    assert lines[0] == "| system | helpful | wall_s |"
    assert lines[2] == "| theta_base | 0.5 |  |" and lines[3] == "| bfpo | 0.25 | 12 |"


def test_unlabelled_pairs_for_a_label_reading_baseline_fail_before_any_launch(tmp_path):
    """prefvec run's validation reads the data once: a baseline that needs per-response safety
    labels on unlabelled pairs is one error naming the preference and the baseline."""
    import json

    from prefvec_ds.pipeline.prepare import validate_data

    rows = tmp_path / "pairs.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) + "\n"
                            for i in range(4)))
    ok = cfg_with(tmp_path, f"data.preferences.helpful={{source: jsonl, path: {rows}}}",
                  "pipeline.baselines=[dpo_joint,dpo_soup]")
    validate_data(ok)  # no baseline reads labels: fine
    bad = cfg_with(tmp_path, f"data.preferences.helpful={{source: jsonl, path: {rows}}}",
                   "pipeline.baselines=[dpo_joint,dpo_safe_first]")
    with pytest.raises(PrefvecError, match=r"data.preferences.helpful: pipeline.baselines "
                                           r"dpo_safe_first needs .* 4 of 4 pairs"):
        validate_data(bad)
