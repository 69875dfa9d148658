"""Streaming writer: shard plan, index, bf16 bytes, atomic output folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from prefvec_ds import PrefvecError
from prefvec_ds.ckpt.safetensors_io import SafetensorsFolder
from prefvec_ds.ckpt.writer import (ShardedSafetensorsWriter, TensorSpec, atomic_output_dir,
                                    parse_size)

pytestmark = pytest.mark.unit


def test_sharded_round_trip_with_index(tmp_path):
    tensors = {f"t{i}": torch.randn(i + 1, 8).to(torch.bfloat16 if i % 2 else torch.float32)
               for i in range(6)}
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    with ShardedSafetensorsWriter(tmp_path, specs, max_shard_bytes=100) as w:
        for n, t in tensors.items():
            w.write(n, t)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors) and len(set(index["weight_map"].values())) > 1
    for n, t in tensors.items():
        with safe_open(str(tmp_path / index["weight_map"][n]), "pt") as f:
            assert torch.equal(f.get_tensor(n), t)
    folder = SafetensorsFolder(tmp_path)  # our own reader agrees
    assert torch.equal(folder.read("t3").view(4, 8), tensors["t3"])


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    with pytest.raises(PrefvecError, match="already exists"):
        with atomic_output_dir(tmp_path / "out"):
            pass


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8
    with pytest.raises(PrefvecError):
        parse_size("lots")


def test_truncated_safetensors_is_reported(tmp_path):
    specs = [TensorSpec("w", (64, 64), torch.float32)]
    with ShardedSafetensorsWriter(tmp_path, specs, 10**9) as w:
        w.write("w", torch.ones(64, 64))
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(PrefvecError, match="tensor w: data beyond the end"):
        SafetensorsFolder(tmp_path)


def test_numpy_casts_match_torch_bit_for_bit():
    """fp32 -> bf16/fp16 rounding (ties to even, overflow to inf) and bf16 -> fp32 widening in
    numpy, as the torch-free merge path does them, equal torch's own conversions."""
    import numpy as np

    from prefvec_ds.ckpt.dtypes import narrow_into, widen_into

    g = torch.Generator().manual_seed(0)
    edge = torch.tensor([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.3895e38, 3.4e38, -3.4e38,
                         float("inf"), float("-inf"), 1e-40, -1e-45, 65504.0, 65520.0, 6e-8])
    bits = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=g, dtype=torch.int64)
    rand = bits.to(torch.int32).view(torch.float32)
    x = torch.cat([edge, rand[torch.isfinite(rand)], torch.randn(100_000, generator=g) * 3])
    for code, dtype in (("BF16", torch.bfloat16), ("F16", torch.float16)):
        out = np.empty(x.numel() * 2, np.uint8)
        narrow_into(x.numpy().copy(), code, out)
        want = x.to(dtype).view(torch.int16).numpy().view(np.uint8)
        assert np.array_equal(out, want), code
        back = np.empty(x.numel(), np.float32)
        widen_into(out, code, back)
        assert torch.equal(torch.from_numpy(back), x.to(dtype).float()), code


def test_append_in_chunks_and_whole_numpy_writes(tmp_path):
    import numpy as np

    specs = [TensorSpec("a", (3, 5), "F32"), TensorSpec("b", (0,), "BF16"),
             TensorSpec("c", (4,), torch.bfloat16)]
    a = np.arange(15, dtype=np.float32)
    c = torch.randn(4).bfloat16()
    with ShardedSafetensorsWriter(tmp_path, specs, max_shard_bytes=10**9) as w:
        w.append("a", a[:7])
        with pytest.raises(RuntimeError, match="more bytes of a"):
            w.append("c", a[7:])
        w.append("a", a[7:])
        w.append("b", b"")
        w.write("c", c.view(torch.int16).numpy())  # bf16 bits as uint16 / int16
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("a"), torch.from_numpy(a).view(3, 5))
        assert f.get_tensor("b").numel() == 0 and torch.equal(f.get_tensor("c"), c)


def test_direct_file_pads_truncates_and_falls_back(tmp_path, monkeypatch):
    """O_DIRECT output: whole aligned blocks from a staging buffer, the last one padded and the
    file truncated to its size; a file system that refuses O_DIRECT writes (EINVAL) gets the
    same bytes through the page cache."""
    import errno
    import os

    import numpy as np

    from prefvec_ds.ckpt import directio

    monkeypatch.setattr(directio, "ENABLED", True)  # also under PREFVEC_DIRECT_IO=0
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, size=3 * directio.STAGE_BYTES // 2 + 12345, dtype=np.uint8)
    pieces = [data[:7], data[7:5000], data[5000:]]
    out = directio.open_output(tmp_path / "a.bin", direct=True)
    for piece in pieces:
        out.write(piece)
    out.close()
    assert (tmp_path / "a.bin").read_bytes() == data.tobytes()

    real_pwrite, calls = os.pwrite, []

    def refuse_once(fd, view, pos):
        if not calls:
            calls.append(pos)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, view, pos)

    monkeypatch.setattr(directio.os, "pwrite", refuse_once)
    out = directio.open_output(tmp_path / "b.bin", direct=True)
    for piece in pieces:
        out.write(piece)
    out.close()
    assert calls and (tmp_path / "b.bin").read_bytes() == data.tobytes()
