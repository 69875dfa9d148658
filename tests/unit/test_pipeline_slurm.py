"""Rendering slurm/job.sbatch.tmpl and the checks of prefvec_ds.pipeline.slurm, no cluster needed
(the real-cluster tests are in tests/slurm)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from prefvec_ds.distributed.env import slurm_job_port
from prefvec_ds.pipeline import slurm


def spec(tmp_path: Path, **kw) -> slurm.SbatchSpec:
    kw.setdefault("command", ["python", "-m", "prefvec_ds.cli", "stage", "dpo"])
    return slurm.SbatchSpec(job_name=kw.pop("job_name", "dpo"), run_dir=tmp_path, **kw)


def directives(script: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_render_fills_every_placeholder_and_is_valid_bash(tmp_path):
    for launcher in ("direct", "srun"):
        script = slurm.render(spec(tmp_path, launcher=launcher))
        assert "{{" not in script and "}}" not in script
        subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_render_directives(tmp_path):
    s = spec(tmp_path, nodes=2, ntasks_per_node=4, cpus_per_task=6, gpus_per_task=1,
             time="1-00:00:00", signal_seconds=300, array="0-3", partition="gpu",
             extra_sbatch=("--qos=high",))
    d = directives(slurm.render(s))
    for expected in ("--job-name=dpo", "--nodes=2", "--ntasks-per-node=4", "--cpus-per-task=6",
                     "--gpus-per-task=1", "--time=1-00:00:00", "--requeue",
                     "--signal=B:USR1@300", "--array=0-3", "--partition=gpu", "--qos=high"):
        assert expected in d, (expected, d)
    assert f"--output={tmp_path.resolve()}/logs/dpo-%A_%a.out" in d
    assert not any(x.startswith("--account") for x in d)


def test_single_task_runs_command_directly_and_many_tasks_use_srun(tmp_path):
    one = slurm.render(spec(tmp_path))
    assert re.search(r"^python -m prefvec_ds.cli stage dpo &$", one, re.M)
    many = slurm.render(spec(tmp_path, ntasks_per_node=2, srun_args=("--mpi=pmix",)))
    assert re.search(r"^srun --kill-on-bad-exit=1 --mpi=pmix python -m prefvec_ds.cli stage dpo &$",
                     many, re.M)
    assert f"--output={tmp_path.resolve()}/logs/dpo-%j.out" in directives(one)


def test_env_exports_are_quoted(tmp_path):
    script = slurm.render(spec(tmp_path, env={"MSG": "a b'c"}, ds_accelerator="cpu",
                               torch_extensions_dir="/cache/ext"))
    assert "export DS_ACCELERATOR=cpu" in script
    assert "export TORCH_EXTENSIONS_DIR=/cache/ext" in script
    out = subprocess.run(["bash", "-c", "\n".join(
        line for line in script.splitlines() if line.startswith("export MSG=")) + '\necho "$MSG"'],
        capture_output=True, text=True, check=True).stdout
    assert out == "a b'c\n"
    with pytest.raises(ValueError, match="not a shell variable"):
        slurm.render(spec(tmp_path, env={"BAD-NAME": "1"}))


@pytest.mark.parametrize("job_id", ["1", "12345", "987654"])
def test_template_master_port_matches_dist_env(tmp_path, job_id):
    script = slurm.render(spec(tmp_path))
    line = next(l for l in script.splitlines() if l.startswith("export MASTER_PORT="))
    out = subprocess.run(["bash", "-c", f"{line}; echo $MASTER_PORT"], capture_output=True,
                         text=True, check=True, env={"SLURM_JOB_ID": job_id}).stdout
    assert int(out) == slurm_job_port(job_id)


@pytest.mark.parametrize("kw, match", [
    ({"job_name": "two words"}, "job_name"),
    ({"nodes": 0}, "nodes"),
    ({"time": "soon"}, "time"),
    ({"time": "2", "signal_seconds": 120}, "signal_seconds"),
    ({"array": "a-b"}, "array"),
    ({"launcher": "mpirun"}, "launcher"),
])
def test_spec_rejects_bad_values(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        spec(tmp_path, **kw)


@pytest.mark.parametrize("limit, seconds", [
    ("5", 300), ("5:30", 330), ("01:00:00", 3600), ("1-0", 86400), ("1-2:30", 95400),
    ("1-02:00:05", 93605), ("x", None), ("1:2:3:4", None),
])
def test_time_limit_seconds(limit, seconds):
    assert slurm._time_limit_seconds(limit) == seconds


def test_clear_errors_without_slurm(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "missing.conf"))
    with pytest.raises(slurm.SlurmError, match="missing.conf: no such file"):
        slurm.submit(spec(tmp_path))
    monkeypatch.delenv("SLURM_CONF")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch on it
    with pytest.raises(slurm.SlurmError, match="sbatch not found"):
        slurm.submit(spec(tmp_path))
    assert not (tmp_path / "slurm").exists()  # nothing written for a submission that cannot go
