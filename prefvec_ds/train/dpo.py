"""DPO on ZeRO-3 for one preference direction, with precomputed reference log-probs.

helpful+ and helpful- differ only by label switching (chosen <-> rejected); both read the same
reference table. One forward runs chosen and rejected together: by default one row per pair,
prompt + chosen + rejected with the rejected response masked from the chosen one, so the shared
prompt is computed once (`dpo.share_prompt`); only labelled positions reach the LM head
(prefvec_ds.train.logps.batch_logps). The loss is a pure function from prefvec_ds.train.losses.
"""

from __future__ import annotations

import torch

from prefvec_ds.config.loader import resolve_ds_config, save_resolved
from prefvec_ds.config.schema import RunConfig
from prefvec_ds.data.pairs import is_held_out
from prefvec_ds.data.tokenize import (TokenizedPair, direction_view, pair_tokens,
                                     require_safety_labels)
from prefvec_ds.distributed import collectives, group, model_build
from prefvec_ds.train.logps import batch_logps, pair_collate, split_pair_logps
from prefvec_ds.train.loop import LoopSpec, run_loop
from prefvec_ds.train.losses import LOSSES, SafetyLabels, preference_loss
from prefvec_ds.train.ref_logps import ref_table, tokenized_preference
from prefvec_ds.train.schedule import schedule_for, shard_for_eval
from prefvec_ds.train.stage import (base_model_dir, direction_dir, load_tokenizer, mark_done,
                                    write_json_atomic)


def oriented(pairs: list[TokenizedPair], table: dict, sign: int):
    """The direction's pairs and reference log-probs [N, 4] = (chosen, rejected, their token
    counts): the - view swaps the pairs and the table's columns alike."""
    ref = torch.tensor([table[p.key] for p in pairs], dtype=torch.float64).reshape(-1, 4)
    if sign == -1:
        ref = ref[:, [1, 0, 3, 2]]
    return direction_view(pairs, sign), ref


def pair_forward(engine, pairs, ref, idx, pad_id: int, cfg: RunConfig):
    """Loss, metrics and token count of the pairs `idx` in one forward (chosen and rejected
    together: one shared-prompt row per pair, or chosen rows then rejected rows)."""
    chunk = [pairs[i] for i in idx]
    batch = pair_collate(engine, cfg.dpo.share_prompt)(chunk, pad_id)
    logps, ntok = batch_logps(engine, batch)
    ref = ref[idx].to(logps.device)
    ref_c, ref_r = ref[:, 0], ref[:, 1]
    if LOSSES[cfg.dpo.loss_type].average_logps:
        logps = logps / ntok.clamp(min=1)
        ref_c, ref_r = ref_c / ref[:, 2].clamp(min=1), ref_r / ref[:, 3].clamp(min=1)
    pol_c, pol_r = split_pair_logps(logps.float())
    safety = None
    if LOSSES[cfg.dpo.loss_type].needs_safety:
        labels = torch.tensor([[p.chosen_safe, p.rejected_safe] for p in chunk],
                              dtype=torch.float32, device=pol_c.device)
        safety = SafetyLabels(labels[:, 0], labels[:, 1], cfg.dpo.bfpo_b1, cfg.dpo.bfpo_alpha)
    loss, metrics = preference_loss(pol_c, pol_r, ref_c.float(), ref_r.float(), cfg.dpo.beta,
                                    cfg.dpo.loss_type, cfg.dpo.label_smoothing, safety)
    return loss, metrics, sum(pair_tokens(p) for p in chunk)


def evaluate_pairs(engine, pairs, ref, pad_id: int, cfg: RunConfig) -> dict[str, float]:
    """Mean held-out metrics over all ranks (each rank a shard, equal forward counts)."""
    engine.eval()
    sums = {"loss": 0.0, "rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margins": 0.0,
            "rewards/accuracies": 0.0, "n": 0.0}
    with torch.no_grad():
        for idx, keep in shard_for_eval(len(pairs), group.world_size(), group.rank(),
                                        cfg.dpo.micro_batch_size * 2):
            loss, metrics, _ = pair_forward(engine, pairs, ref, idx, pad_id, cfg)
            if keep:
                sums["n"] += len(idx)
                sums["loss"] += loss.item() * len(idx)
                for k in ("rewards/chosen", "rewards/rejected", "rewards/margins",
                          "rewards/accuracies"):
                    sums[k] += metrics[k].item() * len(idx)
    totals = collectives.all_reduce_sum(sums)
    n = max(totals.pop("n"), 1.0)
    return {k: v / n for k, v in totals.items()}


def fit_pairs(cfg: RunConfig, folder, base, tokenizer, ds: dict, train, train_ref, held, held_ref,
              what: str):
    """DPO of theta_base on `train` (pairs as trained, reference rows aligned), evaluated on
    `held`; checkpoints and metrics go to `folder`. Returns (engine, history, schedule)."""
    world = group.world_size()
    schedule = schedule_for(len(train), cfg.dpo, world, what)
    if group.rank() == 0:
        save_resolved(cfg, folder, ds)
    engine = model_build.build_engine(base, ds, train=True, lr_lambda=schedule,
                                      gradient_checkpointing=cfg.model.gradient_checkpointing)
    pad = tokenizer.pad_token_id
    evaluate = (lambda step: evaluate_pairs(engine, held, held_ref, pad, cfg)) if held else None
    history = run_loop(engine, LoopSpec(
        cfg.dpo, len(train), schedule.total_steps, cfg.seed, folder,
        lambda idx: pair_forward(engine, train, train_ref, idx, pad, cfg), evaluate,
        cfg.dpo.eval_every))
    return engine, history, schedule


def fit_summary(history, schedule, train, held) -> dict:
    """The figures every DPO-form stage records in eval.json and done.json."""
    evals = [h for h in history if "eval/rewards/margins" in h]
    return {"train_pairs": len(train), "eval_pairs": len(held), "steps": schedule.total_steps,
            "eval_start": evals[0] if evals else None, "eval_end": evals[-1] if evals else None,
            "peak_rss_mb_per_rank": collectives.peak_rss_mb_per_rank(),
            "peak_gpu_mb_per_rank": collectives.peak_gpu_mb_per_rank()}


def train_dpo(cfg: RunConfig, direction: str) -> dict:
    """Train one direction; returns (on every rank) the final held-out metrics."""
    preference, sign = cfg.parse_direction(direction)
    folder = direction_dir(cfg, direction)
    base = base_model_dir(cfg)
    tokenizer = load_tokenizer(base)
    pairs = tokenized_preference(cfg, preference, tokenizer)
    if LOSSES[cfg.dpo.loss_type].needs_safety:
        require_safety_labels(pairs, f"data.preferences.{preference}",
                              f"dpo.loss_type {cfg.dpo.loss_type}")
    ds = resolve_ds_config(cfg, cfg.dpo, group.world_size())
    table = ref_table(cfg, preference, base, tokenizer, pairs, ds)
    frac = cfg.data.preferences[preference].eval_fraction
    train, train_ref = oriented([p for p in pairs if not is_held_out(p.key, frac)], table, sign)
    held, held_ref = oriented([p for p in pairs if is_held_out(p.key, frac)], table, sign)
    _engine, history, schedule = fit_pairs(cfg, folder, base, tokenizer, ds, train, train_ref,
                                           held, held_ref, f"dpo {direction}")
    result = {"direction": direction, "preference": preference, "sign": sign,
              **fit_summary(history, schedule, train, held)}
    if group.rank() == 0:
        write_json_atomic(folder / "eval.json", result)
        mark_done(folder, **result)
    return result
