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
    assert got["loss_scaler"].cur_scale == 1.0  # tensors come back as locations of their bytes
    assert torch.equal(torch.from_numpy(got["t"].numpy()), torch.arange(3.0))


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


def test_torch_free_reader_matches_torch_load(tmp_path):
    """Every dtype, views with storage offsets, shared storages, Parameters and tensors with
    attributes (pickled through _rebuild_from_type_v2, as DeepSpeed's flat groups are): the
    bytes we locate are the bytes torch.load returns."""
    base = torch.arange(40, dtype=torch.float32)
    tagged = torch.randn(6)
    tagged.ds_id = "0_5"  # an attribute: torch pickles it via _rebuild_from_type_v2
    obj = {"f32": base, "view": base[7:19], "again": base[3:5],
           "bf16": torch.randn(3, 4).bfloat16(), "f16": torch.randn(5).half(),
           "f64": torch.randn(2, 2).double(), "i64": torch.arange(9),
           "bool": torch.tensor([True, False]), "u8": torch.ones(3, dtype=torch.uint8),
           "param": torch.nn.Parameter(torch.randn(2, 3)), "tagged": tagged,
           "empty": torch.empty(0),
           "shape": torch.Size([2, 3]), "nested": [{"x": torch.randn(4)}], "bytes": b"\x00\xff"}
    torch.save(obj, tmp_path / "t.pt")
    want = torch.load(tmp_path / "t.pt", weights_only=True)
    got = load_pickle_file(tmp_path / "t.pt", "test tensors")
    assert got["shape"] == (2, 3) and got["bytes"] == b"\x00\xff"
    pairs = [(k, got[k], want[k]) for k in obj if isinstance(obj[k], torch.Tensor)]
    pairs.append(("nested", got["nested"][0]["x"], want["nested"][0]["x"]))
    for key, g, w in pairs:
        assert tuple(g.shape) == tuple(w.shape), key
        w_bytes = (w.view(torch.int16) if w.dtype == torch.bfloat16 else w).detach().contiguous()
        assert g.numpy().tobytes() == w_bytes.numpy().tobytes(), key
    assert got["view"].offset == got["f32"].offset + 7 * 4  # a view points into its storage


def _op_str(text: str) -> bytes:
    return b"X" + len(text).to_bytes(4, "little") + text.encode()


@pytest.mark.parametrize("value", [
    # _rebuild_tensor_v2 fed a string where a storage must be
    b"ctorch._utils\n_rebuild_tensor_v2\n(" + _op_str("nope") + b"K\x00K\x02\x85K\x01\x85\x89Nt",
    # _rebuild_from_type_v2 asked to call OrderedDict instead of a tensor rebuild
    b"ctorch._tensor\n_rebuild_from_type_v2\n(ccollections\nOrderedDict\nctorch\nTensor\n)}t",
])
def test_allowed_names_used_another_way_are_refused(tmp_path, value):
    import zipfile

    src, evil = tmp_path / "ok.pt", tmp_path / "evil.pt"
    torch.save({"t": torch.ones(2)}, src)
    pkl = b"\x80\x02}" + _op_str("t") + value + b"Rs."  # {"t": REDUCE(...)}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            zout.writestr(item, pkl if item.filename.endswith("data.pkl") else zin.read(item))
    with pytest.raises(PrefvecError, match="evil.pt.*corrupt"):
        load_pickle_file(evil, "model states")
