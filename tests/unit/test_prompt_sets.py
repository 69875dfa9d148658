"""Named eval prompt sets (pipeline.eval.prompt_sets), per-set score columns, {data_root},
preferences mixed from several sources, and the error a user without the data gets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from prefvec_ds import PrefvecError
from prefvec_ds.config.evaluation import PromptSetConfig
from prefvec_ds.config.loader import load_config
from prefvec_ds.data.prompts import load_prompt_set, load_prompt_sets
from prefvec_ds.data.sources import load_preference
from prefvec_ds.eval.scorers import mean_scores, score_all, set_columns
from tests.conftest import REPO

pytestmark = pytest.mark.unit
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
SHARED = REPO.parent / "shared" / "data"


def write_csv(path: Path, rows: list[dict]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def texts(name: str, **spec) -> list[str]:
    return [p[-1][1] for p in load_prompt_set(name, PromptSetConfig(**spec))]


def test_each_reader_keeps_its_subset(tmp_path):
    xs = write_csv(tmp_path / "xs.csv", [{"id": 1, "prompt": "kill a process", "label": "safe"},
                                         {"id": 2, "prompt": "kill a man", "label": "unsafe"}])
    assert texts("xs", source="xstest", path=xs, subset="safe") == ["kill a process"]
    assert texts("xs", source="xstest", path=xs) == ["kill a process", "kill a man"]
    hb = write_csv(tmp_path / "hb.csv", [
        {"Behavior": "b1", "FunctionalCategory": "standard"},
        {"Behavior": "b2", "FunctionalCategory": "contextual"}])
    assert texts("hb", source="harmbench", path=hb) == ["b1"]  # standard by default
    assert texts("hb", source="harmbench", path=hb, subset="contextual") == ["b2"]
    adv = write_csv(tmp_path / "adv.csv", [{"goal": "g1", "target": "Sure"}])
    assert texts("adv", source="advbench", path=adv) == ["g1"]
    bt = tmp_path / "bt.json"
    bt.write_text(json.dumps([{"prompt": "p1", "category": "a"}, {"prompt": "p2",
                                                                  "category": "b"}]))
    assert texts("bt", source="beavertails", path=str(bt), subset="b") == ["p2"]
    al = tmp_path / "al.json"
    al.write_text(json.dumps([{"instruction": "i1", "dataset": "koala", "output": "o"},
                              {"instruction": "i1", "dataset": "koala", "output": "o2"}]))
    assert texts("al", source="alpaca_eval", path=str(al)) == ["i1"]  # distinct prompts
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\nsecond\n")
    assert texts("txt", source="prompts", path=str(txt)) == ["first", "second"]


def test_max_prompts_is_a_stable_spread_subset_in_file_order(tmp_path):
    rows = [{"prompt": f"prompt {c} {i}", "category": c} for c in "abcd" for i in range(50)]
    path = tmp_path / "bt.json"
    path.write_text(json.dumps(rows))
    kept = texts("bt", source="beavertails", path=str(path), max_prompts=40)
    assert kept == texts("bt", source="beavertails", path=str(path), max_prompts=40)
    order = [r["prompt"] for r in rows]
    assert len(kept) == 40 and kept == sorted(kept, key=order.index)
    # a file sorted by category: every category is represented, not the first 40 rows
    assert {p.split()[1] for p in kept} == set("abcd")


def test_scores_split_into_axis_at_set_columns():
    class Two:
        name, axes = "two", ("refusal", "reward")

        def score(self, prompts, responses):
            return {"refusal": [1.0, 0.0, 1.0, 0.0], "reward": [0.5, 1.5, 2.5, 3.5]}

    sets = ["harmful", "harmful", "benign", "benign"]
    scores = score_all([Two()], [()] * 4, ["a"] * 4, sets, {"harmful": ["refusal"]})
    assert list(scores) == ["refusal@harmful", "refusal@benign", "reward@benign"]
    means = mean_scores(scores)
    assert means["refusal@harmful"] == 0.5 and means["n_refusal@harmful"] == 2
    assert means["refusal@benign"] == 0.5 and means["reward@benign"] == 3.0
    assert set_columns(Two.axes, {"harmful": ["refusal"], "benign": []}) == list(scores)
    with pytest.raises(PrefvecError, match="prompt_sets.harmful.axes: 'cost'"):
        score_all([Two()], [()] * 4, ["a"] * 4, sets, {"harmful": ["cost"]})
    assert list(score_all([Two()], [()] * 4, ["a"] * 4)) == ["refusal", "reward"]  # no sets


def test_data_root_fills_every_data_path_and_is_required_when_used(tmp_path):
    sets = ("pipeline.eval.prompt_sets={x: {source: xstest, path: '{data_root}/x.csv'}}")
    cfg = load_config(QUICKSTART, [f"data.root={tmp_path}/", sets,
                                   "data.preferences.helpful.source=hh_rlhf",
                                   "data.preferences.helpful.path='{data_root}/hh.jsonl.gz'"])
    assert cfg.pipeline.eval.prompt_sets["x"].path == f"{tmp_path}/x.csv"
    assert cfg.data.preferences["helpful"].path == f"{tmp_path}/hh.jsonl.gz"
    with pytest.raises(PrefvecError, match=r"data\.root: expected a folder \(pipeline\.eval\."
                                           r"prompt_sets\.x\.path"):
        load_config(QUICKSTART, [sets])


def test_missing_data_names_what_to_download(tmp_path):
    spec = PromptSetConfig(source="advbench", path=str(tmp_path / "harmful_behaviors.csv"))
    with pytest.raises(PrefvecError, match="does not exist .advbench data.: download "
                                           "harmful_behaviors.csv from github.com/llm-attacks"):
        load_prompt_set("adv", spec)
    cfg = load_config(QUICKSTART, [f"data.root={tmp_path}",
                                   "data.preferences.helpful.source=hh_rlhf",
                                   "data.preferences.helpful.path='{data_root}/hh.jsonl.gz'"])
    with pytest.raises(PrefvecError, match="hh.jsonl.gz does not exist .hh_rlhf data.: "
                                           "download Anthropic/hh-rlhf"):
        load_preference("helpful", cfg.data.preferences["helpful"], cfg.data)


def test_a_preference_mixes_sources_pair_by_pair(tmp_path):
    safety = tmp_path / "safety.json"
    safety.write_text(json.dumps([{"prompt": f"s{i}", "response": [f"safe{i}", f"worse{i}"]}
                                  for i in range(5)]))
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"prompt": f"o{i}", "chosen": "c", "rejected": "r"})
                             + "\n" for i in range(2)))
    cfg = load_config(QUICKSTART, [
        f"data.preferences={{harmless: {{source: safety_pairs, path: {safety}, max_pairs: 5, "
        f"also: [{{source: jsonl, path: {other}}}]}}}}"])
    pairs = load_preference("harmless", cfg.data.preferences["harmless"], cfg.data)
    assert [p.prompt[-1][1] for p in pairs] == ["s0", "o0", "s1", "o1", "s2"]
    assert (pairs[0].chosen, pairs[0].rejected) == ("safe0", "worse0")


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
def test_the_public_sets_read_from_shared_data():
    root = SHARED
    sets = {
        "alpaca_eval": PromptSetConfig("alpaca_eval", str(
            root / "alpaca_eval" / "gpt4_1106_preview_model_outputs.json"), max_prompts=0),
        "advbench": PromptSetConfig("advbench", str(root / "advbench" / "harmful_behaviors.csv"),
                                    max_prompts=0),
        "harmbench": PromptSetConfig("harmbench", str(
            root / "harmbench" / "behavior_datasets" / "harmbench_behaviors_text_all.csv"),
            max_prompts=0),
        "beavertails": PromptSetConfig("beavertails", str(
            root / "pku_saferlhf" / "BeaverTails-Evaluation.json"), max_prompts=0),
        "xstest": PromptSetConfig("xstest", str(root / "xstest" / "xstest_prompts.csv"),
                                  subset="safe", max_prompts=0),
    }
    prompts, names = load_prompt_sets(sets)
    counts = {n: names.count(n) for n in sets}
    assert counts["alpaca_eval"] == 805 and counts["xstest"] == 250, counts
    assert counts["advbench"] >= 500 and counts["beavertails"] >= 690, counts
    assert 150 <= counts["harmbench"] <= 250, counts  # the standard behaviours
