"""Checkpoints of live engines: save with a completeness marker, pick the tag to resume from,
prune old tags, load, and export the model as a HF folder one gathered parameter at a time."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from prefvec_ds.distributed.collectives import from_rank0
from prefvec_ds.distributed.group import barrier, rank, world_size

COMPLETE_MARKER = "prefvec_complete.json"


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
