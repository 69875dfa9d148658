"""`prefvec scorers convert-safe-rlhf`: a tiny score model written the way safe-rlhf saves one
(LlamaForScore: a Llama backbone under model.*, score_head, normalizer buffers, score_* config
fields; pytorch_model.bin or sharded safetensors) becomes a HF LlamaForSequenceClassification
whose scores equal the backbone's last-token hidden state @ score_head, computed by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from prefvec_ds.cli import main
from prefvec_ds.models.embedded import build_tokenizer

pytestmark = pytest.mark.timeout(300)
SCORE_FIELDS = {"score_dim": 1, "bias": False, "score_type": "reward", "do_normalize": False,
                "normalizer_type": "ExponentialMovingAverage", "momentum": 0.9, "mean": [0.3],
                "var": [2.25]}


def tiny_backbone(tok, seed=0):
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    return LlamaModel(config).eval()


def write_score_model(folder, fmt="bin", dtype=torch.float32, bias=None, **fields):
    """A LlamaForScore folder as safe-rlhf writes it; returns (backbone, score_head weight)."""
    tok = build_tokenizer()
    backbone = tiny_backbone(tok)
    head = torch.randn(1, 32, generator=torch.Generator().manual_seed(1))
    state = {f"model.{k}": v.to(dtype) for k, v in backbone.state_dict().items()}
    state["score_head.weight"] = head.to(dtype)
    if bias is not None:
        state["score_head.bias"] = torch.tensor([bias], dtype=dtype)
    state.update({"normalizer.mean": torch.tensor([0.3]), "normalizer.var": torch.tensor([2.25]),
                  "normalizer.count": torch.tensor([1024])})
    folder.mkdir(parents=True)
    config = {**backbone.config.to_dict(), "architectures": ["LlamaForScore"],
              **SCORE_FIELDS, **fields, "bias": bias is not None}
    (folder / "config.json").write_text(json.dumps(config))
    tok.save_pretrained(folder)
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:  # two shards and an index, as save_pretrained(safe_serialization=True) writes
        from safetensors.torch import save_file

        names = list(state)
        shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                  "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        for file, keys in shards.items():
            save_file({k: state[k].contiguous() for k in keys}, str(folder / file))
        index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    backbone.load_state_dict({k[6:]: v.float() for k, v in state.items()
                              if k.startswith("model.")})
    return backbone, state["score_head.weight"].float(), tok


def batch(tok):
    texts = ["<|user|> what is the capital of france <|end|> <|assistant|> paris",
             "<|user|> hello <|end|>", "<|assistant|> i can not help with that <|end|>"]
    return tok(texts, return_tensors="pt", padding=True)


def by_hand(backbone, head, enc) -> torch.Tensor:
    """safe-rlhf's end_scores: the last attended token's hidden state @ score_head."""
    with torch.no_grad():
        hidden = backbone(**enc).last_hidden_state
    end = torch.tensor([int(m.nonzero()[-1]) for m in enc["attention_mask"]])
    return hidden[torch.arange(len(end)), end] @ head[0]


@pytest.mark.parametrize("fmt, dtype", [("bin", torch.float32), ("safetensors", torch.float32),
                                        ("safetensors", torch.bfloat16)])
def test_converted_scores_equal_the_last_token_hidden_state_times_score_head(tmp_path, fmt,
                                                                              dtype):
    from transformers import AutoModelForSequenceClassification

    backbone, head, tok = write_score_model(tmp_path / "src", fmt, dtype)
    out = tmp_path / "hf"
    assert main(["scorers", "convert-safe-rlhf", str(tmp_path / "src"), "--out", str(out),
                 "--max-shard-size", "20KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "score.weight" in index and not any(k.startswith(("score_head", "normalizer"))
                                               for k in index)
    model = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_labels == 1
    enc = batch(tok)
    assert enc["attention_mask"].sum(1).tolist() != [enc["input_ids"].shape[1]] * 3  # padded
    with torch.no_grad():
        got = model(**enc).logits[:, 0]
    torch.testing.assert_close(got, by_hand(backbone, head, enc), rtol=1e-5, atol=1e-5)
    side = json.loads((out / "safe_rlhf_score.json").read_text())
    assert side["score_type"] == "reward" and side["score_head_scale"] == 1.0
    from prefvec_ds.eval.scorers import build_scorer

    scorer = build_scorer({"kind": "reward_model", "path": str(out)})
    values = scorer.score([(("user", "hello"),)] * 2, ["paris", None])["reward"]
    assert isinstance(values[0], float) and values[1] is None


def test_cost_model_scale_normalisation_is_folded_into_the_head(tmp_path):
    from transformers import AutoModelForSequenceClassification

    backbone, head, tok = write_score_model(tmp_path / "src", "safetensors", score_type="cost",
                                            do_normalize=True)
    assert main(["scorers", "convert-safe-rlhf", str(tmp_path / "src"), "--out",
                 str(tmp_path / "hf")]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    enc = batch(tok)
    with torch.no_grad():
        got = model(**enc).logits[:, 0]
    want = by_hand(backbone, head, enc) / (math.sqrt(2.25) + 1e-8)  # safe-rlhf's 'scale'
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"bias": 0.5}, "score_head.bias is not zero"),
    ({"do_normalize": True}, "affine normalisation"),
    ({"score_dim": 2}, "score_dim: expected 1"),
    ({"architectures": ["LlamaForCausalLM"]}, "expected a safe-rlhf LlamaForScore"),
])
def test_unconvertible_models_exit_2_and_leave_nothing(tmp_path, capsys, change, message):
    bias = change.pop("bias", None)
    write_score_model(tmp_path / "src", "bin", bias=bias, **change)
    out = tmp_path / "hf"
    assert main(["scorers", "convert-safe-rlhf", str(tmp_path / "src"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["src"]


def test_missing_source_is_one_line(tmp_path, capsys):
    assert main(["scorers", "convert-safe-rlhf", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "hf")]) == 2
    assert "no config.json" in capsys.readouterr().err
