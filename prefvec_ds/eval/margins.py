"""Log-prob preference margins of held-out pairs under a model: no generation, deterministic.

For a preference p and its held-out pairs (in p's + orientation), the margin of a pair is
log pi(chosen | prompt) - log pi(rejected | prompt) (summed over response tokens); the sweep
reports the mean margin and the accuracy (share of pairs with a positive margin) at every eta
point. DPO on p+ raises exactly this quantity, so it moves with eta_p even where sampled or
greedy answers are too coarse to show it.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefvec_ds.config.schema import RunConfig
from prefvec_ds.data.pairs import is_held_out
from prefvec_ds.data.sources import load_preference
from prefvec_ds.data.tokenize import TokenizedPair, collate_pairs, tokenize_pairs


@dataclass(frozen=True)
class MarginSet:
    """The held-out pairs of one preference, tokenized once for the whole sweep."""

    preference: str
    pairs: list[TokenizedPair]


def held_out_pairs(cfg: RunConfig, tokenizer, limit: int) -> list[MarginSet]:
    """Up to `limit` held-out pairs of every preference (none when limit is 0 or the
    preference holds out nothing)."""
    if limit <= 0:
        return []
    out = []
    for name, pref in cfg.data.preferences.items():
        pairs = load_preference(name, pref, cfg.data)
        held = [p for p in pairs if is_held_out(p.key(), pref.eval_fraction)][:limit]
        if held:
            tokenized, _ = tokenize_pairs(held, tokenizer, cfg.data)
            out.append(MarginSet(name, tokenized))
    return out


def pair_margins(model, pairs: list[TokenizedPair], pad_id: int, batch_size: int = 32
                 ) -> list[float]:
    """log p(chosen) - log p(rejected) of every pair, in order (the trainers' batch_logps: the
    LM head only at label positions)."""
    import torch  # noqa: PLC0415

    from prefvec_ds.train.logps import batch_logps, split_pair_logps  # noqa: PLC0415

    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            logps, _ = batch_logps(model, collate_pairs(pairs[start:start + batch_size], pad_id))
            chosen, rejected = split_pair_logps(logps.double())
            out += (chosen - rejected).tolist()
    return out


def margin_summary(margins: list[float]) -> dict[str, float]:
    """{'margin': mean, 'accuracy': share > 0, 'n': count}."""
    n = len(margins)
    return {"margin": sum(margins) / n if n else float("nan"),
            "accuracy": sum(m > 0 for m in margins) / n if n else float("nan"), "n": n}


def measure(model, sets: list[MarginSet], pad_id: int, batch_size: int = 32
            ) -> dict[str, dict[str, float]]:
    """preference -> margin summary, for every held-out set."""
    return {s.preference: margin_summary(pair_margins(model, s.pairs, pad_id, batch_size))
            for s in sets}
