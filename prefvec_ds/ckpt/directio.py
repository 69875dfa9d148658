"""O_DIRECT reads and writes for the streaming commands (`prefvec vector`, `prefvec merge`).

Why: on this kind of machine (a VM, 2 cores shared with other jobs) moving data through the page
cache is what costs CPU. perf of a merge: 35% of samples copying 1.5 GB of writes into fresh
page-cache pages, 26% copying 4.5 GB of reads out of it, ~15% in page-cache locking. Measured on
the 374M checkpoints while the machine was loaded (reading 3 GB of fp32 partitions, 4 files):
buffered reads 0.08-0.44 GB/s for 2-7 s of CPU, O_DIRECT 4 MiB reads into huge-page buffers from
2 threads 1.5-1.9 GB/s for 0.05 s of CPU; writing 1 GiB: buffered + fdatasync 0.10-0.92 GB/s for
0.35-3.3 s of CPU, O_DIRECT 1.2-1.8 GB/s for 0.06 s. The device then copies straight between the
file and our buffers.

Huge pages matter: an O_DIRECT request is cut into at most 254 memory segments (virtio-blk here),
so with 4 KiB pages a request is ~1 MiB and reads ran at 0.5-0.6 GB/s; buffers on transparent huge
pages (2 MiB, MAP_PRIVATE + MADV_HUGEPAGE) let requests reach the device's 4 MiB limit.

O_DIRECT needs 4096-aligned offsets, lengths and buffers: a read fetches the aligned blocks around
the wanted bytes and returns a view of them; a written file is gathered in an aligned stage,
written in whole blocks, the last one padded and the file truncated to its size. Where a file
system refuses O_DIRECT (EINVAL), or PREFVEC_DIRECT_IO=0, the same calls go through the page cache.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading

import numpy as np

from prefvec_ds import PrefvecError

ALIGN = 4096
_HUGE = 2 << 20
STAGE_BYTES = 8 << 20   # one O_DIRECT write
ENABLED = os.environ.get("PREFVEC_DIRECT_IO", "1") != "0" and hasattr(os, "O_DIRECT")


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A zero-filled uint8 array at a 2 MiB-aligned address, on huge pages where the kernel has
    them (private anonymous memory: shared anonymous maps do not get transparent huge pages)."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    area = mmap.mmap(-1, nbytes + _HUGE, flags=flags) if flags else mmap.mmap(-1, nbytes + _HUGE)
    start = (-np.frombuffer(area, dtype=np.uint8).ctypes.data) % _HUGE
    if hasattr(area, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            area.madvise(mmap.MADV_HUGEPAGE, start, nbytes)
        except OSError:
            pass
    return np.frombuffer(area, dtype=np.uint8, count=nbytes, offset=start)


class DirectReader:
    """Positioned reads with O_DIRECT where the file allows it, else through the page cache.
    File descriptors are shared by all threads (preadv is positional) and closed by close()."""

    def __init__(self):
        self._fds: dict[tuple, int | None] = {}
        self._plain: dict[tuple, int] = {}
        self._lock = threading.Lock()

    def _fd(self, path, direct: bool) -> int | None:
        st = os.stat(path)  # keyed by inode and mtime too: a rewritten file gets a fresh fd
        key = (str(path), st.st_ino, st.st_mtime_ns)
        table = self._fds if direct else self._plain
        if key not in table:
            with self._lock:
                if key not in table:
                    try:
                        table[key] = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
                    except OSError as err:
                        if not direct or err.errno != errno.EINVAL:
                            raise
                        table[key] = None
        return table[key]

    def read(self, path, offset: int, nbytes: int, buf: np.ndarray) -> np.ndarray:
        """Bytes [offset, offset + nbytes) of `path`, as a view into `buf` (aligned, at least
        nbytes + 2 * ALIGN long)."""
        fd = self._fd(path, True) if ENABLED else None
        if fd is not None:
            start = offset - offset % ALIGN
            head = offset - start
            want = -(-(head + nbytes) // ALIGN) * ALIGN
            try:
                got = _pread_blocks(fd, memoryview(buf)[:want], start)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
            else:
                if got < head + nbytes:
                    raise PrefvecError(f"file {path}: unexpected end of file at byte {start + got}")
                return buf[head:head + nbytes]
            with self._lock:  # opened O_DIRECT, yet refused it: page cache from now on
                for key, direct_fd in self._fds.items():
                    if key[0] == str(path) and direct_fd is not None:
                        os.close(direct_fd)
                        self._fds[key] = None
        view = buf[:nbytes]
        _pread_all(self._fd(path, False), view, offset, path)
        return view

    def close(self) -> None:
        with self._lock:
            for fd in [*self._fds.values(), *self._plain.values()]:
                if fd is not None:
                    os.close(fd)
            self._fds.clear()
            self._plain.clear()


def _pread_blocks(fd: int, view: memoryview, offset: int) -> int:
    """O_DIRECT read of whole blocks until `view` is full or the file ends; bytes read."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        done += n
        if n == 0 or n % ALIGN:  # a partial block: the end of the file
            break
    return done


