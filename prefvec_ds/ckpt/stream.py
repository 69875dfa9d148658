"""Chunked, pipelined execution of a merge or vector plan: big sequential reads, arithmetic on
worker threads, writes in order on the calling thread.

A plan is a list of OutputTensor (name, size, output dtype, Terms). It is cut into jobs of at
most JOB_ELEMS elements, and also wherever a segment starts (a ZeRO-3 rank boundary), so each
input side of a job is one byte range of one file. Consecutive ranges of the same input stream
(a term's side in one file: e.g. the plus checkpoint's rank-1 partition, read front to back) are
coalesced into blocks of up to BLOCK_BYTES (two fp32 jobs), each read by one O_DIRECT request
(directio.py). A block may span up to _GAP bytes nobody asked for (a ZeRO-3 partition's padding
elements between two parameters): one read is cheaper than two, and those bytes are never used.
Each request has a fixed cost on this VM's disk: reading the 3 GB of fp32 partitions of the 374M
checkpoints from 2 threads (machine loaded) ran at 1.2 GB/s with 2 MiB requests (a rank half of
an attention matrix, the size of uncoalesced reads) and 1.6-1.8 GB/s with 16 MiB ones; with the
merge's 1.5 GB of writes going on, 4.5 GB of reads took 4.3-4.9 s in 4 MiB requests, 3.7-4.1 s
in 16 MiB ones. 8 MiB blocks keep most of that gain with half the memory (see below).

Three stages overlap: `workers` threads read blocks ahead in the order jobs need them (every block
the queued jobs need, and at least READ_AHEAD_BLOCKS buffers' worth), `workers` threads combine
each job in place in its blocks (numpy releases the GIL), check NaN/Inf and cast, and the calling
thread appends the results to the writer in order and gives each block's buffer back once its
last job is written. Every queue is bounded (at most 2 * workers + 2 jobs queued), so memory is
set by these bounds, not by the model or its largest tensor: ~0.15-0.2 GB peak RSS. Keeping it
small is also faster: fresh memory is expensive on first touch in this VM (256 MB took 0.1-2.9 s
in a new process), and with 16 MiB blocks and a 128 MiB cap (0.29 GB RSS) merges ran ~15% slower.
An error in any thread (a read, the arithmetic, NaN/Inf, the writer) stops the pipeline: queued
work is cancelled and the error is raised here.
"""

from __future__ import annotations

import collections
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prefvec_ds.ckpt import crc
from prefvec_ds.ckpt.crc import RecordCheck
from prefvec_ds.ckpt.directio import ALIGN, DirectReader, aligned_buffer
from prefvec_ds.ckpt.dtypes import ITEMSIZE, narrow_into, widen_into
from prefvec_ds.ckpt.methods import mix_chunk
from prefvec_ds.ckpt.segments import check_finite, check_finite_narrow, chunked_dot, combine

JOB_ELEMS = 1 << 20                 # output elements per job (4 MiB of fp32)
BLOCK_BYTES = 8 << 20               # wanted bytes of one read request, at most
READ_AHEAD_BLOCKS = 6               # block buffers held at least (48 MiB), when blocks remain
_BUF_BYTES = BLOCK_BYTES + 2 * ALIGN  # a block's buffer: its read widens to whole ALIGN blocks
_GAP = 64 << 10                     # skipped bytes a block may span (ZeRO-3 padding is a few)


@dataclass(frozen=True)
class OutputTensor:
    """One tensor to write: sum of `terms` cast to `dtype`, or with `raw` the first term's bytes
    as stored (integer buffers). `label` names it in NaN/Inf errors."""
    name: str
    numel: int
    dtype: str
    terms: tuple
    raw: bool = False
    label: str = ""
    mix: object = None   # methods.Mix: terms[1:] are mixed by a merge method, not summed


@dataclass(eq=False)
class _Block:
    """Bytes [start, end) of one file, read with one request; `refs` jobs still need them."""
    file: Path
    start: int
    end: int
    refs: int = 0
    future: object = None
    view: np.ndarray | None = None   # the bytes, once read
    buf: np.ndarray | None = None
    stream: tuple = ()
    records: set = field(default_factory=set)   # zip records (CRC-checked) its pieces are in
    checks: list = field(default_factory=list)  # crc.RecordCheck of each, set by run_plan


@dataclass(frozen=True)
class _Piece:
    """One job side: `nbytes` of `dtype` at `offset` in `block`."""
    block: _Block
    offset: int
    nbytes: int
    dtype: str

    def bytes(self) -> np.ndarray:
        return self.block.view[self.offset:self.offset + self.nbytes]


@dataclass
class _Job:
    tensor: OutputTensor
    lo: int
    hi: int
    pieces: list = field(default_factory=list)   # per term: per side: _Piece


