"""The streaming pipeline and its I/O: O_DIRECT alignment at the end of a file, the page-cache
fallbacks where O_DIRECT is refused, block sizes, bounded buffers, errors from threads."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from prefvec_ds import PrefvecError
from prefvec_ds.ckpt import directio, stream
from prefvec_ds.ckpt.merge import merge_vectors
from prefvec_ds.ckpt.segments import Segment, Term
from prefvec_ds.ckpt.sources import open_vector_arg
from tests.ckpt_fixtures import pico_state_dict, write_hf_folder, write_synthetic_zero3

pytestmark = pytest.mark.unit


def _merge_inputs(root: Path) -> str:
    write_hf_folder(root / "base", pico_state_dict(0), {"model_type": "toy"})
    write_synthetic_zero3(root / "p", pico_state_dict(1), 2, sub_group=25)
    write_synthetic_zero3(root / "m", pico_state_dict(2), 3)
    return f"{root / 'p'},{root / 'm'}"


def _merge(root: Path, out: str) -> bytes:
    pair = f"{root / 'p'},{root / 'm'}"
    merge_vectors(root / "base", [(open_vector_arg(pair), 0.3)], root / out, workers=2)
    return (root / out / "model.safetensors").read_bytes()


@pytest.fixture
def direct_io(monkeypatch):
    """O_DIRECT on, also under PREFVEC_DIRECT_IO=0: these tests are about that path."""
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    monkeypatch.setattr(directio, "ENABLED", True)


def _no_pipeline_threads() -> bool:
    return not [t for t in threading.enumerate() if t.name.startswith("prefvec-")]


@pytest.mark.parametrize("direct", [True, False])
def test_reads_at_unaligned_offsets_up_to_the_end_of_the_file(tmp_path, monkeypatch, direct):
    """O_DIRECT reads widen to whole 4 KiB blocks; the last block of a file is short."""
    monkeypatch.setattr(directio, "ENABLED", direct and hasattr(os, "O_DIRECT"))
    data = np.random.default_rng(0).integers(0, 255, 3 * directio.ALIGN + 123, dtype=np.uint8)
    path = tmp_path / "f.bin"
    path.write_bytes(data.tobytes())
    reader, buf = directio.DirectReader(), directio.aligned_buffer(4 * directio.ALIGN + 9000)
    try:
        for offset, nbytes in [(0, data.size), (1, 5), (4095, 2), (3 * 4096, 123),
                               (data.size - 7, 7), (5000, data.size - 5000), (data.size, 0)]:
            got = reader.read(path, offset, nbytes, buf)
            assert np.array_equal(got, data[offset:offset + nbytes]), (offset, nbytes)
        with pytest.raises(PrefvecError, match="unexpected end of file"):
            reader.read(path, data.size - 10, 11, buf)
    finally:
        reader.close()


def test_o_direct_refused_at_open_goes_through_the_page_cache(tmp_path, monkeypatch, direct_io):
    """A file system that refuses O_DIRECT at open (EINVAL, as tmpfs did before Linux 6.6):
    same output bytes, every file read and written through the page cache."""
    _merge_inputs(tmp_path)
    want = _merge(tmp_path, "direct")
    real_open, refused = os.open, []

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(directio.os, "open", no_direct)
    assert _merge(tmp_path, "cached") == want
    assert any(str(p).endswith("optim_states.pt") for p in refused)
    assert any(str(p).endswith("model.safetensors") for p in refused)  # the output shard


def test_o_direct_refused_at_read_goes_through_the_page_cache(tmp_path, monkeypatch, direct_io):
    """Opened with O_DIRECT, yet the first read is refused (EINVAL): the reader switches that
    file to the page cache, mid-run, with the same result."""
    _merge_inputs(tmp_path)
    want = _merge(tmp_path, "direct")
    real_preadv, refused = os.preadv, []

    def refuse_direct(fd, buffers, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(directio.os, "preadv", refuse_direct)
    assert _merge(tmp_path, "cached") == want and refused


@pytest.mark.skipif(not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK),
                    reason="no writable /dev/shm")
def test_merge_on_tmpfs(tmp_path):
    """Inputs and output on tmpfs (O_DIRECT accepted there since Linux 6.6, refused before):
    the same bytes as on the test's own file system, whichever way the kernel goes."""
    import tempfile

    _merge_inputs(tmp_path)
    want = _merge(tmp_path, "here")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        _merge_inputs(Path(shm))
        assert _merge(Path(shm), "out") == want


