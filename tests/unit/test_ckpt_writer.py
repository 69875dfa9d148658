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
