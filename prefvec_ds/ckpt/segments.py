"""Tensors as byte ranges of files (Segments, Terms) and the one arithmetic kernel on them.

Every source describes a tensor as Segments: element ranges of the full flat tensor and where
their bytes are (a file and byte offset; ZeRO-3 has one segment per rank, safetensors one). A
merge of base + eta * (plus - minus) is then two Terms over the same fp32 output: the base (alpha
1) and the pair (plus, minus) with alpha eta, so phi = plus - minus is formed first, exactly as
the method defines it, and `combine` evaluates it in place with numpy (no temporaries: fresh
1.5 GB of temporaries cost 1.7-2.6 s of page faults here).

Two drivers use it: stream.run_plan (the `vector`/`merge` commands: big O_DIRECT reads ahead on
threads) and `accumulate` here (add_into: apply_vectors, vector-stats, evaluation), which reads
1M-element chunks with plain preadv into the destination, NaN-checking each while in cache.
preadv, not mmap: touched mmap pages would count in our RSS and cost ~2 s of faults per 3 GB.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prefvec_ds import PrefvecError
from prefvec_ds.ckpt import crc
from prefvec_ds.ckpt.directio import pread_exact
from prefvec_ds.ckpt.dtypes import FLOAT_CODES, ITEMSIZE, widen_into

CHUNK_ELEMS = 1 << 20           # elements per chunk (4 MiB of fp32)
DOT_ELEMS = 1 << 20             # fp32 dot products are summed in fp64 every 1M elements
_local = threading.local()      # per thread: scratch for non-fp32 inputs


@dataclass(frozen=True)
class Segment:
    """Elements [start, start + count) of a flat tensor, stored at file[offset:] as `dtype`;
    `record`: the zip entry (safe_load.ZipRecord) holding those bytes, whose CRC-32 the
    streaming reader verifies, or None (safetensors files have no checksum)."""
    start: int
    count: int
    dtype: str
    file: Path
    offset: int
    record: object = None


@dataclass(frozen=True)
class Term:
    """alpha * (segments - minus), or alpha * segments when minus is None; both sides cover the
    same flat tensor, possibly cut differently (ZeRO-3 checkpoints of different world sizes)."""
    segments: tuple
    alpha: float = 1.0
    minus: tuple | None = None

    def sides(self) -> tuple:
        return (self.segments,) if self.minus is None else (self.segments, self.minus)


class FdCache:
    """Open file descriptors shared by all threads (preadv is positional, so sharing is safe)."""

    def __init__(self):
        self._fds: dict[tuple, int] = {}
        self._lock = threading.Lock()

    def get(self, path: Path) -> int:
        st = os.stat(path)  # keyed by inode and mtime too: a rewritten file gets a fresh fd
        key = (str(path), st.st_ino, st.st_mtime_ns)
        fd = self._fds.get(key)
        if fd is None:
            with self._lock:
                fd = self._fds.get(key)
                if fd is None:
                    fd = self._fds[key] = os.open(path, os.O_RDONLY)
        return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


FDS = FdCache()


def pread_into(path: Path, offset: int, view) -> None:
    """Fill `view` (a writable buffer) with the bytes of `path` from `offset`."""
    pread_exact(FDS.get(path), view, offset, path)


def _scratch(nbytes: int) -> np.ndarray:
    buf = getattr(_local, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = _local.buf = np.empty(max(nbytes, CHUNK_ELEMS * 2), dtype=np.uint8)
    return buf[:nbytes]


def read_side(segments, lo: int, hi: int, out: np.ndarray) -> None:
    """out (fp32, hi - lo elements) = elements [lo, hi) of the tensor these segments cover."""
    covered = 0
    for seg in segments:
        a, b = max(lo, seg.start), min(hi, seg.start + seg.count)
        if a >= b:
            continue
        dst = out[a - lo:b - lo]
        size = ITEMSIZE[seg.dtype]
        offset = seg.offset + (a - seg.start) * size
        if seg.dtype == "F32":
            pread_into(seg.file, offset, dst)
            if seg.record is not None and crc.ENABLED:  # before combine changes the bytes
                crc.TRACKER.add(seg.record, offset, memoryview(dst).cast("B"))
        elif seg.dtype in FLOAT_CODES:
            raw = _scratch((b - a) * size)
            pread_into(seg.file, offset, raw)
            if seg.record is not None and crc.ENABLED:
                crc.TRACKER.add(seg.record, offset, raw)
            widen_into(raw, seg.dtype, dst)
        else:
            raise PrefvecError(f"file {seg.file}: {seg.dtype} values where floats were expected")
        covered += b - a
    if covered != hi - lo:
        raise PrefvecError(f"segments cover {covered} of elements [{lo}, {hi})")


def combine(terms, sides: list, out: np.ndarray, into: bool = False) -> None:
    """out = sum alpha * (x - y), in place: sides[k] holds term k's fp32 chunks [x(, y)], and
    out is sides[0][0] (the first term's x is the output buffer: no copy). With `into`,
    out += the whole sum instead (apply_vectors updates parameters this way)."""
    for k, (term, bufs) in enumerate(zip(terms, sides)):
        x = bufs[0]
        if term.minus is not None:
            np.subtract(x, bufs[1], out=x)
        if term.alpha != 1.0:
            np.multiply(x, np.float32(term.alpha), out=x)
        if k or into:
            np.add(out, x, out=out)


def check_finite(chunk: np.ndarray, label: str) -> None:
    """Raise PrefvecError naming `label` when the chunk holds NaN or Inf (one vectorised pass,
    0.12 ms per 1M values here; a sum took 0.7 ms)."""
    finite = np.isfinite(chunk)
    if not finite.all():
        raise PrefvecError(f"{label}: {chunk.size - np.count_nonzero(finite)} NaN/Inf values "
                           "in the result")


def check_finite_narrow(data: np.ndarray, code: str, label: str) -> None:
    """check_finite for values already cast to `code` (bytes in `data`): an fp32 value beyond
    the range of fp16 (65504) or bf16 becomes Inf in the cast."""
    if code == "BF16":  # Inf/NaN: all 8 exponent bits set
        bad = np.count_nonzero((data.view(np.uint16) & 0x7F80) == 0x7F80)
    else:
        bad = data.size // ITEMSIZE[code] - np.count_nonzero(
            np.isfinite(data.view(np.dtype(_NUMPY_FLOAT[code]))))
    if bad:
        raise PrefvecError(f"{label}: {bad} values overflow {_NAME[code]} (Inf after the cast "
                           f"to the output dtype); use a wider --dtype or a smaller eta")


_NUMPY_FLOAT = {"F16": np.float16, "F32": np.float32, "F64": np.float64}
_NAME = {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F64": "fp64"}


def chunked_dot(a: np.ndarray, b: np.ndarray) -> float:
    """sum(a * b) of two flat fp32 arrays, exact to ~1e-7 relative: fp32 dot per 1M-element chunk,
    chunks summed as Python floats (fp64). A single fp32 dot over a 131M-element embedding was
    off by 1e-4 relative; a float64 copy would double the memory."""
    total = 0.0
    for c0 in range(0, a.size, DOT_ELEMS):
        total += float(np.dot(a[c0:c0 + DOT_ELEMS], b[c0:c0 + DOT_ELEMS]))
    return total


def accumulate(out: np.ndarray, terms: list, copy_first: bool = True,
               check: str | None = None) -> None:
    """out (flat fp32) = sum of terms (or += when not copy_first), chunk by chunk, synchronously.
    The streaming commands use stream.run_plan instead (reads ahead on threads)."""
    n = out.size
    for c0 in range(0, n, CHUNK_ELEMS):
        c1 = min(n, c0 + CHUNK_ELEMS)
        dst = out[c0:c1]
        sides = [[dst if copy_first and k == 0 and i == 0 else np.empty(c1 - c0, np.float32)
                  for i in range(len(term.sides()))] for k, term in enumerate(terms)]
        for term, bufs in zip(terms, sides):
            for segs, buf in zip(term.sides(), bufs):
                read_side(segs, c0, c1, buf)
        combine(terms, sides, dst, into=not copy_first)
        if check is not None:
            check_finite(dst, check)


def as_array(out) -> np.ndarray:
    """A numpy view of a flat fp32 buffer given as numpy or as a CPU torch tensor (shares
    its memory)."""
    if isinstance(out, np.ndarray):
        return out
    return out.detach().numpy()


class SegmentSource:
    """Mixin for tensor sources that describe a tensor as Segments (`self.segments(name)`):
    the read paths (terms for stream.run_plan, accumulate into an fp32 buffer) are the same for
    every source. A source that is not one tensor per name (sources.DiffSource: plus - minus)
    overrides `terms` and keeps `add_into`."""

    def terms(self, name: str, alpha: float = 1.0) -> list:
        return [Term(tuple(self.segments(name)), alpha)]

    def add_into(self, name: str, out, alpha: float = 1.0, copy: bool = False) -> None:
        """out (flat fp32 numpy array or torch tensor, numel) += alpha * tensor, or = tensor when
        copy; chunked reads."""
        accumulate(as_array(out), self.terms(name, 1.0 if copy else alpha), copy_first=copy)
