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

O_DIRECT needs ALIGN-aligned offsets, lengths and buffers: a read fetches the aligned blocks
around the wanted bytes (the last one may end at the end of the file: a short read) and returns a
view of them; a written file is gathered in aligned stages, written in whole blocks, the last one
padded and the file truncated to its size. Where a file system refuses O_DIRECT (EINVAL at open
or at the first read or write), or with PREFVEC_DIRECT_IO=0, the same calls go through the page
cache. I/O errors become PrefvecErrors naming the file.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading

import numpy as np

from prefvec_ds import PrefvecError

ALIGN = 4096            # covers 512-byte and 4 KiB logical blocks
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


def _align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _io_error(path, what: str, err: OSError) -> PrefvecError:
    return PrefvecError(f"file {path}: {what} failed: {err.strerror or err}")


def pread_exact(fd: int, view, offset: int, path) -> None:
    """Fill `view` with the bytes of `fd` (the file `path`) from `offset`, or raise at its end."""
    view = memoryview(view).cast("B")
    done = 0
    while done < len(view):  # preadv may return short counts on big reads
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as err:
            raise _io_error(path, f"read at byte {offset + done}", err) from err
        if n <= 0:
            raise PrefvecError(f"file {path}: unexpected end of file at byte {offset + done}")
        done += n


class DirectReader:
    """Positioned reads with O_DIRECT where the file allows it, else through the page cache.
    One fd per file and way, shared by all threads (preadv is positional); closed by close()."""

    def __init__(self):
        self._direct: dict[str, int | None] = {}  # None: O_DIRECT refused for this file
        self._plain: dict[str, int] = {}
        self._refused: list[int] = []  # O_DIRECT fds that refused a read; another thread may
        self._lock = threading.Lock()  # still be in a read on one, so they close at the end

    def _fd(self, path, direct: bool) -> int | None:
        key, table = str(path), self._direct if direct else self._plain
        with self._lock:
            if key not in table:
                try:
                    table[key] = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
                except OSError as err:
                    if not direct or err.errno != errno.EINVAL:
                        raise _io_error(path, "open", err) from err
                    table[key] = None
            return table[key]

    def read(self, path, offset: int, nbytes: int, buf: np.ndarray) -> np.ndarray:
        """Bytes [offset, offset + nbytes) of `path`, as a view into `buf` (2 MiB-aligned, at
        least nbytes + 2 * ALIGN long: the read widens to whole blocks)."""
        if buf.size < nbytes + 2 * ALIGN:
            raise ValueError(f"buffer of {buf.size} bytes for a read of {nbytes}")
        fd = self._fd(path, True) if ENABLED else None
        if fd is not None:
            start = offset - offset % ALIGN
            head = offset - start
            try:
                got = _pread_blocks(fd, memoryview(buf)[:_align_up(head + nbytes)], start)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise _io_error(path, f"read at byte {start}", err) from err
                with self._lock:  # opened O_DIRECT, yet refused it: page cache from now on
                    if self._direct.get(str(path)) == fd:
                        self._direct[str(path)] = None
                        self._refused.append(fd)
            else:
                if got < head + nbytes:
                    raise PrefvecError(f"file {path}: unexpected end of file at byte {start + got}")
                return buf[head:head + nbytes]
        view = buf[:nbytes]
        pread_exact(self._fd(path, False), view, offset, path)
        return view

    def close(self) -> None:
        with self._lock:
            for fd in [*self._direct.values(), *self._plain.values(), *self._refused]:
                if fd is not None:
                    os.close(fd)
            self._direct.clear()
            self._plain.clear()
            self._refused.clear()


def _pread_blocks(fd: int, view: memoryview, offset: int) -> int:
    """O_DIRECT read of whole blocks until `view` is full or the file ends; bytes read."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        done += n
        if n == 0 or n % ALIGN:  # a partial block: the end of the file
            break
    return done


class BufferedFile:
    """Unbuffered write() calls into the page cache; `durable` starts write-back of every piece
    at once (fadvise DONTNEED) and fdatasyncs on close."""

    def __init__(self, path, durable: bool = True):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.durable = durable
        self.pos = 0

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        start = self.pos
        try:
            while view:  # a single write() stops at ~2 GiB on Linux
                n = os.write(self.fd, view)
                view = view[n:]
                self.pos += n
            if self.durable and self.pos > start and hasattr(os, "posix_fadvise"):
                # DONTNEED on just-written pages starts their write-back now (asynchronously)
                # and drops them from the page cache once clean: disk writes overlap our reads.
                os.posix_fadvise(self.fd, start, self.pos - start, os.POSIX_FADV_DONTNEED)
        except OSError as err:
            raise _io_error(self.path, "write", err) from err

    def close(self, complete: bool = True) -> None:
        if self.fd < 0:
            return
        try:
            if complete and self.durable:
                os.fdatasync(self.fd)
        except OSError as err:
            raise _io_error(self.path, "write", err) from err
        finally:
            os.close(self.fd)
            self.fd = -1


class DirectFile:
    """O_DIRECT writes of whole aligned STAGE_BYTES blocks, from aligned staging buffers (the
    copy into them is a user-space memcpy with the GIL released), by a background thread: the
    caller goes on while the device writes, and the device always has a write queued. Memory is
    the STAGES buffers, which circulate between the caller and the thread (so both queues hold
    at most STAGES items). Always durable. Construct with `open_output`, which falls back to
    BufferedFile where O_DIRECT is refused at open; a refusal at the first write switches the
    thread to the page cache."""

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
                if self._error is not None:  # a failed write: stop at once
                    raise self._error
                self._full.put((self.stage, STAGE_BYTES, self.pos))
                self.pos += STAGE_BYTES
                self.fill = 0
                self.stage = self._free.get()

    def _drain(self) -> None:
        while (item := self._full.get()) is not None:
            stage, nbytes, pos = item
            try:
                if self._error is None:
                    self._pwrite(memoryview(stage)[:nbytes], pos)
            except OSError as err:  # reported by the next write() or by close()
                self._error = _io_error(self.path, f"write at byte {pos}", err)
            except BaseException as err:
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
        """Write what is staged (padded to a block), wait for the thread, truncate to size and
        fdatasync; with complete=False (an error elsewhere) just stop the thread and close."""
        if self.fd < 0:
            return
        size = self.pos + self.fill
        if complete and self.fill and self._error is None:
            padded = _align_up(self.fill)  # the truncate below drops the padding
            self.stage[self.fill:padded] = 0
            self._full.put((self.stage, padded, self.pos))
        self._full.put(None)
        self._thread.join()  # always: the thread must not outlive the fd
        try:
            if complete:
                if self._error is not None:
                    raise self._error
                os.ftruncate(self.fd, size)
                os.fdatasync(self.fd)  # file size, and the device's write cache
        except OSError as err:
            raise _io_error(self.path, "write", err) from err
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
                raise _io_error(path, "open", err) from err
    try:
        return BufferedFile(path, durable)
    except OSError as err:
        raise _io_error(path, "open", err) from err
