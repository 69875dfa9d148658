"""Rank discovery for every way a job can be started, and a free port per job.

Order of precedence (first match wins):
1. torchrun / deepspeed launcher: RANK, WORLD_SIZE, LOCAL_RANK are already set.
2. MPI (mpirun): OMPI_COMM_WORLD_* or PMIX_RANK / PMI_RANK. Checked before SLURM because
   under `mpirun` inside an sbatch job every rank sees SLURM_PROCID=0. Exception: a task that
   srun started itself (SLURM_STEP_ID set, no OMPI_* variables, PMI/PMIx ranks equal to
   SLURM's) goes to 3: clusters with `MpiDefault=pmix|pmi2` set PMIX_RANK/PMI_RANK in every srun
   task, and the MPI path would need mpi4py (an optional extra) on every rank for nothing.
3. SLURM srun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR is the first host of
   SLURM_JOB_NODELIST (via `scontrol show hostnames`), MASTER_PORT derived from the job id.
   Across nodes the first host's name must resolve, on every node, to an address the others
   reach: gloo also binds each rank to the address of its own hostname (a hostname that
   resolves to 127.0.0.1 needs GLOO_SOCKET_IFNAME, see docs/slurm.md).
4. A single process.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "mpi" | "slurm" | "single"


def free_port(host: str = "127.0.0.1") -> int:
    """An unused TCP port (bound and released), so concurrent jobs never share a store."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 12768


def slurm_job_port(job_id: str) -> int:
    """A port every rank of one SLURM job agrees on without talking: 20000 + job id mod 12768.

    Array tasks have distinct SLURM_JOB_IDs, so the four DPO directions on one node differ. The
    ports stay below 32768, where Linux's ephemeral range starts (32768-60999 by default): with
    the old span of 20000 (ports up to 39999) any outgoing connection on the first node could
    hold the job's port, and rank 0's store failed with EADDRINUSE.
    """
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN


