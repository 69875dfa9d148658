"""Build the command that starts a stage's ranks on this node (deepspeed launcher or torchrun).

Used by `prefvec train` and by the local executor; inside SLURM the sbatch script calls `srun`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from prefvec_ds.dist.env import free_port

DEFAULT_EXTENSIONS_DIR = Path.home() / ".cache" / "prefvec-ds" / "torch_extensions"


def inside_launch(env=None) -> bool:
    """True when this process is already one rank of a launched job."""
    env = os.environ if env is None else env
    return ("RANK" in env or "OMPI_COMM_WORLD_RANK" in env or "PMIX_RANK" in env
            or int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env)


def stage_env(base=None, devices: list[int] | None = None) -> dict[str, str]:
    """Environment for a stage: CPU accelerator when there is no GPU, a shared extension cache
    (DeepSpeed compiles its comm op once, ~60 s), and the GPUs given to this job."""
    import torch  # noqa: PLC0415

    env = dict(os.environ if base is None else base)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(DEFAULT_EXTENSIONS_DIR))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
    return env


def launcher_command(launcher: str, nproc: int, entry_args: list[str],
                     port: int | None = None) -> list[str]:
    """deepspeed / torchrun command running `python -m prefvec_ds.entry ENTRY_ARGS` per rank."""
    port = port or free_port()
    if launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(port),
                "--module", "prefvec_ds.entry", *entry_args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(port), "-m", "prefvec_ds.entry", *entry_args]
    raise ValueError(f"unknown launcher {launcher!r}: expected deepspeed or torchrun")
