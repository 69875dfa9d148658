"""Checkpoint decisions on a shared filesystem are rank 0's (review finding R6).

Two real gloo ranks; each sees its own view of the checkpoint folder, as two nodes with stale
NFS attribute caches can: rank 1's view has one more complete tag. Every rank must resume from
rank 0's tag, or the ranks enter different load/save collectives and hang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from prefvec_ds.distributed.env import free_port
from tests.conftest import REPO

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch.distributed as tdist
    from prefvec_ds.distributed import checkpoints

    rank, root = int(sys.argv[1]), Path(sys.argv[2])
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    view = root / f"view{rank}"          # this rank's (stale or fresh) listing
    result = {"own": checkpoints.latest_complete_tag(view), "agreed": checkpoints.resume_tag(view)}
    (root / f"out{rank}.json").write_text(json.dumps(result))
    tdist.destroy_process_group()
""")


def test_every_rank_resumes_from_rank0s_tag(tmp_path):
    for rank, steps in ((0, (10, 20)), (1, (10, 20, 30))):
        for step in steps:
            tag = tmp_path / f"view{rank}" / f"global_step{step}"
            tag.mkdir(parents=True)
            (tag / "prefvec_complete.json").write_text("{}")
    script = tmp_path / "decide.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    got = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in (0, 1)]
    assert [g["own"] for g in got] == ["global_step20", "global_step30"]  # the views differ
    assert [g["agreed"] for g in got] == ["global_step20", "global_step20"]


CHECKS = ("versions", "collectives", "fused_adam", "sft", "ref_logps", "dpo", "extract", "merge",
          "memprobe", "sweep")


def test_device_check_dry_run_passes_on_cpu(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: every CPU-possible check of the device check runs for
    real (bf16 ZeRO-3 config, gradient checkpointing, 1 rank) and passes."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run",
                           "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=900, cwd=REPO, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("CHECK ")]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    states = {x.split()[1]: x.split()[2] for x in lines}
    assert list(states) == list(CHECKS), lines
    assert states["fused_adam"] == "SKIP" and all(
        s == "PASS" for n, s in states.items() if n != "fused_adam"), lines
    extract = next(x for x in lines if x.startswith("CHECK extract"))
    assert "max |ours - DeepSpeed gather|" in extract
