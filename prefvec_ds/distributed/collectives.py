"""The few collectives the trainers need: sums of logged figures, objects to every rank or
from rank 0, and per-rank peak memory, on the device the backend serves."""

from __future__ import annotations

import torch


def served_device_types(backend_name: str) -> list[str]:
    """Device types a process group's backend string serves: "gloo" -> cpu and cuda, "nccl" ->
    cuda only, "cpu:gloo,cuda:nccl" -> both (torch's own capability table)."""
    import torch.distributed as dist  # noqa: PLC0415

    name = str(backend_name).lower()
    if ":" in name:
        return [part.split(":")[0] for part in name.split(",")]
    return list(dist.Backend.backend_capability.get(name, ["cpu"]))


def collective_device() -> torch.device:
    """Where collective buffers must live: the CPU when the default group serves it (gloo),
    else this rank's accelerator. NCCL serves only CUDA tensors: a CPU tensor on an NCCL group
    raises "No backend type associated with device type cpu" (the metric all-reduce at DPO's
    step-0 held-out eval and the per-step stop check died on it on the first GPU run)."""
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_initialized():
        return torch.device("cpu")
    served = served_device_types(dist.get_backend())
    if "cpu" in served:
        return torch.device("cpu")
    kind = served[0]
    return torch.device(kind, getattr(torch, kind).current_device())


def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Sum scalars over ranks in one collective (keys in sorted order on every rank), in a
    buffer on `collective_device()`."""
    import torch.distributed as dist  # noqa: PLC0415

    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_gather_objects(obj) -> list:
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_rank0(obj):
    """Rank 0's value of `obj` on every rank. For decisions read from a shared filesystem
    ("is this tag saved?", "which tag do we resume?"): with NFS attribute caching nodes can see
    different directory listings, and ranks that disagree enter different collectives (a hang)."""
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def peak_rss_mb_per_rank() -> list[float]:
    """Peak resident memory of every rank (MB), gathered to all ranks."""
    import resource  # noqa: PLC0415

    return all_gather_objects(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def peak_gpu_mb_per_rank() -> list[float] | None:
    """Peak allocated GPU memory of every rank (MB, torch's allocator), or None on CPU."""
    if not torch.cuda.is_available():
        return None
    return all_gather_objects(torch.cuda.max_memory_allocated() / 2**20)
