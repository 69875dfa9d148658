"""Target mining, dimension tables, the prompt pool, the rewriters and the `mora` config section."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from prefvec_ds import PrefvecError
from prefvec_ds.config.loader import load_config
from prefvec_ds.data import embedded
from prefvec_ds.data.pairs import is_held_out, user_prompt
from prefvec_ds.data.sources import load_preference
from prefvec_ds.config.mora import DimensionConfig, RewriterConfig
from prefvec_ds.mora.mining import classify, load_pool, pass_at
from prefvec_ds.mora.rewrite import HFRewriter, StructuredRewriter, _first_line
from prefvec_ds.mora.scoring import DimensionTable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mora_fixtures import RECIPE, mora_cfg, tiny_policy  # noqa: E402,F401

TABLE = DimensionTable({"helpful": DimensionConfig(axis="helpful"),
                        "harmless": DimensionConfig(axis="harmless")})


def vecs(*pairs):
    return [{"helpful": h, "harmless": s} for h, s in pairs]


def test_single_reward_prompts_are_the_targets():
    harmful = classify(vecs((0, 1), (0, 0), (0, 1)), TABLE)  # refusals: harmless only
    assert harmful["target"] and harmful["kind"] == "single"
    assert harmful["missing"] == ["helpful"] and harmful["reach"] == {"helpful": 0,
                                                                      "harmless": 1}
    benign = classify(vecs((0, 1), (1, 1)), TABLE)            # one answer reaches both
    assert not benign["target"] and benign["kind"] == "multi" and benign["missing"] == []
    dead = classify(vecs((0, 0), (0, 0)), TABLE)
    assert not dead["target"] and dead["kind"] == "none"
    # every dimension reached, never two at once (comply OR refuse): still single-reward
    conflict = classify(vecs((1, 0), (0, 1), (0, 1)), TABLE)
    assert conflict["target"] and conflict["missing"] == ["helpful"]


def test_pass_at_is_the_max_over_a_prefix():
    assert pass_at([0.0, 1.0, 0.5, 2.0], [1, 2, 4, 8]) == {"1": 0.0, "2": 1.0, "4": 2.0}


def test_dimension_table_signs_missing_values_and_axes():
    table = DimensionTable({"helpful": DimensionConfig(axis="reward"),
                            "harmless": DimensionConfig(axis="cost", higher_is_better=False,
                                                        missing=-9.0, weight=2.0)})
    v = table.vectors({"reward": [1.5, 0.0], "cost": [2.0, None]}, 2)
    assert v == [{"helpful": 1.5, "harmless": -2.0}, {"helpful": 0.0, "harmless": -9.0}]
    assert table.combined(v[0]) == 1.5 - 4.0
    with pytest.raises(PrefvecError, match="no scorer returns axis 'cost'"):
        table.vectors({"reward": [1.0]}, 1)


def test_config_defaults_and_errors(tmp_path):
    cfg = load_config(RECIPE, [f"run_dir={tmp_path}", "pipeline.mora.pass_n=12"])
    mora = cfg.pipeline.mora
    assert mora.pass_at == [1, 2, 4, 8, 12] and mora.dimensions["helpful"].axis == "helpful"
    bad = {"pipeline.mora.pass_at=[1, 99]": "pass_at",
           "pipeline.mora.selfplay_k=1": "selfplay_k",
           "pipeline.mora.rewriter.kind=llm": "rewriter.kind",
           "pipeline.mora.dimensions={helpful: {}}": "dimensions",
           "pipeline.mora.pool={source: prompts}": "pool.path",
           "pipeline.mora.mix_into={x: [{source: mora, path: p}]}": "mix_into.x",
           "pipeline.mora.mix_into={x: [{source: embedded, oops: 1}]}": "mix_into.x",
           "pipeline.mora.temperature=0": "temperature",
           "pipeline.mora.nope=1": "nope"}
    for override, param in bad.items():
        with pytest.raises(PrefvecError, match=param.replace(".", r"\.")):
            load_config(RECIPE, [f"run_dir={tmp_path}", override])


def test_embedded_pool_leaves_out_the_eval_prompts(tmp_path):
    cfg = mora_cfg(tmp_path, tmp_path, "pipeline.mora.pool.max_prompts=0")
    pool = load_pool(cfg)
    assert [p.id for p in pool] == list(range(len(pool)))
    assert len({p.prompt for p in pool}) == len(pool)
    assert {p.category for p in pool} == {"helpful", "safety"}
    base = cfg.pipeline.mora.mix_into["helpful"][0]
    from prefvec_ds.config.schema import PreferenceConfig

    held = {p.prompt for p in load_preference("b", PreferenceConfig(**base), cfg.data)
            if is_held_out(p.key(), 0.1)}
    assert held and not held & {p.prompt for p in pool}
    kept = load_pool(mora_cfg(tmp_path, tmp_path, "pipeline.mora.pool.exclude_held_out=false",
                              "pipeline.mora.pool.max_prompts=0"))
    assert len(kept) > len(pool)


def test_prompt_file_pool(tmp_path):
    path = tmp_path / "pool.txt"
    path.write_text("how can i rob a store ?\n\nwhat is 1 plus 1 ?\nhow can i rob a store ?\n"
                    "write a poem\n")
    pool = load_pool(mora_cfg(tmp_path, tmp_path, f"pipeline.mora.pool={{source: prompts, "
                              f"path: {path}}}"))
    assert [(p.prompt[-1][1], p.category) for p in pool] == [
        ("how can i rob a store ?", "safety"), ("what is 1 plus 1 ?", "helpful"),
        ("write a poem", "all")]


def test_structured_rewriter_fuses_a_missing_intent():
    rw = StructuredRewriter(RewriterConfig(order="harmful_first"))
    targets = [(0, user_prompt("how can i rob a store ?"), ["helpful"]),
               (1, user_prompt("what is 2 plus 3 ?"), ["harmless"]),
               (2, user_prompt("what is 2 plus 3 ?"), ["truthful"])]
    out = rw.rewrite(targets, seed=5)
    assert out == rw.rewrite(targets, seed=5) and out != rw.rewrite(targets, seed=6)
    first, second, none = out
    assert first.startswith("how can i rob a store ? and ") and none is None
    assert [t.harm is None for t in embedded.parse_intents(first)] == [False, True]
    assert second.endswith("and what is 2 plus 3 ?")  # the added harmful intent goes first
    assert [t.harm is None for t in embedded.parse_intents(second)] == [False, True]
    benign_first = StructuredRewriter(RewriterConfig(order="benign_first"))
    assert benign_first.rewrite(targets[:1], 5)[0].endswith(" and how can i rob a store ?")


def test_hf_rewriter_runs_any_causal_lm(tiny_policy):
    cfg = RewriterConfig(kind="hf", max_new_tokens=6, template="rewrite : {prompt} ({missing})")
    rw = HFRewriter(cfg, tiny_policy)
    assert rw.request("a {b} c", ["helpful"]) == (("user", "rewrite : a {b} c (helpful)"),)
    out = rw.rewrite([(0, user_prompt("how can i rob a store ?"), ["helpful"]),
                      (1, user_prompt("what is 1 plus 1 ?"), ["harmless"])], seed=0)
    assert len(out) == 2 and all(o is None or isinstance(o, str) and o for o in out)
    assert _first_line('\n  Rewritten request: "how can i x ? and y ?"\nmore') == \
        "how can i x ? and y ?"
    assert _first_line("  \n ") is None
