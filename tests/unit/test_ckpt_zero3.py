"""ZeRO-3 reader and vector/merge on synthetic checkpoints (no deepspeed; padding is NaN)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prefvec_ds.ckpt.merge import merge_vectors
from prefvec_ds.ckpt.safetensors_io import SafetensorsFolder
from prefvec_ds.ckpt.sources import open_vector, open_vector_arg
from prefvec_ds.ckpt.vector import compute_vector
from prefvec_ds.ckpt.zero3 import Zero3Checkpoint
from prefvec_ds.cli import main
from tests.ckpt_fixtures import pico_state_dict, write_hf_folder, write_synthetic_zero3

pytestmark = pytest.mark.unit


def _read_all(src) -> dict:
    out = {}
    for name in src.names():
        buf = torch.empty(int(torch.Size(src.shape(name)).numel()))
        src.add_into(name, buf, copy=True)
        out[name] = buf.view(src.shape(name))
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 5, 11])
def test_reads_every_param_exactly_and_never_padding(tmp_path, world):
    sd = pico_state_dict(tiny=True)  # 'layers.1.gate' has 1 element: padding spans W-1 ranks
    ckpt = Zero3Checkpoint(write_synthetic_zero3(tmp_path / "c", sd, world, sub_group=60 // world))
    assert ckpt.layout.world == world and len(ckpt.layout.groups) > 1
    got = _read_all(ckpt)
    assert set(got) == set(sd)
    for name, t in sd.items():
        assert torch.equal(got[name], t), name  # NaN padding would make this fail


def test_natural_rank_order_and_bf16_prefix(tmp_path):
    sd = pico_state_dict()
    ckpt = Zero3Checkpoint(write_synthetic_zero3(tmp_path / "c", sd, 11, prefix="bf16_"))
    assert [p.name.split("_")[4] for p in ckpt.optim_files] == [str(r) for r in range(11)]
    assert torch.equal(_read_all(ckpt)["head.weight"], sd["head.weight"])


def test_frozen_and_shared_params(tmp_path):
    sd = pico_state_dict()
    folder = write_synthetic_zero3(tmp_path / "c", sd, 3, frozen=("layers.0.norm.weight",),
                                   shared={"tied.weight": "embed.weight"})
    ckpt = Zero3Checkpoint(folder)
    assert "layers.0.norm.weight" in ckpt.names() and ckpt.aliases == {"tied.weight": "embed.weight"}
    assert torch.equal(_read_all(ckpt)["layers.0.norm.weight"], sd["layers.0.norm.weight"])


@pytest.mark.parametrize("w_plus,w_minus,sg_minus", [(2, 2, 40), (2, 3, 40), (3, 2, 7), (4, 1, 1000)])
def test_vector_same_and_different_layouts(tmp_path, w_plus, w_minus, sg_minus):
    plus, minus = pico_state_dict(1, tiny=True), pico_state_dict(2, tiny=True)
    p = write_synthetic_zero3(tmp_path / "p", plus, w_plus)
    m = write_synthetic_zero3(tmp_path / "m", minus, w_minus, sub_group=sg_minus)
    manifest = compute_vector(p, m, tmp_path / "vec", workers=2)
    assert manifest["fast_flat_path"] == (w_plus == w_minus and sg_minus == 40)
    vec = open_vector(tmp_path / "vec")
    for name in plus:
        assert torch.equal(vec.read(name).view(plus[name].shape), plus[name] - minus[name])


def test_merge_hf_base_two_vectors_and_pair_syntax(tmp_path):
    base, p1, m1, p2, m2 = (pico_state_dict(s) for s in range(5))
    write_hf_folder(tmp_path / "base", base, {"model_type": "toy", "torch_dtype": "float32"})
    (tmp_path / "base" / "tokenizer.json").write_text("{}")
    write_synthetic_zero3(tmp_path / "p1", p1, 2)
    write_synthetic_zero3(tmp_path / "m1", m1, 3)
    write_synthetic_zero3(tmp_path / "p2", p2, 2)
    write_synthetic_zero3(tmp_path / "m2", m2, 2)
    compute_vector(tmp_path / "p1", tmp_path / "m1", tmp_path / "v1")
    vectors = [(open_vector_arg(str(tmp_path / "v1")), 0.5),
               (open_vector_arg(f"{tmp_path / 'p2'},{tmp_path / 'm2'}"), -1.0)]
    merge_vectors(tmp_path / "base", vectors, tmp_path / "out", max_shard_size=200, workers=3)
    out = SafetensorsFolder(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    for name, t in base.items():
        want = t + 0.5 * (p1[name] - m1[name]) - (p2[name] - m2[name])
        assert torch.allclose(out.read(name).view(t.shape), want, atol=1e-6), name


def test_merge_zero3_base_writes_aliases_and_bf16(tmp_path):
    base = pico_state_dict(0)
    write_synthetic_zero3(tmp_path / "run" / "ckpt", base, 3, shared={"tied.weight": "embed.weight"})
    (tmp_path / "run" / "config.json").write_text('{"model_type": "toy"}')
    write_hf_folder(tmp_path / "p", {k: v + 1 for k, v in base.items()})
    write_hf_folder(tmp_path / "m", base)
    vec = open_vector_arg(f"{tmp_path / 'p'},{tmp_path / 'm'}")
    merge_vectors(tmp_path / "run" / "ckpt", [(vec, 2.0)], tmp_path / "out", dtype="bf16")
    out = SafetensorsFolder(tmp_path / "out")
    assert set(out.names()) == set(base) | {"tied.weight"}
    assert out.dtype_name("embed.weight") == "bf16"
    assert torch.equal(out.read("tied.weight").float(), (base["embed.weight"] + 2).bfloat16().float().view(-1))


def _cli(*args) -> int:
    return main([str(a) for a in args])


def test_errors_name_file_and_parameter(tmp_path, capsys):
    sd = pico_state_dict()
    p = write_synthetic_zero3(tmp_path / "p", sd, 2)
    other = dict(sd, **{"head.weight": torch.zeros(5, 6)})
    m = write_synthetic_zero3(tmp_path / "m", other, 2)
    assert _cli("vector", "--plus", p, "--minus", m, "--out", tmp_path / "v") == 2
    err = capsys.readouterr().err
    assert "head.weight" in err and "shape" in err and not (tmp_path / "v").exists()

    z2 = write_synthetic_zero3(tmp_path / "z2", sd, 2, zero_stage=2)
    assert _cli("vector", "--plus", p, "--minus", z2, "--out", tmp_path / "v") == 2
    assert "zero_stage: expected 3" in capsys.readouterr().err

    (tmp_path / "p" / "global_step1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert _cli("vector", "--plus", p, "--minus", m, "--out", tmp_path / "v") == 2
    assert "missing optim-states file of rank 1" in capsys.readouterr().err


def test_truncated_file_and_existing_output(tmp_path, capsys):
    sd = pico_state_dict()
    p = write_synthetic_zero3(tmp_path / "p", sd, 2)
    m = write_synthetic_zero3(tmp_path / "m", pico_state_dict(1), 2)
    (tmp_path / "v").mkdir()
    assert _cli("vector", "--plus", p, "--minus", m, "--out", tmp_path / "v") == 2
    assert "already exists" in capsys.readouterr().err
    assert _cli("vector", "--plus", p, "--minus", m, "--out", tmp_path / "v", "--overwrite") == 0
    f = tmp_path / "m" / "global_step1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert _cli("vector", "--plus", p, "--minus", m, "--out", tmp_path / "v2") == 2
    err = capsys.readouterr().err
    assert str(f) in err and ("truncated" in err or "corrupt" in err)
    assert not (tmp_path / "v2").exists() and not list(tmp_path.glob(".v2.*"))


def test_nan_in_result_is_refused_without_output(tmp_path, capsys):
    sd = pico_state_dict()
    bad = dict(sd)
    bad["layers.0.proj.weight"] = sd["layers.0.proj.weight"].clone()
    bad["layers.0.proj.weight"][2, 1] = float("inf")
    p = write_synthetic_zero3(tmp_path / "p", bad, 2)
    m = write_synthetic_zero3(tmp_path / "m", sd, 2)
    assert _cli("vector", "--plus", p, "--minus", m, "--out", tmp_path / "v") == 2
    err = capsys.readouterr().err
    assert "layers.0.proj.weight" in err and "NaN/Inf" in err and not (tmp_path / "v").exists()


def test_segments_point_at_the_bytes_torch_load_sees(tmp_path):
    """Our torch-free reader locates each rank's flat partition and frozen fragment in the zip;
    the bytes there are exactly what torch.load returns for them."""
    plus = pico_state_dict(1, tiny=True)
    p = write_synthetic_zero3(tmp_path / "p", plus, 3, frozen=("layers.0.norm.weight",),
                              prefix="bf16_")
    ckpt = Zero3Checkpoint(p)
    for rank, path in enumerate(ckpt.optim_files):
        flats = torch.load(path, weights_only=True)["optimizer_state_dict"]["fp32_flat_groups"]
        for g, want in enumerate(flats):
            got = ckpt._flat[rank][g]
            assert got.numpy().tobytes() == want.numpy().tobytes()  # NaN padding included
    for name in ("embed.weight", "layers.1.gate", "layers.0.norm.weight"):
        segs = ckpt.segments(name)
        assert all(s.file.is_file() for s in segs)
        buf = np.empty(plus[name].numel(), np.float32)
        ckpt.add_into(name, buf, copy=True)
        assert torch.equal(torch.from_numpy(buf).view(plus[name].shape), plus[name]), name


def test_bf16_vector_merges_into_fp16_output(tmp_path):
    base, plus, minus = pico_state_dict(0), pico_state_dict(1), pico_state_dict(2)
    write_hf_folder(tmp_path / "base", {k: v.bfloat16() for k, v in base.items()}, {"dtype": "bfloat16"})
    write_synthetic_zero3(tmp_path / "p", plus, 2, prefix="bf16_")
    write_synthetic_zero3(tmp_path / "m", minus, 3, prefix="bf16_")
    manifest = compute_vector(tmp_path / "p", tmp_path / "m", tmp_path / "v", dtype="bf16")
    assert manifest["dtype"] == "bf16" and open_vector(tmp_path / "v").dtype_name("head.weight") == "bf16"
    merge_vectors(tmp_path / "base", [(open_vector_arg(str(tmp_path / "v")), -0.5)], tmp_path / "o",
                  dtype="fp16")
    out = SafetensorsFolder(tmp_path / "o")
    for name, t in base.items():
        phi = (plus[name] - minus[name]).bfloat16().float()
        want = (t.bfloat16().float() - 0.5 * phi).half()
        assert torch.equal(out.read(name).view(t.shape), want), name


def test_vector_and_merge_commands_never_import_torch(tmp_path):
    """`prefvec vector|merge` run without torch (its import took 2.9 s of a 10 s merge here):
    checkpoints are unpickled by our own allow-listed reader, arithmetic is numpy."""
    import subprocess
    import sys

    base = pico_state_dict(0)
    write_hf_folder(tmp_path / "base", {k: v.bfloat16() for k, v in base.items()},
                    {"dtype": "bfloat16"})
    write_synthetic_zero3(tmp_path / "p", pico_state_dict(1), 2, frozen=("layers.0.norm.weight",))
    write_synthetic_zero3(tmp_path / "m", pico_state_dict(2), 3, frozen=("layers.0.norm.weight",))
    code = f"""