def _pread_all(fd: int, view, offset: int, path) -> None:
    view = memoryview(view).cast("B")
    done = 0
    while done < len(view):  # preadv may return short counts on big reads
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise PrefvecError(f"file {path}: unexpected end of file at byte {offset + done}")
        done += n


class BufferedFile:
    """Unbuffered write() calls into the page cache; `durable` starts write-back of every piece
    at once (fadvise DONTNEED) and fdatasyncs on close."""

    def __init__(self, path, durable: bool = True):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.durable = durable
        self.pos = 0

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        start = self.pos
        while view:  # a single write() stops at ~2 GiB on Linux
            n = os.write(self.fd, view)
            view = view[n:]
            self.pos += n
        if self.durable and self.pos > start and hasattr(os, "posix_fadvise"):
            # DONTNEED on just-written pages starts their write-back now (asynchronously) and
            # drops them from the page cache once clean: disk writes overlap our reads.
            os.posix_fadvise(self.fd, start, self.pos - start, os.POSIX_FADV_DONTNEED)

    def close(self, complete: bool = True) -> None:
        if self.fd < 0:
            return
        try:
            if complete and self.durable:
                os.fdatasync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = -1


class DirectFile:
    """O_DIRECT writes of whole aligned STAGE_BYTES blocks, from aligned staging buffers (the
    copy into them is a user-space memcpy with the GIL released), by a background thread: the
    caller goes on while the device writes, and the device always has a write queued. Always
    durable. Construct with `open_output`, which falls back to BufferedFile where O_DIRECT is
    refused."""

    STAGES = 2  # one being written while the other fills

    def __init__(self, path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        self._free: queue.Queue = queue.Queue()
        for _ in range(self.STAGES):
            self._free.put(aligned_buffer(STAGE_BYTES))
        self._full: queue.Queue = queue.Queue()
        self.stage = self._free.get()
        self.fill = 0   # bytes waiting in the stage
        self.pos = 0    # file offset of the stage's first byte (always aligned)
        self.buffered = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="prefvec-write", daemon=True)
        self._thread.start()

    def write(self, data) -> None:
        src = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        while src.size:
            n = min(src.size, STAGE_BYTES - self.fill)
            self.stage[self.fill:self.fill + n] = src[:n]
            self.fill += n
            src = src[n:]
            if self.fill == STAGE_BYTES:
                self._hand_over(STAGE_BYTES)
                self.stage = self._free.get()

    def _hand_over(self, nbytes: int) -> None:
        if self._error is not None:
            raise self._error
        self._full.put((self.stage, nbytes, self.pos))
        self.pos += self.fill
        self.fill = 0

    def _drain(self) -> None:
        while True:
            item = self._full.get()
            if item is None:
                return
            stage, nbytes, pos = item
            try:
                if self._error is None:
                    self._pwrite(memoryview(stage)[:nbytes], pos)
            except BaseException as err:  # reported by the next write() or close()
                self._error = err
            self._free.put(stage)

    def _pwrite(self, view: memoryview, pos: int) -> None:
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(self.fd, view[done:], pos + done)
            except OSError as err:  # opened O_DIRECT, yet refuses it: go through the page cache
                if err.errno != errno.EINVAL or self.buffered:
                    raise
                fd, self.fd = self.fd, os.open(self.path, os.O_WRONLY)
                os.close(fd)
                self.buffered = True

    def close(self, complete: bool = True) -> None:
        if self.fd < 0:
            return
        try:
            size = self.pos + self.fill
            if complete and self.fill:  # pad the last block; the truncate drops the padding
                padded = -(-self.fill // ALIGN) * ALIGN
                self.stage[self.fill:padded] = 0
                self._hand_over(padded)
            self._full.put(None)
            self._thread.join()
            if complete:
                if self._error is not None:
                    raise self._error
                os.ftruncate(self.fd, size)
                os.fdatasync(self.fd)  # file size, and the device's write cache
        finally:
            os.close(self.fd)
            self.fd = -1


def open_output(path, direct: bool, durable: bool = True):
    """A DirectFile when `direct` and the file system supports O_DIRECT, else a BufferedFile."""
    if direct and ENABLED:
        try:
            return DirectFile(path)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
    return BufferedFile(path, durable)
