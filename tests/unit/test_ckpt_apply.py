"""apply_vectors / remove_vectors on a loaded pico Llama, and vector-stats figures."""

from __future__ import annotations

import pytest
import torch

from prefvec_ds import PrefvecError
from prefvec_ds.ckpt import apply_vectors, remove_vectors
from prefvec_ds.ckpt.stats import vector_stats
from prefvec_ds.ckpt.vector import compute_vector
from prefvec_ds.cli import main
from tests.ckpt_fixtures import PICO, write_hf_folder

pytestmark = pytest.mark.unit


def _pico(seed: int, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**PICO, tie_word_embeddings=tie)).float().eval()


def _vector_from_models(tmp_path, name, plus, minus):
    """HF folders of two models -> a saved vector (the HF-folder input path of `prefvec vector`)."""
    write_hf_folder(tmp_path / f"{name}_p", plus.state_dict())
    write_hf_folder(tmp_path / f"{name}_m", minus.state_dict())
    compute_vector(tmp_path / f"{name}_p", tmp_path / f"{name}_m", tmp_path / name)
    return tmp_path / name


def _sd(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_apply_then_remove_restores_the_model(tmp_path):
    base, p, m = _pico(0, tie=False), _pico(1, tie=False), _pico(2, tie=False)
    vec = _vector_from_models(tmp_path, "v", p, m)
    before = _sd(base)
    apply_vectors(base, {vec: 0.5})
    for name, t in base.state_dict().items():
        want = before[name] + 0.5 * (p.state_dict()[name] - m.state_dict()[name])
        assert torch.allclose(t, want, atol=1e-6), name
    remove_vectors(base, {vec: 0.5})
    assert all(torch.allclose(t, before[n], atol=1e-6) for n, t in base.state_dict().items())


def test_apply_with_pair_syntax_bf16_model_and_generate(tmp_path):
    base, p, m = _pico(0), _pico(1), _pico(2)
    write_hf_folder(tmp_path / "p", p.state_dict())
    write_hf_folder(tmp_path / "m", m.state_dict())
    model = base.to(torch.bfloat16)
    before = _sd(model)
    apply_vectors(model, {f"{tmp_path / 'p'},{tmp_path / 'm'}": -1.0})
    name = "model.layers.0.mlp.up_proj.weight"
    want = (before[name].float() - (p.state_dict()[name] - m.state_dict()[name])).bfloat16()
    assert torch.equal(model.state_dict()[name], want)
    out = model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_apply_refuses_wrong_architecture(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    vec = _vector_from_models(tmp_path, "v", _pico(1), _pico(2))
    other = LlamaForCausalLM(LlamaConfig(**dict(PICO, intermediate_size=48), tie_word_embeddings=True))
    before = _sd(other)
    with pytest.raises(PrefvecError, match="mlp.gate_proj.weight: shape"):
        apply_vectors(other, {vec: 1.0})
    assert all(torch.equal(t, before[n]) for n, t in other.state_dict().items())  # untouched


def test_vector_stats_norms_and_cosines(tmp_path, capsys):
    a = _vector_from_models(tmp_path, "a", _pico(1), _pico(2))
    neg = _vector_from_models(tmp_path, "neg", _pico(2), _pico(1))
    c = _vector_from_models(tmp_path, "c", _pico(3), _pico(4))
    stats = vector_stats([str(a), str(neg), str(c)])
    p, m = _pico(1).state_dict(), _pico(2).state_dict()
    norm = torch.sqrt(sum(((p[k] - m[k]).double() ** 2).sum() for k in p if k != "lm_head.weight"))
    assert stats["total"][0] == pytest.approx(float(norm), rel=1e-6)
    assert stats["cosine"][0][1] == pytest.approx(-1.0, abs=1e-9)
    assert abs(stats["cosine"][0][2]) < 0.2  # independent random vectors are near orthogonal
    assert {"layer 0", "layer 1", "model.embed_tokens"} <= set(stats["layers"])
    assert main(["vector-stats", str(a), str(c), "--json", str(tmp_path / "s.json")]) == 0
    assert "cosine" in capsys.readouterr().out and (tmp_path / "s.json").is_file()
