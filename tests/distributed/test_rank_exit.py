"""A rank's process ends without interpreter teardown once it ran a process group.

gloo's worker threads outlive destroy_process_group (DeepSpeed and ZeRO still hold the groups);
teardown destroying them under a live thread aborted a rank under mpirun after a clean result.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from prefvec_ds.distributed.env import free_port
from tests.conftest import REPO

SCRIPT = textwrap.dedent("""
    import atexit, sys
    from prefvec_ds.distributed import collectives, group
    atexit.register(lambda: print("teardown ran", flush=True))
    if sys.argv[1] == "group":
        group.init(seed=0)
        collectives.all_reduce_sum({"x": 1.0})
        group.shutdown()
    print("result line", end="")  # unflushed: exit_process must flush it
    group.exit_process(int(sys.argv[2]))
""")


def _run(tmp_path, mode: str, code: int) -> subprocess.CompletedProcess:
    script = tmp_path / "rank.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_PORT": str(free_port()),
           "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, str(script), mode, str(code)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=tmp_path)


def test_a_rank_that_ran_a_group_exits_with_its_code_and_no_teardown(tmp_path):
    for code in (0, 99):  # success, and the training loop's requeue code
        proc = _run(tmp_path, "group", code)
        assert proc.returncode == code, proc.stderr[-3000:]
        assert proc.stdout.endswith("result line")  # flushed, and no atexit teardown after it
        assert "teardown ran" not in proc.stdout


def test_a_process_without_a_group_exits_normally(tmp_path):
    proc = _run(tmp_path, "plain", 3)
    assert proc.returncode == 3
    assert "result line" in proc.stdout and "teardown ran" in proc.stdout
