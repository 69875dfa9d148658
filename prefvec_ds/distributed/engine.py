"""DeepSpeed engines for the stages: init, ZeRO-3 model loading, checkpoints, collectives.

Models are built inside `deepspeed.zero.Init` (each rank allocates only its partition) and filled
one tensor at a time from the HF folder's safetensors: rank 0 reads a tensor (mmap) and
`GatheredParameters(modifier_rank=0)` scatters it, so no rank ever holds a full state dict.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch

from prefvec_ds.distributed import env as dist_env

COMPLETE_MARKER = "prefvec_complete.json"
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
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
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


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights  # noqa: PLC0415 - v5
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # noqa: PLC0415 - v4
    return no_init_weights()


def import_model_class(config) -> None:
    """Import the causal-LM class of `config` now, before any `deepspeed.zero.Init`.

    zero.Init wraps the `__init__` of every nn.Module subclass, including classes first defined
    inside it (`__init_subclass__`), and on exit restores the `__init__` it saw at class
    creation. transformers imports model modules lazily, and hub-kernel decorators
    (`kernels.use_kernelized_func`, on LlamaAttention since transformers 5.x) replace `__init__`
    *after* class creation: if the module is first imported inside zero.Init, the restore drops
    the decorator's `__init__` but keeps its `forward`, and every later instance fails with
    "'LlamaAttention' object has no attribute '_kernel_funcs'" (a second engine in one process:
    DPO building its reference table, a resumed run, a sweep after training). Importing the
    class first makes zero.Init see the finished class, so it restores the decorated `__init__`.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING  # noqa: PLC0415

    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:  # remote code is imported by from_config
        MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # the lazy mapping imports the module


def _build_partitioned(model_dir: Path, ds_config: dict, gradient_checkpointing: bool):
    import deepspeed  # noqa: PLC0415
    import torch._dynamo  # noqa: F401, PLC0415 - must precede zero.Init (dynamo signature bug)
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

    config = AutoConfig.from_pretrained(model_dir)
    import_model_class(config)
    # no dtype= here: DeepSpeed 0.19 drops it on the CPU accelerator; the config decides.
    # no weight init: every parameter is overwritten from the folder, and HF's init indexes
    # rows (padding_idx) of partitions that are empty on this rank.
    with deepspeed.zero.Init(config_dict_or_path=ds_config), _no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def _fill_from_safetensors(model, model_dir: Path) -> None:
    """Copy every parameter from the folder's safetensors into its ZeRO-3 partitions."""
    import deepspeed  # noqa: PLC0415
    from safetensors import safe_open  # noqa: PLC0415

    from prefvec_ds.models.hf import safetensors_index  # noqa: PLC0415

    index = safetensors_index(model_dir)
    tied = getattr(model.config, "tie_word_embeddings", False)
    is_src = rank() == 0
    for name, param in model.named_parameters():
        key = name if name in index else ("model.embed_tokens.weight"
                                          if tied and name == "lm_head.weight" else None)
        if key not in index:
            raise FileNotFoundError(f"{model_dir}: parameter {name} not found in safetensors")
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if is_src:
                with safe_open(model_dir / index[key], framework="pt") as fh:
                    param.data.copy_(fh.get_tensor(key))


# ZeRO-3 sizes that ds_configs/ may leave as "auto", from the hidden size h: the HF DeepSpeed
# integration's rules (a reduce bucket of one h x h matrix, prefetch of 0.9 of one, parameters
# under 10 h elements - norms, biases - kept whole on every rank instead of gathered layer by
# layer: tiny collectives cost latency, not bandwidth), with the buckets floored at the fixed
# sizes used before (5e7 / 2e7 elements). Without the floor a small model's buckets are tiny
# (65,536 elements at h = 256): its gradient reduction became ~70 reduce-scatters per step
# instead of one, and a 2-rank CPU step of a 28M Llama took 1.8x as long (torch.profiler).
BUCKET_FLOOR = {"reduce_bucket_size": 50_000_000, "stage3_prefetch_bucket_size": 20_000_000}
ZERO_AUTO = {"reduce_bucket_size": lambda h: max(h * h, BUCKET_FLOOR["reduce_bucket_size"]),
             "stage3_prefetch_bucket_size":
                 lambda h: max(int(0.9 * h * h), BUCKET_FLOOR["stage3_prefetch_bucket_size"]),
             "stage3_param_persistence_threshold": lambda h: 10 * h}


def resolve_zero_auto(ds_config: dict, hidden_size: int | None) -> dict:
    """ds_config with its "auto" ZeRO sizes replaced by ZERO_AUTO of the model's hidden size."""
    zero = dict(ds_config.get("zero_optimization", {}))
    for key, rule in ZERO_AUTO.items():
        if zero.get(key) == "auto" and hidden_size:
            zero[key] = rule(hidden_size)
    left = sorted(k for k, v in zero.items() if v == "auto")
    if left:
        raise ValueError(f"ds_config zero_optimization: cannot resolve 'auto' for "
                         f"{', '.join(left)} (resolved: {', '.join(ZERO_AUTO)}, from the "
                         f"model's hidden_size={hidden_size})")
    return {**ds_config, "zero_optimization": zero}


