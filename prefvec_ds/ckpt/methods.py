"""Merge methods: how the vectors of one tensor combine, one chunk at a time.

A merge is theta = base + lambda * mix(eta_1 * d_1, ..., eta_n * d_n), where d_i is vector i's
values of the tensor (phi_i = plus_i - minus_i, or a model's delta from the base). A method is
one entry of MERGE_METHODS: how each d_i is sparsified, and whether the weighted deltas elect a
sign per element (TIES) before they are summed.

    task_arithmetic   d_i as is, summed                       (the paper's merge; the default)
    ties              top-`density` magnitudes of each d_i, sign election, disjoint sum
    dare              each element kept with probability `density`, kept ones / density, summed
    dare_ties         dare's drop, then ties' sign election

`normalize` divides the mixed delta by the sum of the weights that took part in each element
(as mergekit's `normalize: true`; for ties that is a disjoint *mean*). Kernels are pure numpy
over fp32 chunks; a chunk is elements [offset, offset + n) of the flat tensor, so:
- the magnitude trim needs the tensor's k-th largest |d_i| before the merge pass: TopMagnitude
  finds it exactly in two streaming passes over the chunks (histograms of the float32 bit
  patterns: 2^15 bins of the high half, then 2^16 bins of the low half inside the boundary
  bin), never holding the tensor;
- dare's drop is a hash of (seed, tensor, vector, element index), not a stateful generator: the
  same seed drops the same elements whatever the chunking, the thread order or the resume.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

MergeMethodName = Literal["task_arithmetic", "ties", "dare", "dare_ties"]
_SIGN = np.uint32(0x7FFFFFFF)


@dataclass(frozen=True)
class MethodParams:
    """The knobs of a merge method (validated by check_params)."""
    density: float = 1.0
    """Fraction of each vector's elements kept (ties: by magnitude; dare: at random)."""
    normalize: bool = False
    """Divide by the sum of the weights that contributed to each element."""
    lam: float = 1.0
    """lambda: scale of the mixed delta added to the base."""
    seed: int = 0
    """dare's drop seed."""


@dataclass(frozen=True)
class ChunkContext:
    """Where a chunk lies: its tensor, its first element, per vector its trim threshold
    (TopMagnitude bits; empty when nothing is trimmed) and its id in the merge (the drop
    stream's key; default: its position)."""
    tensor: str
    offset: int
    thresholds: tuple = ()
    vector_ids: tuple = ()


@dataclass(frozen=True)
class Mix:
    """One output tensor's merge by a method (the stream executor's job description)."""
    method: str
    params: MethodParams
    vector_ids: tuple
    thresholds: tuple = ()

    def chunk(self, tensor: str, offset: int) -> ChunkContext:
        return ChunkContext(tensor, offset, self.thresholds, self.vector_ids)


@dataclass(frozen=True)
class MergeMethod:
    """One table entry: a sparsifier (or None) and whether signs are elected."""
    sparsify: Literal["magnitude", "random"] | None
    elect_sign: bool
    normalize_default: bool
    summary: str


MERGE_METHODS: dict[str, MergeMethod] = {
    "task_arithmetic": MergeMethod(None, False, False, "base + lambda * sum eta_i d_i"),
    "ties": MergeMethod("magnitude", True, True,
                        "trim to the top-density magnitudes, elect signs, disjoint mean"),
    "dare": MergeMethod("random", False, False,
                        "drop at random (keep density), rescale by 1/density, sum"),
    "dare_ties": MergeMethod("random", True, False, "dare's drop, then ties' election"),
}


def is_plain_sum(method: str, p: MethodParams) -> bool:
    """task arithmetic at lambda 1 without normalising: the executor's fused fast path."""
    return method == "task_arithmetic" and p.lam == 1.0 and not p.normalize


def check_params(method: str, p: MethodParams) -> None:
    """ValueError with one line naming the bad knob."""
    if method not in MERGE_METHODS:
        raise ValueError(f"merge method: expected one of {', '.join(MERGE_METHODS)}, "
                         f"got {method!r}")
    if not 0.0 < p.density <= 1.0:
        raise ValueError(f"density: expected a fraction in (0, 1], got {p.density}")
    if not np.isfinite(p.lam):
        raise ValueError(f"lambda: expected a finite number, got {p.lam}")


def needs_thresholds(method: str, p: MethodParams) -> bool:
    """Whether the method trims by magnitude (TopMagnitude passes before the merge pass)."""
    return MERGE_METHODS[method].sparsify == "magnitude" and p.density < 1.0


def _magnitude_bits(chunk: np.ndarray) -> np.ndarray:
    """|x| as uint32 bit patterns: ordered like the magnitudes (NaN is refused upstream)."""
    return chunk.view(np.uint32) & _SIGN