def _sides(t: OutputTensor) -> list[list[tuple]]:
    """Per term, the segment lists the job reads (a raw tensor: its first term's first side)."""
    if t.raw:
        return [list(t.terms[0].sides()[:1])]
    return [list(term.sides()) for term in t.terms]


def _cuts(t: OutputTensor) -> list[tuple[int, int]]:
    """[lo, hi) ranges of `t`: cut at every segment start of every side, then into jobs of at
    most 4 MiB of the widest input (JOB_ELEMS of fp32), so a block holds two."""
    sides = [side for term in _sides(t) for side in term]
    cuts = sorted({0, t.numel} | {s.start for side in sides for s in side if 0 < s.start < t.numel})
    widest = max([ITEMSIZE[s.dtype] for side in sides for s in side] + [4])
    step = JOB_ELEMS * 4 // widest
    return [(lo, min(b, lo + step)) for a, b in zip(cuts, cuts[1:]) for lo in range(a, b, step)]


def plan_jobs(tensors: list[OutputTensor]) -> tuple[list[_Job], list[_Block]]:
    """Jobs in writing order, and the blocks they read, in the order they are first needed."""
    jobs, blocks, streams = [], [], {}
    for t in tensors:
        sides_per_term = _sides(t)
        for lo, hi in _cuts(t) or [(0, 0)]:  # a 0-element tensor: one empty job
            job = _Job(t, lo, hi, [[] for _ in sides_per_term])
            jobs.append(job)
            for k, sides in enumerate(sides_per_term):
                for s, side in enumerate(sides if hi > lo else ()):
                    seg = next(x for x in side if x.start <= lo < x.start + x.count)
                    size = ITEMSIZE[seg.dtype]
                    offset, nbytes = seg.offset + (lo - seg.start) * size, (hi - lo) * size
                    block = streams.get((k, s, seg.file))
                    if block is None or not block.end <= offset <= block.end + _GAP \
                            or offset + nbytes - block.start > BLOCK_BYTES:
                        block = streams[(k, s, seg.file)] = _Block(seg.file, offset, offset,
                                                                   stream=(k, s, seg.file))
                        blocks.append(block)
                    block.end, block.refs = offset + nbytes, block.refs + 1
                    if seg.record is not None:
                        block.records.add(seg.record)
                    job.pieces[k].append(_Piece(block, offset - block.start, nbytes, seg.dtype))
    return jobs, blocks


class _Pool:
    """Aligned buffers of one size, reused (fresh ones would cost page faults each time)."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self) -> np.ndarray:
        with self._lock:
            if self._free:
                return self._free.pop()
        return aligned_buffer(self.nbytes)

    def give(self, buf: np.ndarray) -> None:
        with self._lock:
            self._free.append(buf)


class _ReadAhead:
    """Submits block reads in first-use order: every block the queued jobs need, and more while
    fewer than READ_AHEAD_BLOCKS buffers are held. A buffer is counted from submission until
    its block's last job is written (release), so a run of tiny blocks cannot pile up buffers."""

    def __init__(self, blocks: list[_Block], executor, reader: DirectReader):
        self.blocks, self.executor, self.reader = blocks, executor, reader
        self.pool = _Pool(_BUF_BYTES)
        self.submitted = 0
        self.held = 0

    def _read(self, block: _Block) -> None:
        block.buf = self.pool.take()
        block.view = self.reader.read(block.file, block.start, block.end - block.start, block.buf)
        for check in block.checks:  # CRC of the bytes just read, on this (reading) thread
            rec = check.record
            lo, hi = max(block.start, rec.start), min(block.end, rec.start + rec.size)
            check.add(lo, block.view[lo - block.start:hi - block.start] if hi > lo else b"")

    def submit(self, upto: int = 0) -> None:
        """Submit reads until the first `upto` blocks are submitted and the read-ahead is full."""
        while self.submitted < len(self.blocks) and (self.submitted < upto
                                                      or self.held < READ_AHEAD_BLOCKS):
            block = self.blocks[self.submitted]
            block.future = self.executor.submit(self._read, block)
            self.submitted += 1
            self.held += 1

    def release(self, block: _Block) -> None:
        block.refs -= 1
        if block.refs == 0:
            self.pool.give(block.buf)
            block.buf = block.view = None
            self.held -= 1

    def cancel(self) -> None:
        for block in self.blocks[:self.submitted]:
            block.future.cancel()


