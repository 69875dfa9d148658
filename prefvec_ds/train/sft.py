"""Supervised fine-tuning on ZeRO-3: the start model -> theta_base (a HF folder)."""

from __future__ import annotations

import shutil

import torch

from prefvec_ds.ckpt.writer import DTYPES_BY_NAME, atomic_output_dir
from prefvec_ds.config.layout import RunLayout
from prefvec_ds.config.loader import resolve_ds_config, save_resolved
from prefvec_ds.config.schema import RunConfig
from prefvec_ds.data.sources import load_sft_examples
from prefvec_ds.data.tokenize import collate_sft, tokenize_sft
from prefvec_ds.distributed import checkpoints, collectives, group, model_build
from prefvec_ds.train.logps import sequence_logps
from prefvec_ds.train.loop import LoopSpec, run_loop
from prefvec_ds.train.schedule import schedule_for
from prefvec_ds.train.stage import init_model_dir, load_tokenizer, mark_done

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")


def train_sft(cfg: RunConfig) -> None:
    """Train, checkpoint (resumable), then export theta_base to <run_dir>/sft/model."""
    folder = RunLayout.of(cfg).sft
    if group.rank() == 0:
        init_model_dir(cfg)  # materialise the embedded model once
    group.barrier()
    start = init_model_dir(cfg, materialize=False)
    tokenizer = load_tokenizer(start)
    examples = tokenize_sft(load_sft_examples(cfg.data), tokenizer, cfg.data)
    world = group.world_size()
    ds = resolve_ds_config(cfg, cfg.sft, world)
    schedule = schedule_for(len(examples), cfg.sft, world, "sft")
    if group.rank() == 0:
        save_resolved(cfg, folder, ds)
    engine = model_build.build_engine(start, ds, train=True, lr_lambda=schedule,
                               gradient_checkpointing=cfg.model.gradient_checkpointing)

    def compute(idx: list[int]):
        batch = collate_sft([examples[i] for i in idx], tokenizer.pad_token_id)
        loss, _ = sft_loss(engine, batch)
        return loss, {}, int(batch["attention_mask"].sum())

    history = run_loop(engine, LoopSpec(cfg.sft, len(examples), schedule.total_steps, cfg.seed,
                                        folder, compute))
    export_model(engine, start, folder / "model", DTYPES_BY_NAME[cfg.model.dtype])
    rss = collectives.peak_rss_mb_per_rank()
    if group.rank() == 0:
        mark_done(folder, steps=schedule.total_steps, last=history[-1] if history else {},
                  peak_rss_mb_per_rank=rss)


def sft_loss(engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean label NLL, label count) of one collated SFT micro-batch.

    The batch is moved to the engine's device first: DeepSpeedEngine.forward does not move
    inputs, and a CPU batch on a CUDA engine fails in the embedding lookup ("Expected all
    tensors to be on the same device"), as DPO's batch_logps already knew.
    """
    dev = engine.device
    batch = {k: v.to(dev) for k, v in batch.items()}
    logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, ntok = sequence_logps(logits, batch["labels"])
    return -logps.sum() / ntok.sum().clamp(min=1), ntok.sum()


def export_model(engine, tokenizer_src, target, dtype: torch.dtype) -> None:
    """HF folder (weights, config, tokenizer), written to a temporary folder then renamed."""
    if group.rank() == 0:
        with atomic_output_dir(target, overwrite=True) as tmp:
            checkpoints.export_hf(engine, tmp, dtype)
            for name in TOKENIZER_FILES:
                if (tokenizer_src / name).is_file():
                    shutil.copy2(tokenizer_src / name, tmp / name)
    else:
        checkpoints.export_hf(engine, target, dtype)  # takes part in the gathers, writes nothing
    group.barrier()