def test_blocks_hold_two_jobs_and_cuts_follow_segments():
    f = Path("/nonexistent")
    n = 10 * stream.JOB_ELEMS + 12345
    base = Term((Segment(0, n, "BF16", f, 100),))
    half = n // 2 + 1
    pair = Term((Segment(0, half, "F32", f, 7), Segment(half, n - half, "F32", f, 10**9)), 0.5,
                (Segment(0, n, "F32", f, 3 * 10**9),))
    jobs, blocks = stream.plan_jobs([stream.OutputTensor("w", n, "F32", (base, pair))])
    assert all(job.hi - job.lo <= stream.JOB_ELEMS for job in jobs)
    assert {job.lo for job in jobs} >= {0, half}  # cut at the rank boundary
    assert sum(job.hi - job.lo for job in jobs) == n
    sizes = [b.end - b.start for b in blocks]
    assert max(sizes) <= stream.BLOCK_BYTES
    assert sorted(sizes)[len(sizes) // 2] > stream.BLOCK_BYTES // 2  # not one job per block
    assert sum(b.refs for b in blocks) == sum(len(s) for j in jobs for s in j.pieces)


class _Collect:
    def __init__(self):
        self.data: dict[str, bytearray] = {}

    def append(self, name, data):
        self.data.setdefault(name, bytearray()).extend(memoryview(data).cast("B"))


def test_many_tiny_blocks_hold_a_bounded_number_of_buffers(tmp_path, monkeypatch):
    """Thousands of small tensors that cannot be coalesced: buffers are counted as held, not by
    their bytes, so the pipeline never allocates more than the read-ahead plus the jobs in flight
    (each buffer is 8 MiB on huge pages: 2 MiB resident once touched)."""
    count, values = 3000, np.arange(3000 * 8, dtype=np.float32)
    path = tmp_path / "f.bin"
    path.write_bytes(values.tobytes())
    monkeypatch.setattr(stream, "_GAP", -1)  # no coalescing across the 16-byte holes
    plan = [stream.OutputTensor(f"t{i}", 4, "F32", (Term((Segment(0, 4, "F32", path, 32 * i),)),))
            for i in range(count)]
    allocated = []
    real = stream.aligned_buffer
    monkeypatch.setattr(stream, "aligned_buffer", lambda n: allocated.append(n) or real(n))
    out = _Collect()
    stream.run_plan(plan, out, workers=2)
    assert all(bytes(out.data[f"t{i}"]) == values[8 * i:8 * i + 4].tobytes() for i in range(count))
    depth = 2 * 2 + 2
    assert len(allocated) <= stream.READ_AHEAD_BLOCKS + depth + 1, len(allocated)


def test_read_error_in_a_thread_is_raised_and_stops_everything(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(np.ones(1000, np.float32).tobytes())
    plan = [stream.OutputTensor("a", 500, "F32", (Term((Segment(0, 500, "F32", path, 0),)),)),
            stream.OutputTensor("b", 600, "F32", (Term((Segment(0, 600, "F32", path, 2000),)),))]
    with pytest.raises(PrefvecError, match=f"file {path}: unexpected end of file"):
        stream.run_plan(plan, _Collect(), workers=2)
    assert _no_pipeline_threads()


@pytest.mark.parametrize("direct", [True, False])
def test_write_error_names_the_shard_and_leaves_no_output(tmp_path, monkeypatch, direct):
    monkeypatch.setattr(directio, "ENABLED", direct and hasattr(os, "O_DIRECT"))
    _merge_inputs(tmp_path)

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(directio.os, "pwrite", disk_full)
    monkeypatch.setattr(directio.os, "write", disk_full)
    with pytest.raises(PrefvecError, match="model.safetensors: write.* failed: No space left"):
        _merge(tmp_path, "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    assert _no_pipeline_threads()
