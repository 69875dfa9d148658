"""`prefvec vector` / `prefvec merge` on real DeepSpeed ZeRO-1 and ZeRO-2 checkpoints (W = 1, 2, 3;
fp32 and bf16; two param groups; tied, frozen and alignment-padded params) against DeepSpeed's own
gather (`get_fp32_state_dict_from_zero_checkpoint`), and the reader's peak memory on a weight of
32 Mi elements that straddles two rank files. Checkpoints: ckpt_fixtures.zero12_sets (once per
session) and tests/faults/zero2_build.py (the big one)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from prefvec_ds.ckpt.safetensors_io import SafetensorsFolder
from prefvec_ds.ckpt.sources import open_source, open_vector
from prefvec_ds.ckpt.zero12 import Zero12Checkpoint
from prefvec_ds.cli import main
from tests.ckpt_fixtures import (ZERO12_SETS, reference_state_dict, zero3_sets,  # noqa: F401
                                 zero12_sets)
from tests.conftest import REPO

pytestmark = pytest.mark.dist


def _cli(*args) -> int:
    return main([str(a) for a in args])


def _read(src, name: str) -> torch.Tensor:
    buf = np.empty(int(np.prod(src.shape(name))), np.float32)
    src.add_into(name, buf, copy=True)
    return torch.from_numpy(buf).view(src.shape(name))


# zero_to_fp32 reads every set but the BF16_Optimizer one (its state has no zero_stage).
GATHERED = sorted(n for n, spec in ZERO12_SETS.items() if not spec.get("fp32_accumulation"))


@pytest.mark.parametrize("side", ["plus", "minus"])
@pytest.mark.parametrize("set_name", GATHERED)
def test_every_tensor_equals_deepspeed_gather(zero12_sets, set_name, side):
    spec, folder = ZERO12_SETS[set_name], zero12_sets[set_name] / side
    src = open_source(folder, "plus")
    assert isinstance(src, Zero12Checkpoint) and src.layout.stage == spec["stage"]
    assert src.layout.world == spec["world"] and len(src.layout.groups) == 2
    ref = reference_state_dict(folder)
    frozen_stage1 = spec["stage"] == 1 and spec["frozen"]  # zero_to_fp32 leaves these out
    assert set(ref) == set(src.names()) - (set(src.layout.frozen) if frozen_stage1 else set()) \
        | set(src.aliases)
    assert src.aliases == ({"lm_head.weight": "model.embed_tokens.weight"} if spec["tie"] else {})
    for name in src.names():
        got = _read(src, name)
        if name in ref:
            assert torch.equal(got, ref[name].view(got.shape)), name  # fp32: bit-exact
    if frozen_stage1:  # read from the full `module`: the untrained base weight, in bf16
        base = SafetensorsFolder(zero12_sets[set_name] / "base")
        for name in src.layout.frozen:
            want = base.read(name).view(src.shape(name)).bfloat16().float()
            assert torch.equal(_read(src, name), want), name
    if spec.get("align"):  # parameter_alignment on: a real padding after the 1-element param
        assert any(any(g) for g in src._flat[0][2])
    if spec["world"] > 1:  # some parameter straddles two rank files
        assert any(len(src.segments(n)) > 1 for n in src.layout.slots)


def test_bf16_optimizer_masters_match_the_module_weights(zero12_sets):
    """bf16 + ZeRO-1 + fp32 gradient accumulation: DeepSpeed's BF16_Optimizer saves no
    zero_stage (zero_to_fp32 refuses the folder); the stage comes from ds_config. After each step
    DeepSpeed copies the fp32 masters into the bf16 module, so each master rounded to bf16 must
    equal the module weight saved beside it, and the masters are not bf16 values themselves."""
    folder = zero12_sets["z1_w2_bf16_fp32acc"] / "plus"
    src = open_source(folder, "plus")
    assert src.layout.stage == 1 and src.layout.world == 2
    assert src.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    module = torch.load(src.model_file, weights_only=False)["module"]
    assert set(src.names()) | set(src.aliases) == set(module)
    for name in src.names():
        got = _read(src, name)
        assert torch.equal(got.bfloat16(), module[name]), name
        assert not torch.equal(got, got.bfloat16().float()), name


def _sets(request, name: str):
    if name in ZERO12_SETS:
        return request.getfixturevalue("zero12_sets")[name]
    return request.getfixturevalue("zero3_sets")[name]


@pytest.mark.parametrize("plus_set,minus_set,fast", [
    ("z2_w2_fp32_tied", "z2_w2_fp32_tied", True),      # same layout: rank file by rank file
    ("z2_w3_bf16_frozen", "z2_w3_bf16_frozen", True),  # bf16_ prefix, frozen, paddings
    ("z1_w1_fp32_tied", "z2_w2_fp32_tied", False),     # stage 1 W=1 vs stage 2 W=2: named
    ("z2_w2_fp32_tied", "w2_fp32_tied", False),        # ZeRO-2 minus ZeRO-3
])
def test_vector_equals_difference_of_deepspeed_state_dicts(request, tmp_path, capsys, plus_set,
                                                            minus_set, fast):
    plus, minus = _sets(request, plus_set) / "plus", _sets(request, minus_set) / "minus"
    assert _cli("vector", "--plus", plus, "--minus", minus, "--out", tmp_path / "v") == 0
    assert ("flat fast path" in capsys.readouterr().out) == fast
    ref_p, ref_m = reference_state_dict(plus), reference_state_dict(minus)
    vec = open_vector(tmp_path / "v")
    assert set(vec.names()) | set(vec.aliases) == set(ref_p)
    for name, p in ref_p.items():
        got = vec.read(vec.aliases.get(name, name)).float().view(p.shape)
        assert torch.equal(got, p - ref_m[name]), name  # same fp32 values, same subtraction


def test_merge_zero2_base_with_zero1_vector_loads_and_generates(zero12_sets, tmp_path):
    from transformers import AutoModelForCausalLM

    z2, z1 = zero12_sets["z2_w2_fp32_tied"], zero12_sets["z1_w1_fp32_tied"]
    assert _cli("merge", "--base", z2 / "plus", "--vector", f"{z1 / 'plus'},{z1 / 'minus'}=0.5",
                "--out", tmp_path / "m", "--config-from", z2 / "base") == 0
    base, p, m = (reference_state_dict(f) for f in (z2 / "plus", z1 / "plus", z1 / "minus"))
    merged = SafetensorsFolder(tmp_path / "m")
    assert set(merged.names()) == set(base)  # the tied alias is written too, as for ZeRO-3
    for name, t in base.items():
        want = t + 0.5 * (p[name] - m[name])
        assert torch.allclose(merged.read(name).view(t.shape), want, atol=1e-6), name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    out = model.generate(torch.tensor([[1, 4, 9, 16]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


@pytest.fixture(scope="module")
def big_zero2(tmp_path_factory):
    from tests.faults.zero2_build import build

    return build(tmp_path_factory.mktemp("zero2_big") / "ckpt", world=2, big=True)


# Measured from a small wrapper process: a child forked straight from pytest would count
# pytest's own ~400 MiB (ru_maxrss keeps the pre-exec high-water mark of the forked copy).
_PEAK = ("import os, subprocess, sys\n"
         "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
         "_, status, usage = os.wait4(p.pid, 0)\n"
         "print(status, usage.ru_maxrss)")


def _peak_mib(*args) -> float:
    """Peak RSS (MiB) of one `prefvec` run in a fresh process (wait4's rusage: that child only)."""
    out = subprocess.run([sys.executable, "-c", _PEAK, sys.executable, "-m", "prefvec_ds.cli",
                          *map(str, args)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    status, kib = out.stdout.split()
    assert status == "0", out.stderr
    return int(kib) / 1024


def test_memory_stays_under_one_parameter(big_zero2, tmp_path):
    """The 32 Mi-element weight (128 MiB fp32) lies across both rank files; vector (reads 2 x
    128 MiB) and merge (3 x 128 MiB) stream it in chunks: their peak RSS over the bare start-up
    stays under one copy of the weight (measured here: +77 to +96 MiB; it is the bounded
    read-ahead and job queues, whatever the parameter's size)."""
    src = open_source(big_zero2, "plus")
    assert len(src.segments("w")) == 2 and src.shape("w") == (8192, 4096)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text('{"model_type": "toy"}')
    start = _peak_mib("vector", "--help")
    vector = _peak_mib("vector", "--plus", big_zero2, "--minus", big_zero2, "--out", tmp_path / "v")
    merge = _peak_mib("merge", "--base", big_zero2, "--vector", f"{big_zero2},{big_zero2}=0.5",
                      "--out", tmp_path / "m", "--config-from", tmp_path / "cfg")
    print(f"peak RSS: start-up {start:.0f} MiB, vector {vector:.0f} MiB, merge {merge:.0f} MiB")
    one_param = 8192 * 4096 * 4 / 2**20
    assert vector - start < one_param and merge - start < one_param
    w = _read(src, "w")
    assert torch.equal(SafetensorsFolder(tmp_path / "m").read("w").view(w.shape), w)
    assert float(open_vector(tmp_path / "v").read("w").abs().max()) == 0.0