def first_host_of(nodelist: str) -> str:
    """The first host of a SLURM node list without asking scontrol: `node[3-4,7],gpu1` ->
    `node3`, `a01,a02` -> `a01`, `cn[007-008]` -> `cn007` (zero padding kept). The old fallback
    cut at `[` and gave `node`, a host that does not exist: every rank off the first node then
    failed to resolve the rendezvous address."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist.strip())
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    return prefix + re.split(r"[-,]", ranges)[0]


def _first_slurm_host(nodelist: str, env) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # 127.0.0.1 only for a one-node job: on a second node it is that node, not the rendezvous.
    if nodelist and first_host_of(nodelist):
        return first_host_of(nodelist)
    return "127.0.0.1" if int(env.get("SLURM_NNODES", 1)) <= 1 else env.get("SLURMD_NODENAME", "")


def local_world_size(info: RankInfo, env=None) -> int:
    """Ranks on this node, which share its cores. A launcher's own count (LOCAL_WORLD_SIZE from
    torchrun, LOCAL_SIZE from the deepspeed launcher, Open MPI's local size); for ranks srun
    started, this node's entry of SLURM_STEP_TASKS_PER_NODE (`2(x3),1`: 2 on each of the first
    three nodes, 1 on the fourth) at SLURM_NODEID. Else every rank is local (one node). Two nodes
    with one rank each are 1 per node, not the world size 2.
    """
    env = os.environ if env is None else env
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        if env.get(key, "").isdigit():
            return int(env[key])
    # only srun's ranks: in a batch shell that ran a launcher, SLURM's counts are the shell's
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if info.source == "slurm" and spec and env.get("SLURM_NODEID", "").isdigit():
        per_node = []
        for item in spec.split(","):
            count, _, repeat = item.partition("(x")
            per_node += [int(count)] * int(repeat.rstrip(")") or 1)
        node = int(env["SLURM_NODEID"])
        if node < len(per_node):
            return per_node[node]
    return info.world_size


def srun_task(env) -> bool:
    """True for a process that srun started as one task of a step (not an MPI launcher's rank):
    SLURM's ids are then the ranks, whatever PMI/PMIx variables the site's MpiDefault adds."""
    if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        return False
    if any(key.startswith("OMPI_COMM_WORLD_") for key in env):
        return False  # OpenMPI's mpirun (its daemons may run in an srun step)
    # MPICH/Hydra's mpirun starts one proxy per node with srun: its ranks' PMI_RANK differ
    # from the proxy's SLURM_PROCID, and PMI_SIZE from SLURM_NTASKS (the node count)
    same = [env[key] == env["SLURM_PROCID"] for key in ("PMIX_RANK", "PMI_RANK") if key in env]
    if "PMI_SIZE" in env:
        same.append(env["PMI_SIZE"] == env.get("SLURM_NTASKS", "1"))
    return all(same)


def _mpi_rank_vars(env) -> tuple[int, int, int] | None:
    if srun_task(env):
        return None
    if "OMPI_COMM_WORLD_RANK" in env:
        return (int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)))
    if "PMIX_RANK" in env or "PMI_RANK" in env:
        # PMIx gives no size in the environment: ask MPI itself (mpi4py, imported lazily).
        from mpi4py import MPI  # noqa: PLC0415

        comm = MPI.COMM_WORLD
        local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        return comm.Get_rank(), comm.Get_size(), local
    return None


def discover(env=None) -> RankInfo:
    """Rank, world size and rendezvous address of this process (see module docstring)."""
    env = os.environ if env is None else env
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    if "RANK" in env and "WORLD_SIZE" in env:
        return RankInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                        addr, int(env.get("MASTER_PORT", 29500)), "torchrun")
    mpi = _mpi_rank_vars(env)
    if mpi is not None:
        port = int(env.get("MASTER_PORT") or (slurm_job_port(env["SLURM_JOB_ID"])
                                               if "SLURM_JOB_ID" in env else 29500))
        return RankInfo(*mpi, addr, port, "mpi")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        host = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", ""), env)
        port = int(env.get("MASTER_PORT") or slurm_job_port(env["SLURM_JOB_ID"]))
        return RankInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                        int(env.get("SLURM_LOCALID", 0)), host, port, "slurm")
    return RankInfo(0, 1, 0, addr, int(env.get("MASTER_PORT") or free_port()), "single")


def export(info: RankInfo, env=None) -> None:
    """Write the torchrun variables, which deepspeed.init_distributed and torch read."""
    env = os.environ if env is None else env
    env.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size),
               LOCAL_RANK=str(info.local_rank), MASTER_ADDR=info.master_addr,
               MASTER_PORT=str(info.master_port))


def accelerator_is_cpu(env=None) -> bool:
    """CPU when DS_ACCELERATOR=cpu or no CUDA device is visible."""
    env = os.environ if env is None else env
    if env.get("DS_ACCELERATOR") == "cpu":
        return True
    import torch  # noqa: PLC0415

    return not torch.cuda.is_available()


def cpu_threads_per_rank(cores: int, ranks: int) -> int:
    """Threads of each of `ranks` CPU processes that share `cores`: the cores shared out, at
    least one. The ranks of one node share them (2 ranks on 2 cores: 1 thread each, not 2 x 2);
    so do the stages `prefvec run` starts at once (four 1-rank DPO directions on 2 cores: one
    each; left to take every core, their 8 spinning OpenMP threads made a DPO step of
    SmolLM2-135M several times slower)."""
    return max(1, cores // max(1, ranks))


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """The GPU of this rank among the visible ones: local_rank when every GPU of the node is
    visible, local_rank % count when the site binds GPUs per task (`--gpu-bind`, per-task
    `--gpus`: one visible GPU, and set_device(LOCAL_RANK) is an "invalid device ordinal")."""
    if device_count < 1:
        raise RuntimeError("no CUDA device is visible to this rank")
    return local_rank % device_count


DEFAULT_TIMEOUT_MINUTES = 60


def timeout_env(minutes: int = DEFAULT_TIMEOUT_MINUTES) -> dict[str, str]:
    """Variables that set the collective timeout of the ranks a launcher starts: DeepSpeed
    reads DEEPSPEED_TIMEOUT (minutes) when deepspeed is imported, and passes it to
    init_process_group. Its default of 10 min is shorter than an 8B ZeRO-3 save (~96 GB through
    a shared filesystem before the save's barrier: 10 min is ~160 MB/s in aggregate)."""
    return {"DEEPSPEED_TIMEOUT": str(int(minutes))}


def backend(env=None) -> str:
    """gloo on CPU, nccl on GPU."""
    return "gloo" if accelerator_is_cpu(env) else "nccl"


def cpu_shm_buffer(env=None) -> str:
    """This rank's shared-memory segment of DeepSpeed's CPU allreduce (shm.cpp names it
    deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>).

    DeepSpeed never unlinks it: every CPU launch left ~100 MB per rank in /dev/shm (RAM), 9 GB
    after a day of test runs here. Once every rank has mapped every segment (a barrier after
    init), unlinking the name frees it at process exit and keeps the mapping valid until then.
    """
    env = os.environ if env is None else env
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
            f"{env.get('MASTER_PORT', '')}_{env.get('RANK', '0')}")
