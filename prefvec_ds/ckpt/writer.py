"""Streaming writer of Hugging Face sharded safetensors.

The shard plan (which tensor goes in which file, at which offset) is made up front from names,
shapes and dtypes alone, so each shard's header is written first and every tensor's bytes are
appended the moment it is computed: memory stays at one tensor, never a shard or a state dict.
Output goes into a temporary folder beside the target and is renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prefvec_ds import PrefvecError

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL", torch.float64: "F64"}
DTYPES_BY_NAME = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 bytes (K/M/G/T, decimal as in HF's max_shard_size); ints pass."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().removesuffix("B")
    mult = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    try:
        if s and s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        return int(s)
    except ValueError:
        raise PrefvecError(f"max shard size {text!r}: expected a size such as 500MB or 5GB")


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.tensor([], dtype=self.dtype).element_size()


@dataclass
class _Shard:
    filename: str
    specs: list[TensorSpec] = field(default_factory=list)


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[_Shard]:
    """Greedy, in order: a new shard when the next tensor would pass the budget."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    n = len(shards)
    if n == 1:
        return [_Shard("model.safetensors", shards[0])]
    return [_Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", s) for i, s in enumerate(shards)]


class ShardedSafetensorsWriter:
    """Writes tensors into planned shards, strictly in plan order, one tensor in memory at a time.

    >>> with ShardedSafetensorsWriter(folder, specs, max_shard_bytes) as w:
    ...     for spec in specs: w.write(spec.name, compute(spec))
    """

    def __init__(self, folder: Path, specs: list[TensorSpec], max_shard_bytes: int,
                 metadata: dict[str, str] | None = None, durable: bool = True):
        """durable: start write-back of each tensor as soon as it is written and fdatasync each
        shard on close, so the final rename publishes data that is on disk (and dirty pages
        never pile up: 1.5 GB of them would otherwise all be flushed at the end)."""
        self.folder = Path(folder)
        self.durable = durable
        self.shards = plan_shards(specs, max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [(i, s) for i, sh in enumerate(self.shards) for s in sh.specs]
        self._next = 0
        self._fh = None
        self._shard_idx = -1

    def __enter__(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        return self

    def _close_shard(self) -> None:
        if self._fh is not None:
            if self.durable:
                os.fdatasync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def _write_all(self, data) -> None:
        """Unbuffered write of a whole buffer (a single write() stops at ~2 GiB on Linux)."""
        view = memoryview(data).cast("B")
        start = self._fh.tell()
        while view:
            n = self._fh.write(view)
            view = view[n:]
        if self.durable and hasattr(os, "posix_fadvise"):
            # DONTNEED on just-written pages starts their write-back now (asynchronously) and
            # drops them from the page cache once clean: disk writes overlap our reads.
            os.posix_fadvise(self._fh.fileno(), start, self._fh.tell() - start,
                             os.POSIX_FADV_DONTNEED)

    def _open_shard(self, idx: int) -> None:
        self._close_shard()
        shard = self.shards[idx]
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for spec in shard.specs:
            header[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
        self._fh = open(self.folder / shard.filename, "wb", buffering=0)
        self._write_all(struct.pack("<Q", len(raw)) + raw)
        self._shard_idx = idx

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise RuntimeError(f"tensor {name!r} is not in the shard plan")
        idx, spec = self._order[self._next]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(f"expected {spec.name} {spec.shape} {spec.dtype} next, got "
                               f"{name} {tuple(tensor.shape)} {tensor.dtype}")
        if idx != self._shard_idx:
            self._open_shard(idx)
        t = tensor.detach().contiguous().cpu()
        # bf16 has no numpy dtype: write its bytes through a same-size integer view.
        view = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        # Hand the tensor's own buffer to write(): no bytes copy (tobytes() would double memory).
        if t.numel():
            self._write_all(view.reshape(-1).numpy())
        self._next += 1

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            if self._fh is not None:
                self._fh.close()
            return False
        self._close_shard()
        if self._next != len(self._order):
            raise RuntimeError(f"only {self._next} of {len(self._order)} planned tensors written")
        if len(self.shards) > 1:
            total = sum(s.nbytes for sh in self.shards for s in sh.specs)
            index = {"metadata": {"total_size": total},
                     "weight_map": {s.name: sh.filename for sh in self.shards for s in sh.specs}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return False


@contextlib.contextmanager
def atomic_output_dir(target: Path, overwrite: bool = False):
    """Yield a temporary sibling folder; rename it to `target` only if the block succeeds.

    A failure (or Ctrl-C) removes the temporary folder, so no half-written output is left.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise PrefvecError(f"output folder {target} already exists (pass --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)
