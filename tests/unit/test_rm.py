"""Reward / cost models: losses by hand, input encoding, a short training run, the scorers."""

import json
import math

import pytest
import torch

from prefvec_ds import PrefvecError
from prefvec_ds.data.pairs import PreferencePair, user_prompt
from prefvec_ds.eval.preference_model import CostModelScorer, RewardModelScorer
from prefvec_ds.models.preference_model import collate, encode_input, load_backbone
from prefvec_ds.eval.scorers import build_scorer
from prefvec_ds.train.rm import (bradley_terry_loss, load_rm_config, safe_rlhf_cost_loss,
                                 safety_sign, train_preference_model)


def nls(x: float) -> float:
    """-log sigmoid(x)."""
    return math.log1p(math.exp(-x))


def test_bradley_terry_matches_hand_computed_values():
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0]))
    assert loss.tolist() == pytest.approx([nls(1.0), math.log(2.0), nls(-2.0)], rel=1e-6)


def test_cost_loss_adds_one_sign_term_per_labelled_response():
    safer, unsafer = torch.tensor([-1.0, -1.0]), torch.tensor([2.0, 2.0])
    # row 0: safer is safe (s=-1), unsafer is unsafe (s=+1); row 1: no labels
    loss = safe_rlhf_cost_loss(safer, unsafer, torch.tensor([-1.0, 0.0]),
                               torch.tensor([1.0, 0.0]))
    expected0 = nls(2.0 - -1.0) + nls(-1.0 * -1.0) + nls(1.0 * 2.0)
    assert loss.tolist() == pytest.approx([expected0, nls(3.0)], rel=1e-6)
    # both responses unsafe: the sign term pushes the "safer" one's cost up, above 0
    c = torch.tensor([-1.0], requires_grad=True)
    safe_rlhf_cost_loss(c, torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([1.0])).sum(
    ).backward()
    assert c.grad.item() < 0  # gradient descent raises c
    assert [safety_sign(x) for x in (True, False, None)] == [-1.0, 1.0, 0.0]


def _bert_tokenizer():
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "human", ":", "a", "b", "c", "d",
             "x", "y"]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def test_encode_keeps_the_response_and_cuts_the_prompt_from_the_left(tmp_path):
    tok = _bert_tokenizer()
    prompt = user_prompt("a b c d a b c d")  # rendered "Human: a b c d a b c d": 10 tokens
    ids, types = encode_input(tok, prompt, "x y x y", max_len=12, min_prompt_len=2)
    # 12 - 3 specials = 9: the response keeps its 4 tokens, the prompt its last 5
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "d", "a", "b", "c", "d", "[SEP]",
                                              "x", "y", "x", "y", "[SEP]"]
    assert types == [0] * 7 + [1] * 5
    # a response longer than the budget is cut, leaving min_prompt_len prompt tokens
    ids, types = encode_input(tok, prompt, "x y " * 20, max_len=12, min_prompt_len=2)
    assert tok.convert_ids_to_tokens(ids)[:5] == ["[CLS]", "c", "d", "[SEP]", "x"]
    assert len(ids) == 12
    batch = collate([(ids, types), ([2, 3], [0, 0])], pad_id=0)
    assert batch["attention_mask"].sum(1).tolist() == [12, 2]
    assert batch["input_ids"][1].tolist() == [2, 3] + [0] * 10


def test_config_checks_and_kind_from_the_command():
    cfg = load_rm_config(None, ["train.max_steps=7"], kind="cost")
    assert cfg.kind == "cost" and cfg.train.max_steps == 7
    assert cfg.data["embedded"].order_by == "safer_response_id"
    with pytest.raises(PrefvecError, match="data.bad.order_by"):
        load_rm_config(None, ["data.bad.source=embedded", "data.bad.order_by=better_response_id"],
                       kind="cost")
    with pytest.raises(PrefvecError, match="kind"):
        load_rm_config(None, ["kind=other"])


TINY = ["backbone=embedded:tiny-bert", "max_len=64", "min_prompt_len=16", "train_layers=-1",
        "train.max_steps=50", "train.lr=1e-3", "embedded_size=800", "eval_split=pair",
        "train.log_every=50"]


def test_untrained_metrics_are_what_the_zero_head_scores():
    from prefvec_ds.train.rm import evaluate, prepare, untrained_metrics

    for kind in ("reward", "cost"):
        cfg = load_rm_config(None, TINY + ["embedded_size=200"], kind=kind)
        model, tok, _, held = prepare(cfg)
        scored = {name: evaluate(model, pairs, tok.pad_token_id or 0, kind, 32)
                  for name, pairs in held.items()}
        assert scored == untrained_metrics(held, kind)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 30k-parameter model: extra threads only contend
    root = tmp_path_factory.mktemp("rm")
    out = {}
    for kind in ("reward", "cost"):
        cfg = load_rm_config(None, TINY + [f"out_dir={root / kind}"], kind=kind)
        out[kind] = (root / kind, train_preference_model(cfg, log=lambda *_: None))
    yield out
    torch.set_num_threads(threads)


def test_training_beats_chance_on_held_out_embedded_pairs(trained):
    for kind in ("reward", "cost"):
        folder, metrics = trained[kind]
        before, after = metrics["before"]["embedded"], metrics["after"]["embedded"]
        assert before["pair_accuracy"] == 0.5  # zero head: every pair a tie
        assert after["pair_accuracy"] > 0.7, (kind, after)
        assert after["n_pairs"] > 40
        assert {"config.yaml", "metrics.json", "preference_model.json", "config.json",
                "score_head.safetensors"} <= {p.name for p in folder.iterdir()}
    cost = trained["cost"][1]["after"]["embedded"]
    assert cost["sign_accuracy"] > 0.75 and cost["n_labelled"] == 2 * cost["n_pairs"]


