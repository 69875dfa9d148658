"""Streaming writer of Hugging Face sharded safetensors.

The shard plan (which tensor goes in which file, at which offset) is made up front from names,
shapes and dtypes alone, so each shard's header is written first and every tensor's bytes are
appended the moment they are computed, whole (`write`) or chunk by chunk (`append`): memory stays
at one chunk or tensor, never a shard or a state dict. No torch import: dtypes are safetensors
codes (torch dtypes are accepted and mapped by name), data is anything with the buffer protocol
or a torch tensor. Output goes into a temporary folder beside the target and is renamed into
place at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prefvec_ds import PrefvecError
from prefvec_ds.ckpt.dtypes import CODE_BY_NAME, ITEMSIZE, TORCH_NAME, code_of
from prefvec_ds.ckpt.directio import open_output


def __getattr__(name: str):
    """DTYPES_BY_NAME ({"fp32": torch.float32, ...}) for torch users, imported on first use."""
    if name == "DTYPES_BY_NAME":
        import torch

        return {k: getattr(torch, TORCH_NAME[v]) for k, v in CODE_BY_NAME.items()}
    raise AttributeError(name)


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
    """One planned tensor; dtype: a safetensors code ("F32", "BF16") or a torch dtype."""
    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self):
        self.dtype = code_of(self.dtype)
        self.shape = tuple(int(d) for d in self.shape)

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * ITEMSIZE[self.dtype]


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
                 metadata: dict[str, str] | None = None, durable: bool = True,
                 direct: bool = False):
        """durable: start write-back of each piece as soon as it is written and fdatasync each
        shard on close, so the final rename publishes data that is on disk (and dirty pages
        never pile up: 1.5 GB of them would otherwise all be flushed at the end).
        direct: write with O_DIRECT where the file system allows it (directio.py: far less CPU
        than copying into the page cache; always durable)."""
        self.folder = Path(folder)
        self.durable = durable
        self.direct = direct
        self.shards = plan_shards(specs, max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [(i, s) for i, sh in enumerate(self.shards) for s in sh.specs]
        self._next = 0
        self._done_bytes = 0  # of the tensor being appended
        self._fh = None
        self._shard_idx = -1

    def __enter__(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        return self

    def _close_shard(self, complete: bool = True) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            fh.close(complete)

    def _open_shard(self, idx: int) -> None:
        self._close_shard()
        shard = self.shards[idx]
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for spec in shard.specs:
            header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
        self._fh = open_output(self.folder / shard.filename, self.direct, self.durable)
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._shard_idx = idx

    def append(self, name: str, data) -> None:
        """Append the next bytes of tensor `name` (the next planned one, or the one being
        appended); the writer moves on once all its bytes are in."""
        if self._next >= len(self._order):
            raise RuntimeError(f"tensor {name!r} is not in the shard plan")
        idx, spec = self._order[self._next]
        view = memoryview(data).cast("B")
        if name != spec.name or self._done_bytes + len(view) > spec.nbytes:
            raise RuntimeError(f"expected {spec.nbytes - self._done_bytes} more bytes of "
                               f"{spec.name} next, got {len(view)} of {name}")
        if idx != self._shard_idx:
            self._open_shard(idx)
        if len(view):
            self._fh.write(view)
        self._done_bytes += len(view)
        if self._done_bytes == spec.nbytes:
            self._next += 1
            self._done_bytes = 0

    def write(self, name: str, tensor) -> None:
        """Write a whole tensor: a numpy array (dtype as planned; bf16 as uint16 bits) or a
        torch tensor (its own buffer is handed to write(): no bytes copy)."""
        if self._next >= len(self._order) or self._done_bytes:
            raise RuntimeError(f"tensor {name!r} is not next in the shard plan")
        spec = self._order[self._next][1]
        if isinstance(tensor, np.ndarray):
            array = np.ascontiguousarray(tensor)
            bits16 = array.dtype in (np.uint16, np.int16)  # bf16 travels as its bit patterns
            code = "BF16" if spec.dtype == "BF16" and bits16 else code_of(array.dtype)
        else:  # torch: bf16 has no numpy dtype, so its bytes go through a same-size int view
            import torch

            code = code_of(tensor.dtype)
            t = tensor.detach().contiguous().cpu()
            array = (t.view(torch.int16) if code == "BF16" else t).numpy()
        if name != spec.name or tuple(tensor.shape) != spec.shape or code != spec.dtype:
            raise RuntimeError(f"expected {spec.name} {spec.shape} {spec.dtype} next, got "
                               f"{name} {tuple(tensor.shape)} {code}")
        self.append(name, array.reshape(-1))

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._close_shard(complete=False)
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