class TopMagnitude:
    """The k-th largest |x| of a tensor fed as chunks, exactly, in one or two passes.

        tm = TopMagnitude(numel, density)
        while True:
            for chunk in chunks:
                tm.feed(chunk)
            if not tm.end_pass():
                break
        tm.threshold()  -> uint32 bits; keep |x| bits >= it (k of them, more on exact ties)

    k = int(density * numel), as mergekit's magnitude sparsification; k = 0 keeps nothing.
    The second pass is skipped when the boundary bin of the first is taken whole.
    """

    def __init__(self, numel: int, density: float):
        self.k = int(density * numel)
        self.high = np.zeros(1 << 15, dtype=np.int64)
        self.low: np.ndarray | None = None   # the second pass's histogram
        self.boundary = -1     # high half of the threshold, after pass 1
        self.rank = 0          # how many to take from the boundary bin
        self.bits: int | None = None

    def feed(self, chunk: np.ndarray) -> None:
        bits = _magnitude_bits(np.ascontiguousarray(chunk, dtype=np.float32))
        if self.low is None:
            self.high += np.bincount(bits >> 16, minlength=1 << 15)
        else:
            inside = bits[(bits >> 16) == self.boundary]
            self.low += np.bincount(inside & 0xFFFF, minlength=1 << 16)

    def end_pass(self) -> bool:
        """Close the pass fed so far; True when one more pass over the same chunks is needed."""
        if self.low is not None:
            self.bits = (self.boundary << 16) | _top_bin(self.low, self.rank)
            return False
        if self.k <= 0:
            self.bits = 0xFFFFFFFF  # above every magnitude: nothing kept
            return False
        self.boundary = _top_bin(self.high, self.k)
        taken = int(self.high[self.boundary + 1:].sum())
        self.rank = self.k - taken
        if self.rank == self.high[self.boundary]:  # the whole bin is kept
            self.bits = self.boundary << 16
            return False
        self.low = np.zeros(1 << 16, dtype=np.int64)
        return True

    def threshold(self) -> int:
        if self.bits is None:
            raise RuntimeError("TopMagnitude: threshold() before its passes ended")
        return self.bits


def _top_bin(hist: np.ndarray, k: int) -> int:
    """The highest bin b with at least k counts in bins >= b."""
    above = np.cumsum(hist[::-1])[::-1]
    return int(np.nonzero(above >= k)[0][-1])


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser over uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def drop_key(seed: int, tensor: str, vector: int) -> np.uint64:
    """The stream key of one (tensor, vector): a stable hash, the same in every process."""
    digest = hashlib.blake2b(f"{seed}|{tensor}|{vector}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


_MASK_BLOCK = 1 << 16  # elements hashed at once: ~1.5 MiB of uint64/float64 temporaries


def kept_at_random(key: np.uint64, offset: int, n: int, density: float) -> np.ndarray:
    """Bool mask of elements [offset, offset + n) kept with probability `density`. Hashed in
    blocks, so a chunk's temporaries stay ~1.5 MiB rather than 25 bytes per element."""
    keep = np.empty(n, dtype=bool)
    for b0 in range(0, n, _MASK_BLOCK):
        b1 = min(n, b0 + _MASK_BLOCK)
        index = np.arange(offset + b0, offset + b1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            z = _splitmix64(index * np.uint64(0x9E3779B97F4A7C15) + key)
        uniform = (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
        np.less(uniform, density, out=keep[b0:b1])
    return keep


def _sparsified(method: MergeMethod, d: np.ndarray, i: int, p: MethodParams,
                ctx: ChunkContext) -> np.ndarray:
    if method.sparsify == "magnitude" and p.density < 1.0:
        return np.where(_magnitude_bits(d) >= np.uint32(ctx.thresholds[i]), d, np.float32(0))
    if method.sparsify == "random" and p.density < 1.0:
        vid = ctx.vector_ids[i] if ctx.vector_ids else i
        keep = kept_at_random(drop_key(p.seed, ctx.tensor, vid), ctx.offset, d.size,
                              p.density)
        return np.where(keep, d / np.float32(p.density), np.float32(0))
    return d


def kept_deltas(name: str, deltas: list[np.ndarray], weights: list[float], p: MethodParams,
                ctx: ChunkContext) -> list[np.ndarray]:
    """Each d_i as the method uses it: sparsified (trimmed, or dropped and rescaled), and where
    signs are elected, zero where eta_i * d_i lost the election; sum_i w_i * kept_i is the
    mix mix_chunk adds before normalising and lambda. The eval report's interference
    diagnostics (cosines, STI of the vectors each method effectively merges) read it."""
    method = MERGE_METHODS[name]
    sparse = [_sparsified(method, d, i, p, ctx) for i, d in enumerate(deltas)]
    if not method.elect_sign:
        return sparse
    weighted = [np.float32(w) * x for x, w in zip(sparse, weights)]
    total = np.sum(weighted, axis=0, dtype=np.float32)
    majority = np.where(total >= 0, np.float32(1), np.float32(-1))
    return [np.where(np.sign(x) == majority, d, np.float32(0)) for x, d in zip(weighted, sparse)]


def mix_chunk(name: str, out: np.ndarray, deltas: list[np.ndarray], weights: list[float],
              p: MethodParams, ctx: ChunkContext) -> None:
    """out += lambda * mix(weights, deltas) for one chunk, in place (out holds the base)."""
    method = MERGE_METHODS[name]
    weighted = [np.float32(w) * _sparsified(method, d, i, p, ctx)
                for i, (d, w) in enumerate(zip(deltas, weights))]
    total = np.sum(weighted, axis=0, dtype=np.float32)
    if method.elect_sign:
        majority = np.where(total >= 0, np.float32(1), np.float32(-1))
        agree = [np.sign(x) == majority for x in weighted]
        total = np.sum([np.where(a, x, np.float32(0)) for a, x in zip(agree, weighted)],
                       axis=0, dtype=np.float32)
        divisor = np.sum([a * np.float32(w) for a, w in zip(agree, weights)], axis=0,
                         dtype=np.float32)
        divisor[divisor == 0] = 1
    else:
        divisor = np.float32(sum(weights))
        divisor = np.float32(1) if abs(divisor) < 1e-8 else divisor
    if p.normalize:
        total /= divisor
    if p.lam != 1.0:
        total *= np.float32(p.lam)
    out += total
