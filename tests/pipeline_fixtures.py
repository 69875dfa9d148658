"""A shrunken quickstart pipeline, run once per session with `prefvec run` (fixture `local_run`).

tests/e2e checks the local executor on it; tests/slurm compares `prefvec submit`'s outputs with
it. Import the fixture into a test module (`from pipeline_fixtures import local_run`); the run
is memoised here, so importing it from two folders still runs the pipeline once.
PREFVEC_PIPELINE_TEST_RUN=<finished run folder> reuses that run instead (for debugging).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "quickstart.yaml"
# ~16 DPO steps, checkpoints every 4 (so a requeue has something to resume from), 16 eval
# prompts: every stage runs for real, the whole DAG in a few minutes on 2 shared cores.
# 150 SFT steps (6 epochs of 400 rows) give a base that refuses some harmful prompts, and
# dpo.lr 8e-5 over 16 steps moves about as far as the recipe's 1.5e-5 over 56: enough for the
# eta sweep to show the refusal trends (tests/e2e/test_eval_quickstart.py). The diagnostic seed
# is left out here (that test adds it to a copy of this run).
SMALL = ["data.embedded_size=400", "sft.epochs=6", "sft.log_every=5", "dpo.max_steps=16",
         "dpo.lr=8.0e-5", "dpo.save_every=4", "dpo.log_every=4", "pipeline.eval.prompts=16",
         "pipeline.eval.generation.num_samples=4", "pipeline.eval.diagnostic_seeds=[]",
         "pipeline.baselines=[]",  # tests/e2e/test_baselines.py adds them to a copy of this run
         "distributed.nproc_per_node=1",
         f"distributed.ds_config={REPO / 'ds_configs' / 'zero3_cpu_fp32.json'}"]
_RUNS: dict[str, Path] = {}


def prefvec(*args: str, timeout: int = 900, check: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess; on failure the assertion shows its output."""
    proc = subprocess.run([sys.executable, "-m", "prefvec_ds.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"prefvec {' '.join(args)} exited {proc.returncode}\n"
                             f"{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_args(run_dir: Path, *extra: str) -> list[str]:
    return [str(RECIPE), f"run_dir={run_dir}", *SMALL, *extra]


def read_manifests(run_dir: Path) -> dict[str, dict]:
    folder = run_dir / "pipeline" / "manifests"
    return {m["stage"]: m for m in (json.loads(p.read_text()) for p in folder.glob("*.json"))}


def final_eval(run_dir: Path, direction: str) -> dict:
    return json.loads((run_dir / "dpo" / direction / "eval.json").read_text())["eval_end"]


@pytest.fixture(scope="session")
def local_run(tmp_path_factory) -> Path:
    """A finished `prefvec run` of the shrunken quickstart (stdout kept in run_dir/run.out)."""
    reuse = os.environ.get("PREFVEC_PIPELINE_TEST_RUN")  # debugging: a finished run folder
    if reuse and (Path(reuse) / "eval" / "summary.json").is_file():
        return Path(reuse)
    if "run" not in _RUNS:
        run_dir = tmp_path_factory.mktemp("pipeline") / "local"
        proc = prefvec("run", *run_args(run_dir), timeout=1800)  # slow on a loaded machine
        (run_dir / "run.out").write_text(proc.stdout)
        _RUNS["run"] = run_dir
    return _RUNS["run"]