import sys
from prefvec_ds.cli import main
assert main(["vector", "--plus", "{tmp_path / 'p'}", "--minus", "{tmp_path / 'm'}",
             "--out", "{tmp_path / 'v'}", "--dtype", "bf16"]) == 0
assert main(["merge", "--base", "{tmp_path / 'base'}", "--vector", "{tmp_path / 'v'}=0.5",
             "--vector", "{tmp_path / 'p'},{tmp_path / 'm'}=-1", "--out", "{tmp_path / 'o'}"]) == 0
heavy = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "safetensors")]
assert not heavy, heavy
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    out = SafetensorsFolder(tmp_path / "o")
    p, m = pico_state_dict(1), pico_state_dict(2)
    for name, t in base.items():
        phi = (p[name] - m[name]).bfloat16().float()
        want = (t.bfloat16().float() + 0.5 * phi - (p[name] - m[name])).bfloat16()
        got = out.read(name).view(t.shape)
        assert got.dtype == torch.bfloat16
        assert torch.allclose(got.float(), want.float(), atol=1e-2), name


def test_page_cache_fallback_gives_the_same_files(tmp_path, monkeypatch):
    """Where O_DIRECT is refused (or PREFVEC_DIRECT_IO=0), reads and writes go through the page
    cache: same bytes out."""
    from prefvec_ds.ckpt import directio

    base = pico_state_dict(0)
    write_hf_folder(tmp_path / "base", base, {"model_type": "toy"})
    write_synthetic_zero3(tmp_path / "p", pico_state_dict(1), 2, sub_group=25)
    write_synthetic_zero3(tmp_path / "m", pico_state_dict(2), 3)
    pair = f"{tmp_path / 'p'},{tmp_path / 'm'}"
    merge_vectors(tmp_path / "base", [(open_vector_arg(pair), 0.3)], tmp_path / "direct")
    monkeypatch.setattr(directio, "ENABLED", False)
    merge_vectors(tmp_path / "base", [(open_vector_arg(pair), 0.3)], tmp_path / "cached")
    assert (tmp_path / "direct" / "model.safetensors").read_bytes() == \
        (tmp_path / "cached" / "model.safetensors").read_bytes()


