"""Kill a DPO run mid-way (SIGKILL to the whole launcher process group) and resume it: the
final weights must equal those of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from prefvec_ds.distributed.checkpoints import COMPLETE_MARKER
from tests.conftest import REPO
from tests.distributed.conftest import metrics, prefvec, write_config

# Exact equality is expected: resume restores fp32 master weights, Adam moments, LR schedule,
# RNG and the (stateless) data order, and a 2-rank gloo sum is order-independent. The stated
# tolerance leaves room only for non-deterministic CPU kernels.
ATOL = 1e-6
STEPS = {"dpo": {"max_steps": 40, "save_every": 5, "log_every": 5}}


def fp32_weights(ckpt_dir):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = (ckpt_dir / "latest").read_text().strip()
    return tag, get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


@pytest.mark.parametrize("ds_config", ["zero3_cpu_fp32.json", "zero2_cpu_fp32.json"])
def test_killed_run_resumes_to_the_same_weights(sft_run, tmp_path, ds_config):
    _, run = sft_run
    base = {"model": {"base": str(run / "sft" / "model")}, **STEPS}
    straight = write_config(tmp_path / "a.yaml", tmp_path / "a", base, ds_config=ds_config)
    prefvec("train", "dpo", str(straight), "--direction", "helpful-")

    resumed = write_config(tmp_path / "b.yaml", tmp_path / "b", base, ds_config=ds_config)
    folder = tmp_path / "b" / "dpo" / "helpful-"
    proc = subprocess.Popen([sys.executable, "-m", "prefvec_ds.cli", "train", "dpo",
                             str(resumed), "--direction", "helpful-"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=dict(os.environ))
    marker = folder / "ckpt" / "global_step10" / COMPLETE_MARKER
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the run never reached its step-10 checkpoint"
    if (folder / "ckpt" / "global_step40" / COMPLETE_MARKER).exists():
        pytest.fail("the run finished before it could be killed; lengthen STEPS")
    assert not (folder / "done.json").exists()

    out = prefvec("train", "dpo", str(resumed), "--direction", "helpful-")
    assert "train step 5 " not in out.stdout  # it resumed; it did not start over
    tag_a, a = fp32_weights(tmp_path / "a" / "dpo" / "helpful-" / "ckpt")
    tag_b, b = fp32_weights(folder / "ckpt")
    assert tag_a == tag_b == "global_step40"
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= ATOL, f"max abs difference {worst}"
    assert any(not torch.equal(a[k], fp32_weights_base(run)[k]) for k in list(a)[:3])
    # the metrics log carries the whole history across the restart, one row per logged step
    steps = [r["step"] for r in metrics(folder) if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 40


def fp32_weights_base(run):
    from safetensors.torch import load_file

    return load_file(run / "sft" / "model" / "model.safetensors")
