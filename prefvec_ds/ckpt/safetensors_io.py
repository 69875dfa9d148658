"""Read a folder of (sharded) safetensors one tensor at a time, with plain positioned reads.

Why not `safetensors.safe_open`: it memory-maps each shard and the pages it touches stay in our
RSS until the file is closed, so reading a 1.5 GB base would cost 1.5 GB of RSS; it also needs
torch. Here a tensor is a Segment (file, byte offset) read with `os.preadv` in chunks
(segments.py), straight into its destination when it is fp32: memory stays at one chunk.
The header is parsed and checked against the file size first, so a truncated shard is reported
by file and tensor name before any work is done.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prefvec_ds import PrefvecError
from prefvec_ds.ckpt.dtypes import FLOAT_CODES, ITEMSIZE, NAME_BY_CODE, NUMPY, to_torch, widen_into
from prefvec_ds.ckpt.paths import check_name, contained
from prefvec_ds.ckpt.segments import Segment, SegmentSource, pread_into
_MAX_HEADER = 100 << 20  # safetensors caps headers at 100 MB; a bigger one means garbage


@dataclass(frozen=True)
class Entry:
    """Where one tensor's bytes are."""
    file: Path
    dtype: str            # safetensors code, e.g. "F32"
    shape: tuple[int, ...]
    start: int            # absolute byte offset in the file
    nbytes: int


def _read_header(path: Path) -> dict[str, Entry]:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise PrefvecError(f"file {path}: truncated safetensors file (no header)")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > min(_MAX_HEADER, size - 8):
            raise PrefvecError(f"file {path}: corrupt or truncated safetensors header "
                               f"(length {hlen}, file size {size})")
        try:
            header = json.loads(fh.read(hlen))
        except ValueError as err:
            raise PrefvecError(f"file {path}: corrupt safetensors header ({err})")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in ITEMSIZE:
            raise PrefvecError(f"file {path}, tensor {name}: unsupported dtype {info.get('dtype')}")
        begin, end = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * ITEMSIZE[info["dtype"]] or 8 + hlen + end > size:
            raise PrefvecError(f"file {path}, tensor {name}: data beyond the end of the file or "
                               f"inconsistent with shape {list(shape)} (truncated or corrupt)")
        entries[name] = Entry(path, info["dtype"], shape, 8 + hlen + begin, end - begin)
    return entries


class SafetensorsFolder(SegmentSource):
    """A HF model folder or a prefvec vector folder: named tensors in one or more shards."""

    kind = "safetensors"

    def __init__(self, path: Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise ValueError(f"a {type(weight_map).__name__}, not a mapping")
            except (ValueError, KeyError, TypeError) as err:
                raise PrefvecError(f"file {index}: parameter weight_map: expected the HF index "
                                   f"format ({err})") from None
            for tensor, shard in weight_map.items():
                check_name(shard, index, self.path, f"entry {tensor}: shard")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            for name in files:
                contained(self.path / name, self.path)
        if not files:
            raise PrefvecError(f"folder {self.path}: no *.safetensors files (expected a Hugging "
                               "Face model folder, a prefvec vector, or a DeepSpeed checkpoint)")
        self.entries: dict[str, Entry] = {}
        for name in files:
            if not (self.path / name).is_file():
                raise PrefvecError(f"file {self.path / name}: missing (listed in {index.name})")
            self.entries.update(_read_header(self.path / name))
        self.aliases: dict[str, str] = {}
        self.meta: dict = {}

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype_name(self, name: str) -> str:
        return NAME_BY_CODE.get(self.entries[name].dtype, self.entries[name].dtype.lower())

    def dtype_code(self, name: str) -> str:
        return self.entries[name].dtype

    def is_float(self, name: str) -> bool:
        return self.entries[name].dtype in FLOAT_CODES

    def segments(self, name: str) -> list[Segment]:
        e = self.entries[name]
        return [Segment(0, math.prod(e.shape), e.dtype, e.file, e.start)]

    def read_array(self, name: str) -> np.ndarray:
        """The tensor as stored, flat, a fresh numpy array (bf16 as its uint16 bit patterns)."""
        e = self.entries[name]
        out = np.empty(e.nbytes // ITEMSIZE[e.dtype], dtype=NUMPY[e.dtype])
        pread_into(e.file, e.start, out)
        return out

    def read_fp32(self, name: str) -> np.ndarray:
        """A float tensor widened to fp32, flat (exact for bf16/fp16)."""
        e = self.entries[name]
        raw = self.read_array(name).view(np.uint8)
        out = np.empty(e.nbytes // ITEMSIZE[e.dtype], dtype=np.float32)
        widen_into(raw, e.dtype, out)
        return out

    def read(self, name: str):
        """The tensor as stored (its own dtype), flat, as a torch tensor; a fresh allocation."""
        return to_torch(self.read_array(name), self.entries[name].dtype)

    def __repr__(self) -> str:
        return f"safetensors folder {self.path}"
