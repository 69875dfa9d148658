"""Build the command that starts a stage's ranks on this node (deepspeed launcher or torchrun).

Used by `prefvec train` and by the local executor; inside SLURM the sbatch script calls `srun`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

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


def launcher_command(launcher: str, nproc: int, entry_args: list[str],
                     port: int | None = None, env=None) -> list[str]:
    """deepspeed / torchrun command running `python -m prefvec_ds.entry ENTRY_ARGS` per rank.

    torchrun keeps CUDA_VISIBLE_DEVICES. The deepspeed launcher ignores it with --num_gpus
    (GPUs 0..n-1, whatever is set), so with CUDA_VISIBLE_DEVICES set the first nproc of its
    GPUs are named with --include instead.
    """
    port = port or free_port()
    if launcher == "deepspeed":
        env = os.environ if env is None else env
        visible = None if env.get("DS_ACCELERATOR") == "cpu" else visible_gpu_ids(env)
        if not visible:  # unset, or empty (no GPU: CPU ranks)
            where = ["--num_gpus", str(nproc)]
        else:
            if nproc > len(visible):
                raise PrefvecError(f"{nproc} ranks requested but CUDA_VISIBLE_DEVICES="
                                   f"{','.join(map(str, visible))} shows {len(visible)} GPU(s)")
            where = ["--include", "localhost:" + ",".join(map(str, visible[:nproc]))]
        return ["deepspeed", *where, "--master_port", str(port),
                "--module", "prefvec_ds.entry", *entry_args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(port), "-m", "prefvec_ds.entry", *entry_args]
    raise ValueError(f"unknown launcher {launcher!r}: expected deepspeed or torchrun")
