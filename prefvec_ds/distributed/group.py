"""The process group of this rank: start it (ranks discovered from any launcher, SLURM or
MPI), ask who we are, leave it, and end the process without waiting for its threads."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import torch

from prefvec_ds.distributed import env as dist_env

_STARTED = {"group": False}  # did this process start a process group (see exit_process)


def init(seed: int) -> dist_env.RankInfo:
    """Discover ranks (launcher, SLURM, MPI), start the process group, pin CPU threads."""
    import deepspeed  # noqa: PLC0415

    info = dist_env.discover()
    dist_env.export(info)
    if dist_env.accelerator_is_cpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # ranks on one node share its cores: 2 ranks on 2 cores -> 1 thread each, not 2 x 2.
        # (per node: two nodes with one rank each give each rank all of its node's cores)
        local_world = dist_env.local_world_size(info)
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(dist_env.cpu_threads_per_rank(os.cpu_count() or 1,
                                                                local_world))
    else:
        # local_rank % visible GPUs: a site that binds one GPU per task (--gpu-bind, per-task
        # --gpus) shows each rank one device, and set_device(LOCAL_RANK) would be invalid
        torch.cuda.set_device(dist_env.cuda_device_index(info.local_rank,
                                                         torch.cuda.device_count()))
    deepspeed.init_distributed(dist_backend=dist_env.backend(), auto_mpi_discovery=False)
    _STARTED["group"] = True
    if dist_env.accelerator_is_cpu():
        import torch.distributed as dist  # noqa: PLC0415

        dist.barrier()  # every rank has mapped every rank's allreduce segment
        Path(dist_env.cpu_shm_buffer()).unlink(missing_ok=True)
    torch.manual_seed(seed)
    return info


def shutdown() -> None:
    """barrier + destroy; a rank's process then ends with `exit_process`."""
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a rank's process with `code`, without interpreter teardown once it ran a group.

    Measured under mpirun (ref-logps, 2 ranks, gloo): after `destroy_process_group` every rank
    still runs 4 `pt_gloo_runloop` and 2 `gloo_tcp_loop` threads, and rank 0 TCPStore's
    `pt_tcpstore_uv`: DeepSpeed's globals (`deepspeed.utils.groups._WORLD_GROUP`, the
    `deepspeed.comm` backend) and the ZeRO parameters still hold the groups, and clearing those
    two globals did not stop the threads. Interpreter teardown then destroys these objects in
    arbitrary order while their threads run; a rank occasionally aborted after a clean result
    ("terminate called without an active exception", signal 6, mpirun exit 134). Past the final
    barrier nothing is left to do, so the process ends here, its output flushed, and no
    destructor races a live thread. A process that never started a group exits normally.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if _STARTED["group"]:
        os._exit(code)
    sys.exit(code)


def rank() -> int:
    import torch.distributed as dist  # noqa: PLC0415

    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist  # noqa: PLC0415

    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_initialized():
        dist.barrier()
