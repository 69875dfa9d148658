"""Stress tests of files that concurrent stages create together (issue: random CI failures).

Each test starts many processes at one barrier and has them all create the same thing; every
process must succeed, the result must be right, and no temporary may be left behind.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest

from prefvec_ds.atomic import link_atomic, write_text_atomic

ctx = mp.get_context("fork")


def _race(n: int, fn, *args) -> list[int]:
    """Run fn(*args) in n processes released together; their exit codes."""
    barrier = ctx.Barrier(n)

    def body():
        barrier.wait()
        try:
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 - the test reports it through the exit code
            print(f"{os.getpid()}: {type(exc).__name__}: {exc}", flush=True)
            os._exit(1)
        os._exit(0)

    procs = [ctx.Process(target=body) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    return [p.exitcode for p in procs]


def _left_temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("state", ["missing", "dangling", "stale"])
def test_shared_link_created_by_many_processes_at_once(tmp_path, state):
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "helpful.pt").write_text("table")
    seed = tmp_path / "seeds" / "43" / "ref_logps"
    seed.mkdir(parents=True)
    link = seed / "helpful.pt"
    target = Path("..", "..", "..", "tables", "helpful.pt")
    if state == "dangling":
        link.symlink_to(Path("..", "missing.pt"))
    elif state == "stale":
        link.symlink_to(Path("..", "..", "..", "tables", "old.pt"))
    for _ in range(10):
        assert _race(16, link_atomic, link, target) == [0] * 16
        assert os.readlink(link) == str(target) and link.read_text() == "table"
    assert _left_temporaries(seed) == []


def test_a_table_computed_in_place_is_kept(tmp_path):
    table = tmp_path / "helpful.pt"
    table.write_text("own table")
    link_atomic(table, Path("elsewhere.pt"))
    assert not table.is_symlink() and table.read_text() == "own table"


def test_same_file_written_by_many_processes_at_once(tmp_path):
    path = tmp_path / "shards" / "fingerprint.json"
    for _ in range(10):
        assert _race(16, write_text_atomic, path, '{"same": true}\n' * 1000) == [0] * 16
        assert path.read_text() == '{"same": true}\n' * 1000
    assert _left_temporaries(path.parent) == []


def test_embedded_model_materialised_by_concurrent_stages(tmp_path):
    from prefvec_ds.models.embedded import materialize_embedded_model

    folder = tmp_path / "init_model"
    assert _race(4, materialize_embedded_model, "tiny-llama", folder, 7) == [0] * 4
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert _left_temporaries(tmp_path) == []
