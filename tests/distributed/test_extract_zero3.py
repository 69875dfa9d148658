"""`prefvec vector` / `prefvec merge` on real DeepSpeed ZeRO-3 checkpoints (2 and 3 ranks) against
DeepSpeed's own gather (`get_fp32_state_dict_from_zero_checkpoint`), and the merged model loads in
transformers and generates. Checkpoints are built once per session by ckpt_fixtures.zero3_sets."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from prefvec_ds.ckpt.safetensors_io import SafetensorsFolder
from prefvec_ds.ckpt.sources import open_vector
from prefvec_ds.ckpt.stats import vector_stats
from prefvec_ds.cli import main
from tests.ckpt_fixtures import reference_state_dict, zero3_sets  # noqa: F401

pytestmark = pytest.mark.dist


def _cli(*args) -> int:
    return main([str(a) for a in args])


def _vector_error(vec_dir: Path, plus: Path, minus: Path) -> float:
    """Max |phi - (P - M)| over every parameter (tied aliases through the manifest)."""
    ref_p, ref_m = reference_state_dict(plus), reference_state_dict(minus)
    vec = open_vector(vec_dir)
    assert set(vec.names()) | set(vec.aliases) == set(ref_p)
    err = 0.0
    for name, p in ref_p.items():
        got = vec.read(vec.aliases.get(name, name)).float().view(p.shape)
        err = max(err, float((got - (p - ref_m[name])).abs().max()))
    return err


@pytest.mark.parametrize("plus_set,minus_set,fast", [
    ("w2_fp32_tied", "w2_fp32_tied", True),       # W=2, fp32, tied, 4+ sub-groups
    ("w3_bf16_frozen", "w3_bf16_frozen", True),   # W=3, bf16_ prefix, frozen, padding over ranks
    ("w2_fp32_tied", "w3_fp32_tied", False),      # W=2 vs W=3 and other sub-groups: named path
])
def test_vector_equals_deepspeed_gather(zero3_sets, tmp_path, capsys, plus_set, minus_set, fast):
    plus, minus = zero3_sets[plus_set] / "plus", zero3_sets[minus_set] / "minus"
    assert _cli("vector", "--plus", plus, "--minus", minus, "--out", tmp_path / "v",
                "--workers", 2) == 0
    assert ("flat fast path" in capsys.readouterr().out) == fast
    err = _vector_error(tmp_path / "v", plus, minus)
    print(f"max abs error vs zero_to_fp32 ({plus_set} - {minus_set}): {err:.3g}")
    assert err == 0.0  # same fp32 values subtracted in the same precision: bit-exact


def test_merge_equals_reference_loads_and_generates(zero3_sets, tmp_path):
    from transformers import AutoModelForCausalLM

    w2, w3 = zero3_sets["w2_fp32_tied"], zero3_sets["w3_fp32_tied"]
    assert _cli("vector", "--plus", w3 / "plus", "--minus", w3 / "minus", "--out", tmp_path / "v3") == 0
    assert _cli("merge", "--base", w2 / "base", "--vector", f"{w2 / 'plus'},{w2 / 'minus'}=0.7",
                "--vector", f"{tmp_path / 'v3'}=-0.3", "--out", tmp_path / "merged",
                "--max-shard-size", "20KB") == 0
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    base = SafetensorsFolder(w2 / "base")
    p2, m2 = reference_state_dict(w2 / "plus"), reference_state_dict(w2 / "minus")
    p3, m3 = reference_state_dict(w3 / "plus"), reference_state_dict(w3 / "minus")
    merged = SafetensorsFolder(tmp_path / "merged")
    assert set(merged.names()) == set(base.names())
    err = 0.0
    for name in base.names():
        want = base.read(name).view(p2[name].shape) + 0.7 * (p2[name] - m2[name]) \
            - 0.3 * (p3[name] - m3[name])
        err = max(err, float((merged.read(name).view(want.shape) - want).abs().max()))
    print(f"merge max abs error vs reference: {err:.3g}")
    assert err < 1e-6
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    for name, t in model.state_dict().items():
        assert torch.isfinite(t).all(), name
    out = model.generate(torch.tensor([[1, 4, 9, 16]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def test_merge_zero3_base_bf16(zero3_sets, tmp_path):
    from transformers import AutoModelForCausalLM

    w2 = zero3_sets["w2_fp32_tied"]
    assert _cli("merge", "--base", w2 / "plus", "--vector", f"{w2 / 'minus'},{w2 / 'plus'}",
                "--out", tmp_path / "m", "--dtype", "bf16", "--config-from", w2 / "base") == 0
    minus = reference_state_dict(w2 / "minus")  # plus + 1*(minus - plus) == minus
    merged = SafetensorsFolder(tmp_path / "m")
    for name, t in minus.items():
        assert torch.allclose(merged.read(name).float().view(t.shape), t, atol=1e-2), name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.dtype == torch.bfloat16
    model.generate(torch.tensor([[3, 2, 1]]), max_new_tokens=2, do_sample=False)


def test_bad_real_checkpoints_exit_2_without_output(zero3_sets, tmp_path, capsys):
    src = zero3_sets["w3_bf16_frozen"]
    broken = tmp_path / "minus"
    shutil.copytree(src / "minus", broken)
    victim = broken / "global_step2" / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:1000])
    assert _cli("vector", "--plus", src / "plus", "--minus", broken, "--out", tmp_path / "v") == 2
    assert victim.name in capsys.readouterr().err
    victim.unlink()
    assert _cli("vector", "--plus", src / "plus", "--minus", broken, "--out", tmp_path / "v") == 2
    assert "missing optim-states file of rank 2" in capsys.readouterr().err
    other_arch = zero3_sets["w2_fp32_tied"] / "minus"
    assert _cli("vector", "--plus", src / "plus", "--minus", other_arch, "--out", tmp_path / "v") == 2
    assert "parameter" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


def test_vector_stats_on_real_vectors(zero3_sets, tmp_path):
    w2, w3 = zero3_sets["w2_fp32_tied"], zero3_sets["w3_fp32_tied"]
    _cli("vector", "--plus", w2 / "plus", "--minus", w2 / "minus", "--out", tmp_path / "a")
    _cli("vector", "--plus", w3 / "plus", "--minus", w3 / "minus", "--out", tmp_path / "b",
         "--dtype", "bf16")
    stats = vector_stats([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "a")])
    assert stats["cosine"][0][2] == pytest.approx(1.0, abs=1e-9)
    assert -1.0 <= stats["cosine"][0][1] <= 1.0 and len(stats["layers"]) >= 4