def _fp32(piece: _Piece, scratch: _Pool, bufs: list) -> np.ndarray:
    if piece.dtype == "F32":
        return piece.bytes().view(np.float32)
    bufs.append(scratch.take())
    out = bufs[-1][:piece.nbytes // ITEMSIZE[piece.dtype] * 4].view(np.float32)
    widen_into(piece.bytes(), piece.dtype, out)
    return out


def _compute(job: _Job, scratch: _Pool, norms: bool):
    """One job, once its blocks are read -> (bytes to write, scratch to give back, sq. norm)."""
    for sides in job.pieces:
        for piece in sides:
            piece.block.future.result()  # re-raises the read's error
    t, bufs = job.tensor, []
    if job.hi == job.lo:
        return b"", bufs, 0.0
    if t.raw:
        return job.pieces[0][0].bytes(), bufs, 0.0
    sides = [[_fp32(p, scratch, bufs) for p in term_pieces] for term_pieces in job.pieces]
    out = sides[0][0]
    if t.mix is None:
        combine(t.terms, sides, out)   # in place, in the first term's block (or scratch)
    else:
        _mix(t, job.lo, sides, out)
    sq = chunked_dot(out, out) if norms else None
    if sq is None or not np.isfinite(sq):  # the dot is NaN/Inf whenever a value is
        check_finite(out, t.label or f"parameter {t.name}")
    if t.dtype == "F32":
        return out.view(np.uint8), bufs, sq
    bufs.append(scratch.take())
    data = bufs[-1][:out.size * ITEMSIZE[t.dtype]]
    narrow_into(out, t.dtype, data)
    # finite in fp32 may still overflow the output dtype (fp16 above 65504): check what is written
    check_finite_narrow(data, t.dtype, t.label or f"parameter {t.name}")
    return data, bufs, sq


def _mix(t: OutputTensor, lo: int, sides: list, out: np.ndarray) -> None:
    """out (the base's chunk) += the method's mix of the vector terms' (plus - minus)."""
    deltas = []
    for term, bufs in zip(t.terms[1:], sides[1:]):
        if term.minus is not None:
            np.subtract(bufs[0], bufs[1], out=bufs[0])
        deltas.append(bufs[0])
    mix_chunk(t.mix.method, out, deltas, [term.alpha for term in t.terms[1:]], t.mix.params,
              t.mix.chunk(t.name, lo))


def attach_crc_checks(blocks: list[_Block]) -> int:
    """Give each block the CRC checks of the zip records it reads (one check per record and
    input stream: every byte of a record is then checksummed once per stream that reads it).
    Returns the number of records checked."""
    checks: dict[tuple, RecordCheck] = {}
    for block in blocks:
        for rec in block.records:
            key = (block.stream, rec)
            if key not in checks:
                checks[key] = RecordCheck(rec, 0)
            checks[key].expected += 1
            block.checks.append(checks[key])
    return len(checks)


def run_plan(tensors: list[OutputTensor], writer, workers: int = 2, norms: bool = False,
             desc: str = "") -> float:
    """Compute every tensor chunk by chunk and append it to `writer` in order. Every zip
    record read is CRC-checked (crc.py) unless PREFVEC_VERIFY_CRC=0.

    Returns the total squared L2 norm of the fp32 results (before any cast) when `norms`,
    summed in a fixed order (deterministic), else 0.0.
    """
    jobs, blocks = plan_jobs(tensors)
    if crc.ENABLED:
        attach_crc_checks(blocks)
    first_use = {id(b): i for i, b in enumerate(blocks)}
    # need[j]: how many blocks (in first-use order) must be submitted before job j may run
    need, most = [], 0
    for job in jobs:
        most = max([most] + [first_use[id(p.block)] + 1 for s in job.pieces for p in s])
        need.append(most)
    scratch, reader, total = _Pool(JOB_ELEMS * 4), DirectReader(), 0.0
    depth = 2 * workers + 2  # jobs queued for the arithmetic threads
    try:
        with progress(sum(t.numel * ITEMSIZE[t.dtype] for t in tensors), desc) as bar, \
                ThreadPoolExecutor(workers, thread_name_prefix="prefvec-read") as rex, \
                ThreadPoolExecutor(workers, thread_name_prefix="prefvec-math") as cex:
            reads, pending = _ReadAhead(blocks, rex, reader), collections.deque()
            try:
                for j, job in enumerate(jobs):
                    while len(pending) < depth and j + len(pending) < len(jobs):
                        k = j + len(pending)
                        reads.submit(need[k])
                        pending.append(cex.submit(_compute, jobs[k], scratch, norms))
                    reads.submit()
                    data, bufs, sq = pending.popleft().result()
                    writer.append(job.tensor.name, data)  # copies: the buffers are free again
                    for buf in bufs:
                        scratch.give(buf)
                    for sides in job.pieces:
                        for piece in sides:
                            reads.release(piece.block)
                    total += sq or 0.0
                    bar.update(len(data))
            finally:  # on error: start no queued work; running work ends before the pools exit
                for fut in pending:
                    fut.cancel()
                reads.cancel()
    finally:
        reader.close()
    return total


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int) -> None:
        pass


def progress(total_bytes: int, desc: str):
    """A byte-counting progress bar on stderr when it is a terminal (tqdm is imported only then)."""
    if not sys.stderr.isatty():
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, file=sys.stderr,
                leave=False)