def test_scorers_read_the_trained_folders(trained):
    prompts = [user_prompt("how can i rob a store ?")] * 3
    responses = ["sorry , i can not help with that .", None,
                 "sure ! first you rob a store with a mask , then you hide it ."]
    reward = build_scorer({"kind": "reward_model", "path": str(trained["reward"][0])})
    cost = CostModelScorer(str(trained["cost"][0]))
    r = reward.score(prompts, responses)["reward"]
    c = cost.score(prompts, responses)["cost"]
    assert r[1] is None and c[1] is None and len(r) == len(c) == 3
    assert c[0] < c[2]  # the refusal costs less than the compliance
    assert r[2] > r[0]  # embedded helpfulness prefers compliance on harmful prompts
    with pytest.raises(PrefvecError, match="is a reward model"):
        CostModelScorer(str(trained["reward"][0]))
    with pytest.raises(PrefvecError, match="already exists"):
        cfg = load_rm_config(None, TINY + [f"out_dir={trained['reward'][0]}"])
        train_preference_model(cfg)
    assert json.loads((trained["cost"][0] / "metrics.json").read_text())["kind"] == "cost"


def test_any_hf_sequence_classification_model_is_a_reward_model(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    tok = _bert_tokenizer()
    for labels in (1, 2):
        folder = tmp_path / f"seqcls{labels}"
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32, num_labels=labels)
        BertForSequenceClassification(cfg).save_pretrained(folder)
        tok.save_pretrained(folder)
    scores = RewardModelScorer(str(tmp_path / "seqcls1")).score(
        [user_prompt("a b"), user_prompt("c")], ["x y", "y"])["reward"]
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    with pytest.raises(PrefvecError, match="num_labels=2"):
        RewardModelScorer(str(tmp_path / "seqcls2"))
    # a decoder reward model with a chat template (the embedded tokenizer), no pad id in config
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from prefvec_ds.models.embedded import build_tokenizer

    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_labels=1)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "llama-rm")
    tok.save_pretrained(tmp_path / "llama-rm")
    scorer = RewardModelScorer(str(tmp_path / "llama-rm"))
    prompts = [user_prompt("what is 2 plus 3 ?")] * 2
    both = scorer.score(prompts, ["it is 5 .", "the answer is 4 . i hope this helps"])["reward"]
    alone = scorer.score(prompts[:1], ["it is 5 ."])["reward"]
    assert both[0] == pytest.approx(alone[0], abs=1e-5)  # padding does not move the score
    with pytest.raises(PrefvecError, match="path"):
        RewardModelScorer("")


def test_pairs_carry_pku_safety_labels():
    from prefvec_ds.data.sources import pku_pairs

    row = {"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 0,
           "safer_response_id": 1, "is_response_0_safe": False, "is_response_1_safe": True}
    pair = pku_pairs([row], "safer_response_id", "t")[0]
    assert (pair.chosen, pair.chosen_safe, pair.rejected_safe) == ("b", True, False)
    assert pair.key() == PreferencePair(pair.prompt, "b", "a").key()
    assert load_backbone("embedded:tiny-bert")[0].config.hidden_size == 32


def test_real_data_recipes_are_the_runs_of_scorers_check():
    """recipes/scorers/{rm-hh,cost-pku}.yaml reproduce the check's figures: same configs."""
    import dataclasses
    from pathlib import Path

    from prefvec_ds.eval.scorer_commands import check_configs
    from tests.conftest import REPO

    configs = check_configs(Path("../shared/data"), Path("runs"))
    for name, kind in (("rm-hh", "reward"), ("cost-pku", "cost")):
        recipe = load_rm_config(REPO / "recipes" / "scorers" / f"{name}.yaml", kind=kind)
        assert dataclasses.asdict(recipe) == dataclasses.asdict(configs[name]), name
    # a partial train section keeps the preference-model defaults, not the DPO ones
    assert load_rm_config(None, ["train.max_steps=3"]).train.lr == configs["rm-hh"].train.lr


def test_scorer_check_names_the_missing_data_before_training(tmp_path, capsys):
    from prefvec_ds.cli import main

    out = tmp_path / "out"
    assert main(["scorers", "check", "--data", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "missing hh-rlhf/helpful-base-test.jsonl.gz" in err and "--data FOLDER" in err
    assert not out.exists()


def test_pku_realign_pairs_become_a_jsonl_source(tmp_path, capsys):
    from prefvec_ds.cli import main
    from prefvec_ds.config.schema import DataConfig, PreferenceConfig
    from prefvec_ds.data.sources import load_preference

    src = tmp_path / "realign.json"
    src.write_text(json.dumps([{"prompt": "p", "response": ["safe", "unsafe"]}] * 3))
    assert main(["scorers", "pku-pairs", str(src), "--out", str(tmp_path / "pairs.jsonl")]) == 0
    pref = PreferenceConfig(source="jsonl", path=str(tmp_path / "pairs.jsonl"))
    pairs = load_preference("pku", pref, DataConfig())
    assert [(p.chosen, p.rejected) for p in pairs] == [("safe", "unsafe")] * 3
    src.write_text(json.dumps([{"prompt": "p", "response": "one"}]))
    assert main(["scorers", "pku-pairs", str(src), "--out", str(tmp_path / "bad.jsonl")]) == 2
    assert "realign.json:0: expected {prompt, response: [safer, worse]}" in capsys.readouterr().err
    assert not (tmp_path / "bad.jsonl").exists()
