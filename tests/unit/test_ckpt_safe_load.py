"""Safe loading: malicious pickles are refused before anything runs; DeepSpeed stand-ins work."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from prefvec_ds import PrefvecError
from prefvec_ds.ckpt.safe_load import LossScaler, ZeroStageEnum, load_pickle_file
from prefvec_ds.cli import main

pytestmark = pytest.mark.unit


class _Evil:
    """Unpickling this would run a shell command (it names os.system in its reduce)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_command_does_not_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    tag = tmp_path / "ckpt" / "global_step1"
    tag.mkdir(parents=True)
    (tmp_path / "ckpt" / "latest").write_text("global_step1")
    evil = {"param_shapes": [{"w": torch.Size([2])}], "buffer_names": [], "x": _Evil(marker)}
    torch.save(evil, tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {}}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(PrefvecError, match="refused to unpickle.*system"):
        load_pickle_file(tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", "model states")
    code = main(["vector", "--plus", str(tmp_path / "ckpt"), "--minus", str(tmp_path / "ckpt"),
                 "--out", str(tmp_path / "v")])
    err = capsys.readouterr().err
    assert code == 2 and "model_states.pt" in err and "refused" in err
    assert not marker.exists(), "the pickled command ran"
    assert not (tmp_path / "v").exists()


def test_deepspeed_globals_map_to_inert_stand_ins(tmp_path):
    """A pickle naming DeepSpeed's classes loads without deepspeed (fake module for saving)."""
    mod_zero = types.ModuleType("deepspeed.runtime.zero.config")
    mod_ls = types.ModuleType("deepspeed.runtime.fp16.loss_scaler")

    class FakeScaler:
        pass

    FakeScaler.__module__, FakeScaler.__qualname__ = mod_ls.__name__, "LossScaler"
    mod_ls.LossScaler = FakeScaler
    mod_zero.ZeroStageEnum = ZeroStageEnum
    scaler = FakeScaler()
    scaler.cur_scale, scaler.dynamic = 1.0, False
    saved = dict(sys.modules)
    fakes = {n: types.ModuleType(n) for n in ("deepspeed", "deepspeed.runtime",
                                              "deepspeed.runtime.zero", "deepspeed.runtime.fp16")}
    sys.modules.update(fakes)  # fake parents too, so pickling never imports the real package
    sys.modules.update({mod_zero.__name__: mod_zero, mod_ls.__name__: mod_ls})
    orig = ZeroStageEnum.__module__
    ZeroStageEnum.__module__ = mod_zero.__name__
    try:
        torch.save({"zero_stage": ZeroStageEnum.weights, "loss_scaler": scaler,
                    "t": torch.arange(3.0)}, tmp_path / "o.pt")
    finally:
        ZeroStageEnum.__module__ = orig
        sys.modules.clear()
        sys.modules.update(saved)
    got = load_pickle_file(tmp_path / "o.pt", "optimizer states")
    assert int(got["zero_stage"]) == 3 and isinstance(got["loss_scaler"], LossScaler)
    assert got["loss_scaler"].cur_scale == 1.0 and torch.equal(got["t"], torch.arange(3.0))


def test_legacy_and_garbage_files_are_refused(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(PrefvecError, match="legacy.pt.*not a zip-format"):
        load_pickle_file(tmp_path / "legacy.pt", "model states")
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04" + os.urandom(200))
    with pytest.raises(PrefvecError, match="junk.pt"):
        load_pickle_file(tmp_path / "junk.pt", "model states")
    with pytest.raises(PrefvecError, match="missing"):
        load_pickle_file(tmp_path / "absent.pt", "model states")


def test_ckpt_package_never_imports_deepspeed():
    code = ("import sys, prefvec_ds.ckpt.commands, prefvec_ds.ckpt.vector, prefvec_ds.ckpt.merge, "
            "prefvec_ds.ckpt.stats, prefvec_ds.ckpt.apply; "
            "bad = [m for m in sys.modules if m == 'deepspeed' or m.startswith('deepspeed.')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
