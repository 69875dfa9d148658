"""Learning-rate schedules and the stateless data order that makes resume exact."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prefvec_ds import PrefvecError
from prefvec_ds.config.schema import OptimConfig


@dataclass(frozen=True)
class WarmupDecay:
    """lr multiplier at optimizer step s: linear warmup, then cosine / linear / constant.

    A picklable callable (not a lambda) so LambdaLR's state_dict keeps it with the checkpoint.
    """

    total_steps: int
    warmup_steps: int
    kind: str = "cosine"

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.kind == "linear":
            return 1.0 - progress
        return 1.0


def steps_per_epoch(n_examples: int, stage: OptimConfig, world: int, what: str) -> int:
    per_step = stage.micro_batch_size * stage.grad_accum * world
    if n_examples < per_step:
        raise PrefvecError(f"{what}: {n_examples} training examples, fewer than one global batch "
                           f"({stage.micro_batch_size} x {stage.grad_accum} x {world} ranks)")
    return n_examples // per_step


def total_steps(n_examples: int, stage: OptimConfig, world: int, what: str) -> int:
    if stage.max_steps:
        return stage.max_steps
    return max(1, math.ceil(stage.epochs * steps_per_epoch(n_examples, stage, world, what)))


def schedule_for(n_examples: int, stage: OptimConfig, world: int, what: str) -> WarmupDecay:
    total = total_steps(n_examples, stage, world, what)
    return WarmupDecay(total, int(stage.warmup_ratio * total), stage.scheduler)


def rank_micro_batches(step: int, n_examples: int, stage: OptimConfig, world: int, rank: int,
                       seed: int) -> list[list[int]]:
    """Example indices of this rank's micro-batches for optimizer step `step`.

    A pure function of (step, seed): each epoch is a seeded permutation, the global batch of a
    step is a contiguous block of it, ranks take strided slices. Resuming at step s therefore
    replays exactly the data an uninterrupted run would have seen; no sampler state to save.
    """
    per_step = stage.micro_batch_size * stage.grad_accum * world
    epoch, k = divmod(step, n_examples // per_step)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    block = torch.randperm(n_examples, generator=gen)[k * per_step:(k + 1) * per_step]
    mine = block[rank::world].tolist()
    mb = stage.micro_batch_size
    return [mine[i * mb:(i + 1) * mb] for i in range(stage.grad_accum)]


def shard_for_eval(n: int, world: int, rank: int, micro: int) -> list[tuple[list[int], bool]]:
    """(indices, keep) batches, the same count on every rank: ZeRO-3 forwards are collective,
    so a rank that ran out of examples runs a throw-away batch (keep=False) with the others."""
    mine = list(range(rank, n, world))
    n_batches = max(1, -(-(-(-n // world)) // micro))
    batches = [mine[i * micro:(i + 1) * micro] for i in range(n_batches)]
    return [(b, True) if b else ([0], False) for b in batches]
