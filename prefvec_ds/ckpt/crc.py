"""CRC-32 verification of the zip records (torch checkpoint storages) a streaming plan reads.

A rank file's fp32 partition is one uncompressed zip entry with the CRC-32 its writer recorded.
The streaming reader (stream.py) reads it in blocks, out of order, on several threads, and skips
a few padding bytes between parameters; so each block's bytes are checksummed where they were
read (zlib.crc32 releases the GIL: it overlaps the other reads and the arithmetic), the pieces
are joined with crc32_combine (no second pass over the data), and only the skipped padding
(a few elements per parameter on the last ranks) is read again. When the last block of a record
is in, the joined CRC must equal the stored one, else the read fails naming file and record:
finite garbage in a partition is an error, not a wrong vector.

The synchronous readers (segments.accumulate: vector-stats, apply_vectors) checksum each chunk as
they read it into TRACKER, and verify every record they touched at the end (TRACKER.verify).

PREFVEC_VERIFY_CRC=0 turns the check off (trusted inputs; the benchmark measures its cost).
"""

from __future__ import annotations

import os
import threading
import zlib

from prefvec_ds import PrefvecError

ENABLED = os.environ.get("PREFVEC_VERIFY_CRC", "1") != "0"
try:  # ISA-L's carry-less-multiply CRC: ~39 GB/s here against zlib's ~2-4 GB/s, so the check
    from isal.isal_zlib import crc32 as _crc32  # costs the merge a few percent, not +61%
except ImportError:  # same values, slower
    _crc32 = zlib.crc32
_GAP_CHUNK = 8 << 20


def _times(matrix: list[int], vector: int) -> int:
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _square(matrix: list[int]) -> list[int]:
    return [_times(matrix, matrix[n]) for n in range(32)]


def _zero_operators(count: int = 48) -> list[list[int]]:
    """ops[k]: the GF(2) operator that appends 2**k zero bytes to a CRC (zlib's method)."""
    odd = [0xEDB88320] + [1 << n for n in range(31)]  # one zero bit
    ops, m = [], _square(_square(_square(odd)))  # 8 zero bits = one byte
    for _ in range(count):
        ops.append(m)
        m = _square(m)
    return ops


_OPS = _zero_operators()


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A + B from crc(A), crc(B) and len(B), without the bytes (~0.1 ms)."""
    k = 0
    while len2:
        if len2 & 1:
            crc1 = _times(_OPS[k], crc1)
        len2 >>= 1
        k += 1
    return crc1 ^ crc2


class RecordCheck:
    """Pieces (start, end, crc) of one record as one stream read them; verified when the
    `expected` pieces are in."""

    def __init__(self, record, expected: int):
        self.record, self.expected = record, expected
        self.pieces: list[tuple[int, int, int]] = []
        self._lock = threading.Lock()

    def add(self, start: int, data) -> None:
        """Add the bytes `data` read at absolute offset `start`; the last piece verifies."""
        piece = (start, start + len(data), _crc32(data))
        with self._lock:
            self.pieces.append(piece)
            last = len(self.pieces) == self.expected
        if last:
            self.verify()

    def verify(self) -> None:
        rec = self.record
        crc, pos, end = 0, rec.start, rec.start + rec.size
        for start, stop, piece_crc in sorted(self.pieces):
            if start > pos:  # padding nobody asked for: read it (a few bytes per parameter)
                crc = self._read_into_crc(crc, pos, start)
                pos = start
            if start == pos:
                crc, pos = crc32_combine(crc, piece_crc, stop - start), stop
            elif stop > pos:  # overlaps what is already in (blocks of differing layouts)
                crc = self._read_into_crc(crc, pos, stop)
                pos = stop
        if pos < end:
            crc = self._read_into_crc(crc, pos, end)
        if crc != rec.crc:
            raise PrefvecError(f"file {rec.file}: record {rec.name}: CRC-32 {crc:08x}, but the "
                               f"zip directory says {rec.crc:08x}: the checkpoint is corrupt "
                               "(its bytes changed after it was written)")

    def _read_into_crc(self, crc: int, start: int, stop: int) -> int:
        with open(self.record.file, "rb", buffering=0) as fh:
            fh.seek(start)
            while start < stop:
                data = fh.read(min(_GAP_CHUNK, stop - start))
                if not data:
                    raise PrefvecError(f"file {self.record.file}: unexpected end of file at "
                                       f"byte {start} (record {self.record.name})")
                crc = _crc32(data, crc)
                start += len(data)
        return crc


class ReadTracker:
    """CRC pieces of the records read by the synchronous readers, verified together at the end
    (there is no plan telling when a record's last piece is in)."""

    def __init__(self):
        self._checks: dict = {}
        self._lock = threading.Lock()

    def add(self, record, start: int, data) -> None:
        piece = (start, start + len(data), _crc32(data))
        with self._lock:
            check = self._checks.get(record)
            if check is None:
                check = self._checks[record] = RecordCheck(record, 0)
            check.pieces.append(piece)

    def clear(self) -> None:
        with self._lock:
            self._checks = {}

    def verify(self) -> None:
        """Verify (and forget) every record read since the last verify or clear."""
        with self._lock:
            checks, self._checks = list(self._checks.values()), {}
        for check in checks:
            check.verify()


TRACKER = ReadTracker()