def build_engine(model_dir: Path, ds_config: dict, train: bool, lr_lambda=None,
                 gradient_checkpointing: bool = False):
    """A ZeRO-3 engine over the HF model in model_dir (optimizer + LambdaLR when train)."""
    import deepspeed  # noqa: PLC0415

    model_cfg = json.loads((Path(model_dir) / "config.json").read_text())
    hidden = model_cfg.get("hidden_size") or model_cfg.get("text_config", {}).get("hidden_size")
    cfg = resolve_zero_auto(ds_config, hidden)
    if not train:
        cfg.pop("optimizer", None)
    model = _build_partitioned(model_dir, cfg, gradient_checkpointing and train)
    _fill_from_safetensors(model, model_dir)
    kwargs = {}
    if train:
        # the engine builds the optimizer from the config; our schedule is a plain LambdaLR.
        kwargs["lr_scheduler"] = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
        kwargs["model_parameters"] = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, config=cfg, **kwargs)
    if not train:
        engine.eval()
    return engine


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict) -> Path:
    """A native ZeRO-3 checkpoint `global_step{N}`; COMPLETE_MARKER is written after all ranks
    finished (DeepSpeed writes `latest` from rank 0 before the others may be done)."""
    tag = f"global_step{step}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    barrier()
    if rank() == 0:
        files = sorted(p.name for p in (Path(ckpt_dir) / tag).iterdir())
        (Path(ckpt_dir) / tag / COMPLETE_MARKER).write_text(
            json.dumps({"step": step, "world_size": world_size(), "files": files}))
    barrier()
    return Path(ckpt_dir) / tag


def latest_complete_tag(ckpt_dir: Path) -> str | None:
    """The newest tag with a completion marker (a crash mid-save never counts as finished)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    tags = [p for p in ckpt_dir.glob("global_step*") if (p / COMPLETE_MARKER).is_file()]
    if not tags:
        return None
    return max(tags, key=lambda p: int(p.name.removeprefix("global_step"))).name


def resume_tag(ckpt_dir: Path) -> str | None:
    """The newest complete tag as rank 0 sees it, on every rank (see from_rank0)."""
    return from_rank0(latest_complete_tag(ckpt_dir) if rank() == 0 else None)


def tags_to_prune(ckpt_dir: Path, keep: int, protect: set[str] = frozenset()) -> list[Path]:
    """Complete tags beyond the newest `keep` (oldest first), never one in `protect` nor the one
    DeepSpeed's `latest` file names (the extractor reads that one). keep=0 keeps everything.
    Incomplete tags are left alone: they are either being written or a crashed save to inspect."""
    ckpt_dir = Path(ckpt_dir)
    if keep <= 0 or not ckpt_dir.is_dir():
        return []
    complete = sorted((p for p in ckpt_dir.glob("global_step*")
                       if (p / COMPLETE_MARKER).is_file()
                       and p.name.removeprefix("global_step").isdigit()),
                      key=lambda p: int(p.name.removeprefix("global_step")))
    latest = ckpt_dir / "latest"
    named = {latest.read_text().strip()} if latest.is_file() else set()
    return [p for p in complete[:-keep] if p.name not in set(protect) | named]


def prune_checkpoints(ckpt_dir: Path, keep: int, protect: set[str] = frozenset()) -> list[str]:
    """Delete tags_to_prune on rank 0 (call after save_checkpoint's barriers); the names."""
    import shutil  # noqa: PLC0415

    if rank() != 0:
        return []
    gone = []
    for path in tags_to_prune(ckpt_dir, keep, protect):
        # the marker goes first: a crash mid-delete leaves an incomplete tag, never a "complete"
        # one with missing shards
        (path / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
        gone.append(path.name)
    return gone


def load_checkpoint(engine, ckpt_dir: Path) -> dict | None:
    """Resume the engine (weights, optimizer, LR schedule) from the newest complete tag (rank 0
    decides which; every rank loads that one)."""
    tag = resume_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"{ckpt_dir}/{tag}: DeepSpeed could not load the checkpoint")
    return client_state


def export_hf(engine, out_dir: Path, dtype: torch.dtype, max_shard_bytes: int = 2 * 10**9):
    """Write the engine's model as HF safetensors, gathering one parameter at a time.

    All ranks take part in each gather; rank 0 streams the tensor straight into its shard.
    """
    import deepspeed  # noqa: PLC0415

    from prefvec_ds.ckpt.writer import ShardedSafetensorsWriter, TensorSpec  # noqa: PLC0415

    module = engine.module
    params = list(module.named_parameters())
    specs = [TensorSpec(n, tuple(p.ds_shape if hasattr(p, "ds_shape") else p.shape), dtype)
             for n, p in params]
    is_dst = rank() == 0
    writer = (ShardedSafetensorsWriter(out_dir, specs, max_shard_bytes) if is_dst
              else contextlib.nullcontext())
    with writer:
        for name, param in params:
            with deepspeed.zero.GatheredParameters([param]):
                if is_dst:
                    writer.write(name, param.data.detach().to(dtype))
    if is_dst:
        module.config.save_pretrained(out_dir)
        if getattr(module, "generation_config", None) is not None:
            module.generation_config.save_pretrained(out_dir)
    barrier()
