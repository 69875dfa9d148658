"""The command that starts a stage's ranks (deepspeed launcher, torchrun or srun), built here
only, and the job contract (`RankJob`) every rank receives.

Used by `prefvec train` and by the pipeline's stage job (locally and inside sbatch).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from prefvec_ds import PrefvecError
from prefvec_ds.distributed.env import DEFAULT_TIMEOUT_MINUTES, free_port, timeout_env

DEFAULT_EXTENSIONS_DIR = Path.home() / ".cache" / "prefvec-ds" / "torch_extensions"


def inside_launch(env=None) -> bool:
    """True when this process is already one rank of a launched job."""
    env = os.environ if env is None else env
    return ("RANK" in env or "OMPI_COMM_WORLD_RANK" in env or "PMIX_RANK" in env
            or int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env)


def visible_gpu_ids(env=None) -> list[int] | None:
    """The physical GPU ids this process may use: CUDA_VISIBLE_DEVICES as integers, or None when
    it is unset (every GPU of the node). Slots and ranks count GPUs 0..n-1 among the visible
    ones; children that are given physical ids (`deepspeed --include`, which drops the
    inherited CUDA_VISIBLE_DEVICES, or a CUDA_VISIBLE_DEVICES of their own) need this map, or
    with CUDA_VISIBLE_DEVICES=4,5,6,7 (a shared node) the jobs run on GPUs 0-3."""
    env = os.environ if env is None else env
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    items = [x.strip() for x in raw.split(",") if x.strip()]
    if not all(x.isdigit() for x in items):
        raise PrefvecError(f"CUDA_VISIBLE_DEVICES={raw!r}: prefvec maps its GPU slots through "
                           "integer GPU ids; use indices (nvidia-smi -L), not UUIDs or MIG names")
    return [int(x) for x in items]


def physical_gpus(relative: list[int], env=None) -> list[int]:
    """Relative GPU ids (0..n-1 among the visible GPUs) -> physical ids, through a preset
    CUDA_VISIBLE_DEVICES (identity when it is unset)."""
    visible = visible_gpu_ids(env)
    if visible is None:
        return list(relative)
    if relative and max(relative) >= len(visible):
        raise PrefvecError(f"GPUs {relative} requested but CUDA_VISIBLE_DEVICES="
                           f"{','.join(map(str, visible))} shows only {len(visible)}")
    return [visible[i] for i in relative]


def stage_env(base=None, devices: list[int] | None = None,
              timeout_minutes: int = DEFAULT_TIMEOUT_MINUTES) -> dict[str, str]:
    """Environment for a stage: CPU accelerator when there is no GPU, a shared extension cache
    (DeepSpeed compiles its comm op once, ~60 s), the collective timeout (DEEPSPEED_TIMEOUT,
    kept when already set), expandable CUDA segments (ZeRO-3's varying gather sizes fragment
    the caching allocator), and the GPUs given to this job (physical ids)."""
    import torch  # noqa: PLC0415

    env = dict(os.environ if base is None else base)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(DEFAULT_EXTENSIONS_DIR))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    for key, value in timeout_env(timeout_minutes).items():
        env.setdefault(key, value)
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
    return env


@dataclass(frozen=True)
class RankJob:
    """What every rank of a training stage runs: the one contract between the side that starts
    ranks (`prefvec train`, the pipeline's stage job) and the rank process, passed as
    `python -m prefvec_ds.entry --job '<JSON of these fields>'`.

    Humans may keep writing `python -m prefvec_ds.entry dpo CONFIG --direction helpful+` (srun,
    mpirun); both forms parse into this."""

    stage: Literal["sft", "ref-logps", "dpo", "baseline"]
    """Which training stage the rank runs."""
    config: str
    """Run config YAML (the pipeline passes its resolved snapshot)."""
    overrides: tuple[str, ...] = ()
    """Dotted overrides on top of the file, e.g. `seed=43` for a diagnostic seed."""
    direction: str | None = None
    """dpo: the direction, e.g. `helpful+`."""
    preference: str | None = None
    """ref-logps: the preference, e.g. `helpful`."""
    baseline: str | None = None
    """baseline: which DPO-form baseline of pipeline.baselines, e.g. `dpo_safe_first`."""

    def __post_init__(self):
        if self.stage not in RANK_STAGES:
            raise PrefvecError(f"rank job: stage {self.stage!r}: expected one of "
                               f"{', '.join(RANK_STAGES)}")
        needs = {"dpo": ("direction", self.direction),
                 "ref-logps": ("preference", self.preference),
                 "baseline": ("baseline", self.baseline)}.get(self.stage)
        if needs and not needs[1]:
            raise PrefvecError(f"rank job: stage {self.stage} needs --{needs[0]}")
        object.__setattr__(self, "overrides", tuple(self.overrides))

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> RankJob:
        try:
            fields = json.loads(text)
            return cls(**fields)
        except (ValueError, TypeError) as err:
            raise PrefvecError(f"--job: expected the JSON of a RankJob ({err})") from None

    def argv(self) -> list[str]:
        """The rank's arguments after `-m prefvec_ds.entry`."""
        return ["--job", self.to_json()]


RANK_STAGES = ("sft", "ref-logps", "dpo", "baseline")
LAUNCHERS = ("deepspeed", "torchrun", "srun")


def launcher_command(launcher: str, nproc: int, job: RankJob, port: int | None = None,
                     devices: list[int] | None = None, srun_args=(), env=None) -> list[str]:
    """The command that starts `job` on every rank: deepspeed / torchrun (`nproc` ranks on this
    node, on the physical GPUs `devices` when given), or srun (the job's allocation: nodes x
    ntasks-per-node ranks; srun passes USR1/TERM on to every task).

    torchrun keeps CUDA_VISIBLE_DEVICES. The deepspeed launcher ignores it with --num_gpus
    (GPUs 0..n-1, whatever is set), so with CUDA_VISIBLE_DEVICES set, or `devices` given, the
    GPUs are named with --include instead.
    """
    entry = ["prefvec_ds.entry", *job.argv()]
    if launcher == "srun":
        return ["srun", "--kill-on-bad-exit=1", *srun_args, sys.executable, "-m", *entry]
    port = port or free_port()
    if launcher == "deepspeed":
        env = os.environ if env is None else env
        if devices is None:
            devices = None if env.get("DS_ACCELERATOR") == "cpu" else visible_gpu_ids(env)
            if devices and nproc > len(devices):
                raise PrefvecError(f"{nproc} ranks requested but CUDA_VISIBLE_DEVICES="
                                   f"{','.join(map(str, devices))} shows {len(devices)} GPU(s)")
            devices = devices[:nproc] if devices else None
        where = (["--include", "localhost:" + ",".join(map(str, devices))] if devices
                 else ["--num_gpus", str(nproc)])  # unset or empty (no GPU): CPU ranks
        return ["deepspeed", *where, "--master_port", str(port), "--module", *entry]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(port), "-m", *entry]
    raise ValueError(f"unknown launcher {launcher!r}: expected one of {', '.join(LAUNCHERS)}")
