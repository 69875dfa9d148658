"""Reference log-probs of every pair under theta_base, computed once per preference data set.

Stored in the + orientation with the pairs' order-free keys; the - direction reads the same
table with the columns swapped. DPO then needs no resident reference model: it saves the
reference's memory and its forward pass, about a quarter of a step's compute.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from prefvec_ds import PrefvecError
from prefvec_ds.atomic import temporary_beside
from prefvec_ds.config.loader import resolve_ds_config
from prefvec_ds.config.layout import RunLayout
from prefvec_ds.config.schema import RunConfig
from prefvec_ds.data.sources import load_preference
from prefvec_ds.data.tokenize import TokenizedPair, fingerprint_pairs, pair_tokens, tokenize_pairs
from prefvec_ds.distributed import collectives, group, model_build
from prefvec_ds.models.hf import model_fingerprint
from prefvec_ds.train.logps import batch_logps, pair_collate, split_pair_logps
from prefvec_ds.train.schedule import shard_for_eval
from prefvec_ds.train.stage import base_model_dir, load_tokenizer


def ref_table_path(cfg: RunConfig, preference: str) -> Path:
    return RunLayout.of(cfg).ref_logps(preference)


def tokenized_preference(cfg: RunConfig, preference: str, tokenizer) -> list[TokenizedPair]:
    pairs = load_preference(preference, cfg.data.preferences[preference], cfg.data)
    tokenized, stats = tokenize_pairs(pairs, tokenizer, cfg.data)
    if group.rank() == 0:
        print(f"preference {preference}: {stats}", flush=True)
    return tokenized


def ref_fingerprint(base: Path, pairs: list[TokenizedPair], ds_config: dict) -> str:
    """Model + data + tokenization + precision: any change invalidates the table."""
    precision = "bf16" if ds_config.get("bf16", {}).get("enabled") else (
        "fp16" if ds_config.get("fp16", {}).get("enabled") else "fp32")
    text = f"{model_fingerprint(base)}|{fingerprint_pairs(pairs)}|{precision}"
    return hashlib.sha256(text.encode()).hexdigest()


def load_ref_table(path: Path, fingerprint: str) -> dict[str, tuple[float, float, int, int]] | None:
    """key -> (logp chosen+, logp rejected+, tokens chosen+, tokens rejected+), or None if
    the table is absent or was computed for other inputs."""
    if not path.is_file():
        return None
    table = torch.load(path, weights_only=True)
    if table["fingerprint"] != fingerprint:
        return None
    return {k: (c, r, int(nc), int(nr)) for k, (c, r), (nc, nr) in
            zip(table["keys"], table["logps"].tolist(), table["tokens"].tolist())}


def build_ref_logps(cfg: RunConfig, preference: str) -> Path:
    """Compute (or reuse) the table of `preference`; every rank must call it."""
    if preference not in cfg.data.preferences:
        raise PrefvecError(f"unknown preference {preference!r}: expected one of "
                           f"{', '.join(cfg.data.preferences)}")
    base = base_model_dir(cfg)
    tokenizer = load_tokenizer(base)
    pairs = tokenized_preference(cfg, preference, tokenizer)
    ds = resolve_ds_config(cfg, cfg.dpo, group.world_size())
    ref_table(cfg, preference, base, tokenizer, pairs, ds)
    return ref_table_path(cfg, preference)


def ref_table(cfg: RunConfig, preference: str, base: Path, tokenizer,
              pairs: list[TokenizedPair], ds: dict) -> dict[str, tuple[float, float, int, int]]:
    """The table of already tokenized `pairs` (+ orientation): read when up to date, else
    computed under ZeRO-3 with theta_base and saved. Every rank must call it."""
    fingerprint = ref_fingerprint(base, pairs, ds)
    out = ref_table_path(cfg, preference)
    table = load_ref_table(out, fingerprint)
    if table is not None:
        return table
    engine = model_build.build_engine(base, ds, train=False)
    collate = pair_collate(engine, cfg.dpo.share_prompt)
    # pairs of similar length share a micro-batch: little padding (the order is irrelevant here)
    by_length = sorted(range(len(pairs)), key=lambda i: pair_tokens(pairs[i]))
    mine: list[tuple[int, float, float, int, int]] = []
    start = time.perf_counter()
    with torch.no_grad():
        for pos, keep in shard_for_eval(len(pairs), group.world_size(), group.rank(),
                                        cfg.dpo.micro_batch_size):
            idx = [by_length[i] for i in pos]
            logps, ntok = batch_logps(engine, collate([pairs[i] for i in idx],
                                                      tokenizer.pad_token_id))
            (c, r), (nc, nr) = split_pair_logps(logps.cpu()), split_pair_logps(ntok.cpu())
            if keep:
                mine += list(zip(idx, c.tolist(), r.tolist(), nc.tolist(), nr.tolist()))
    rows = sorted(row for part in collectives.all_gather_objects(mine) for row in part)
    if group.rank() == 0:
        print(f"reference log-probs: {len(pairs)} pairs in {time.perf_counter() - start:.1f} s",
              flush=True)
    if group.rank() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_beside(out)  # both directions of a preference may compute it at once
        torch.save({"fingerprint": fingerprint, "keys": [pairs[i].key for i, *_ in rows],
                    "logps": torch.tensor([[c, r] for _, c, r, _, _ in rows], dtype=torch.float64),
                    "tokens": torch.tensor([[nc, nr] for *_, nc, nr in rows])}, tmp)
        tmp.replace(out)
    group.barrier()
    del engine
    return {pairs[i].key: (c, r, int(nc), int(nr)) for i, c, r, nc, nr in rows}
