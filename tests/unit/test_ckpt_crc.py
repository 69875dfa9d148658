"""CRC-32 of every zip record the streaming reader reads (issue 14): finite garbage written into
an fp32 partition, or into its padding, is an error naming file and record, not a wrong vector."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest

from prefvec_ds.ckpt.crc import crc32_combine
from prefvec_ds.ckpt.stream import attach_crc_checks, plan_jobs
from prefvec_ds.ckpt.sources import DiffSource, open_source
from prefvec_ds.ckpt.zero3 import Zero3Checkpoint
from prefvec_ds.cli import main
from tests.ckpt_fixtures import pico_state_dict, write_synthetic_zero3

pytestmark = pytest.mark.unit


@pytest.fixture
def pair(tmp_path):
    plus = write_synthetic_zero3(tmp_path / "plus", pico_state_dict(1, tiny=True), 3, sub_group=20)
    minus = write_synthetic_zero3(tmp_path / "minus", pico_state_dict(2, tiny=True), 3,
                                  sub_group=20)
    return plus, minus


def test_crc32_combine_matches_zlib():
    rng = np.random.default_rng(0)
    for n1, n2 in [(0, 5), (7, 0), (1, 1), (1000, 4096), (3, 1 << 20)]:
        a, b = rng.bytes(n1), rng.bytes(n2)
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), n2) == zlib.crc32(a + b)


def _poke(path, offset, value: float) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(struct.pack("<f", value))


def _vector(pair, out):
    plus, minus = pair
    return main(["vector", "--plus", str(plus), "--minus", str(minus), "--out", str(out)])


def test_finite_garbage_in_a_partition_is_refused(pair, tmp_path, capsys):
    assert _vector(pair, tmp_path / "ok") == 0  # the intact checkpoint passes the check
    seg = Zero3Checkpoint(pair[0]).segments("layers.1.proj.weight")[1]
    _poke(seg.file, seg.offset + 8, 0.125)  # a plausible weight: no NaN/Inf check catches it
    assert _vector(pair, tmp_path / "v") == 2
    err = capsys.readouterr().err
    assert f"file {seg.file}" in err and f"record {seg.record.name}" in err and "CRC-32" in err
    assert not (tmp_path / "v").exists() and not list(tmp_path.glob(".v.*"))


def test_garbage_in_padding_nobody_reads_is_found_too(pair, tmp_path, capsys):
    ckpt = Zero3Checkpoint(pair[0])
    slot = ckpt.layout.slots["layers.0.norm.weight"]  # 5 elements on 3 ranks: p = 2, rank 2
    assert slot.rank_range(2) == (4, 1)                # holds 1 value and 1 padding element
    flat = ckpt._flat[2][slot.group]
    _poke(flat.file, flat.offset + (slot.offset + 1) * 4, 1.0)
    assert _vector(pair, tmp_path / "v") == 2
    assert "CRC-32" in capsys.readouterr().err


def test_every_block_of_a_record_is_checked_once_per_stream(pair):
    diff = DiffSource(open_source(pair[0], "plus"), open_source(pair[1], "minus"))
    from prefvec_ds.ckpt.stream import OutputTensor

    plan = [OutputTensor(n, int(np.prod(diff.shape(n))), "F32", tuple(diff.terms(n)))
            for n in diff.names()]
    _jobs, blocks = plan_jobs(plan)
    records = {r for b in blocks for r in b.records}
    assert attach_crc_checks(blocks) == len(records) > 2  # 3 ranks x sub-groups, both sides
    assert all(b.checks for b in blocks)


def test_crc_check_can_be_turned_off_for_trusted_inputs(pair, tmp_path):
    seg = Zero3Checkpoint(pair[0]).segments("head.weight")[0]
    _poke(seg.file, seg.offset, 0.5)
    import subprocess
    import sys

    env = {**os.environ, "PREFVEC_VERIFY_CRC": "0"}
    proc = subprocess.run([sys.executable, "-m", "prefvec_ds.cli", "vector", "--plus",
                           str(pair[0]), "--minus", str(pair[1]), "--out", str(tmp_path / "v")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_vector_stats_and_apply_verify_the_records_they_read(pair, capsys):
    import torch

    from prefvec_ds.ckpt import apply_vectors
    from prefvec_ds import PrefvecError

    vec = f"{pair[0]},{pair[1]}"
    assert main(["vector-stats", vec]) == 0
    seg = Zero3Checkpoint(pair[1]).segments("embed.weight")[1]
    _poke(seg.file, seg.offset + 4, -0.25)
    assert main(["vector-stats", vec]) == 2
    err = capsys.readouterr().err
    assert f"file {seg.file}" in err and "CRC-32" in err

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, t in pico_state_dict(0, tiny=True).items():
                self.register_parameter(name.replace(".", "_"), torch.nn.Parameter(t.clone()))

        def named_parameters(self, *a, **k):
            return [(n.replace("_", ".", n.count("_")), p) for n, p in super().named_parameters()]

    with pytest.raises(PrefvecError, match="CRC-32"):
        apply_vectors(Tiny(), {vec: 0.5})
