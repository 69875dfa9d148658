"""Per-sequence log-probabilities from logits and labels (pure tensor code, no engines)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefvec_ds.data.tokenize import IGNORE_INDEX


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(label_t | <t) over labelled tokens, and the count of those tokens.

    logits [N, T, V] predict position t+1 from t, so logits[:, :-1] pair with labels[:, 1:].
    Positions labelled IGNORE_INDEX (prompt, padding) contribute nothing. cross_entropy computes
    log-softmax and the gather in one kernel, in fp32 for bf16 logits. With chunk_rows > 0 the
    rows are processed in chunks so the fp32 copy of the logits never exists whole.
    """
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe_labels = labels.masked_fill(~mask, 0)
    rows = logits.shape[0]
    step = chunk_rows if chunk_rows > 0 else rows
    sums = []
    for start in range(0, rows, step):
        lg = logits[start: start + step]
        nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(),
                              safe_labels[start: start + step].reshape(-1), reduction="none")
        sums.append((-nll.view(lg.shape[:2]) * mask[start: start + step]).sum(-1))
    return torch.cat(sums), mask.sum(-1)


def split_pair_logps(logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first half of a concatenated pair batch is chosen, the second rejected."""
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]
