"""Fixtures for the multi-process tier: real `prefvec train` runs under the deepspeed launcher
(2 ranks, ZeRO-3, CPU/gloo) on a shrunken quickstart, shared across the tier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

SMALL = {
    "data": {"embedded_size": 800},
    "sft": {"epochs": 4, "log_every": 5},
    # the tier tests training mechanics in few steps, so it uses a larger lr than the recipe
    # micro-batch pinned: the margin/accuracy thresholds of test_train were set at 8 per rank
    "dpo": {"max_steps": 25, "lr": 5.0e-4, "micro_batch_size": 8, "log_every": 5,
            "save_every": 0},
}


def write_config(path: Path, run_dir: Path, extra: dict | None = None,
                 ds_config: str = "zero3_cpu_fp32.json") -> Path:
    """The quickstart recipe with SMALL (and `extra`) merged in, pointed at run_dir, training
    with ds_configs/<ds_config>."""
    cfg = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    for patch in (SMALL, extra or {}):
        for section, values in patch.items():
            if isinstance(values, dict):
                cfg.setdefault(section, {}).update(values)
            else:
                cfg[section] = values
    cfg["run_dir"] = str(run_dir)
    cfg["distributed"]["ds_config"] = str(REPO / "ds_configs" / ds_config)
    path.write_text(yaml.safe_dump(cfg))
    return path


def prefvec(*args: str, timeout: int = 600, check: bool = True, **popen) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess; on failure show its output."""
    proc = subprocess.run([sys.executable, "-m", "prefvec_ds.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env=dict(os.environ), **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"prefvec {' '.join(args)} exited {proc.returncode}\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory):
    """One SFT run shared by the tier: (config path, run dir)."""
    root = tmp_path_factory.mktemp("sft")
    config = write_config(root / "config.yaml", root / "run")
    prefvec("train", "sft", str(config))
    return config, root / "run"