def test_zero3_base_buffers_float_merged_integer_passed_through(tmp_path):
    base = pico_state_dict(0)
    folder = write_synthetic_zero3(tmp_path / "run" / "ckpt", base, 2)
    (tmp_path / "run" / "config.json").write_text('{"model_type": "toy"}')
    inv, ids = torch.arange(4.0) / 7, torch.arange(5) * 3
    for f in (folder / "global_step1").glob("*model_states.pt"):  # persistent buffers, as
        states = torch.load(f, weights_only=True)                  # DeepSpeed saves them
        states["module"].update({"rope.inv": inv, "pos.ids": ids})
        states["buffer_names"] = ["rope.inv", "pos.ids"]
        torch.save(states, f)
    plus = {**{k: v + 1 for k, v in base.items()}, "rope.inv": inv + 0.5}
    write_hf_folder(tmp_path / "p", plus)
    write_hf_folder(tmp_path / "m", {**base, "rope.inv": inv})
    vec = open_vector_arg(f"{tmp_path / 'p'},{tmp_path / 'm'}")
    merge_vectors(tmp_path / "run" / "ckpt", [(vec, 2.0)], tmp_path / "out")
    out = SafetensorsFolder(tmp_path / "out")
    assert out.entries["pos.ids"].dtype == "I64" and torch.equal(out.read("pos.ids"), ids)
    assert torch.allclose(out.read("rope.inv"), inv + 1.0)
    assert torch.allclose(out.read("head.weight").view(4, 6), base["head.weight"] + 2)
