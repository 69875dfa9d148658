"""Per-sequence log-probabilities of labelled tokens (tensor code; no engines, no distributed).

Two routes compute the same numbers:
- `sequence_logps(logits, labels)`: the simple one, over full [N, T, V] logits (SFT, and the
  reference implementation that tests compare against);
- `batch_logps(model, batch)`: the DPO one. The model projects only the positions whose next
  token is a label (HF `logits_to_keep` with a boolean mask), so prompt and padding positions
  never reach the vocabulary-sized head; `label_logps` then takes log-softmax in fp32 chunks
  without keeping a full fp32 copy (or a log-softmax output) for the backward pass. The batch
  may be the usual chosen/rejected rows (`labels`) or the shared-prompt layout of
  `prefvec_ds.data.tokenize.collate_pairs_shared` (explicit targets).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from prefvec_ds.data.tokenize import IGNORE_INDEX, collate_pairs, collate_pairs_shared

# fp32 elements per chunk of label_logps: 16M (64 MB) bounds the temporaries whatever the vocab.
CHUNK_ELEMENTS = 1 << 24


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(label_t | <t) over labelled tokens, and the count of those tokens.

    logits [N, T, V] predict position t+1 from t, so logits[:, :-1] pair with labels[:, 1:].
    Positions labelled IGNORE_INDEX (prompt, padding) contribute nothing. cross_entropy computes
    log-softmax and the gather in one kernel, in fp32 for bf16 logits. With chunk_rows > 0 the
    rows are processed in chunks.
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


class _LabelLogProbs(torch.autograd.Function):
    """logp[i] = log_softmax(logits[row[i]])[target[i]], fp32 math on chunks of rows.

    Saves only the logits (in their own dtype) and one fp32 log-sum-exp per row; the backward
    rebuilds softmax chunk by chunk. F.cross_entropy would keep a full log-softmax output (and,
    for bf16 logits, a full fp32 copy) alive until the backward pass.
    """

    @staticmethod
    def forward(ctx, logits, row, target, chunk):  # noqa: D102
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for s in range(0, logits.shape[0], chunk):
            lse[s:s + chunk] = torch.logsumexp(logits[s:s + chunk].float(), dim=-1)
        ctx.save_for_backward(logits, row, target, lse)
        ctx.chunk = chunk
        return logits[row, target].float() - lse[row]

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        logits, row, target, lse = ctx.saved_tensors
        grad = grad.float()
        # d logp_i / d logits[r] = onehot(target_i) - softmax(logits[r]) for r = row_i
        per_row = torch.zeros_like(lse).index_add_(0, row, grad)
        out = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            e = min(s + ctx.chunk, logits.shape[0])
            g = torch.exp(logits[s:e].float() - lse[s:e, None]).mul_(-per_row[s:e, None])
            inside = (row >= s) & (row < e)
            g.index_put_((row[inside] - s, target[inside]), grad[inside], accumulate=True)
            out[s:e] = g
        return out, None, None, None


def label_logps(logits: torch.Tensor, row: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """fp32 log-probabilities of `target[i]` under the logits row `row[i]` (logits [R, V])."""
    chunk = max(1, CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    return _LabelLogProbs.apply(logits, row, target, chunk)


def targets_from_labels(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The explicit-target form of a right-padded [N, T] label batch: `keep` [N, T] marks the
    positions whose next token is labelled, `target_row` indexes the kept positions (row-major),
    `target_ids` are the labels, `target_seq` the sequence (row) of each label."""
    nxt = labels[:, 1:] != IGNORE_INDEX
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = nxt
    seq = nxt.nonzero()[:, 0]
    return {"keep": keep, "target_row": torch.arange(seq.numel()),
            "target_ids": labels[:, 1:][nxt], "target_seq": seq, "n_seq": labels.shape[0]}


def _accepts_keep_mask(model) -> bool:
    """HF models take `logits_to_keep` as a [B, T] bool mask since transformers 5
    (`slice_logits_to_keep`); older ones only as an int / 1-D index."""
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    cached = getattr(module, "_prefvec_keep_mask", None)
    if cached is None:
        try:
            from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401, PLC0415
            cached = "logits_to_keep" in inspect.signature(type(module).forward).parameters
        except ImportError:
            cached = False
        module._prefvec_keep_mask = cached
    return cached


def _device_of(model) -> torch.device:
    if isinstance(getattr(model, "device", None), torch.device):
        return model.device  # DeepSpeed engines and HF models have one
    return next(model.parameters()).device


def supports_shared_prompt(model) -> bool:
    """The shared-prompt layout needs a custom 4-D mask: sdpa and eager attention take one,
    flash-attention kernels do not (they get chosen and rejected as two rows instead)."""
    module = getattr(model, "module", model)
    return getattr(module.config, "_attn_implementation", None) in ("sdpa", "eager")


def pair_collate(model, share_prompt: bool):
    """The collate function of a DPO batch for this model: shared prompt when asked and
    supported, else chosen and rejected as separate rows."""
    if share_prompt and supports_shared_prompt(model):
        return collate_pairs_shared
    return collate_pairs


def _attention_mask(model, mask: torch.Tensor) -> torch.Tensor:
    """A 4-D bool mask as the model's attention wants it: sdpa takes bool, eager adds it."""
    module = getattr(model, "module", model)
    if mask.ndim != 4 or module.config._attn_implementation == "sdpa":
        return mask
    dtype = next(module.parameters()).dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, torch.finfo(dtype).min)


def batch_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of label log-probs, label count) per sequence of a collated pair batch: [2B] each,
    chosen sequences first. `model` is an HF causal LM or a DeepSpeed engine around one."""
    if "target_ids" not in batch:
        batch = {**batch, **targets_from_labels(batch["labels"])}
    device = _device_of(model)
    targets = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    inputs = {"input_ids": targets["input_ids"], "use_cache": False,
              "attention_mask": _attention_mask(model, targets["attention_mask"])}
    if targets.get("position_ids") is not None:
        inputs["position_ids"] = targets["position_ids"]
    keep = targets["keep"]
    if _accepts_keep_mask(model):
        logits = model(**inputs, logits_to_keep=keep).logits  # [kept positions, V]
    else:
        logits = model(**inputs).logits[keep]
    logp = label_logps(logits, targets["target_row"], targets["target_ids"])
    seq, n_seq = targets["target_seq"], targets["n_seq"]
    sums = torch.zeros(n_seq, dtype=logp.dtype, device=logp.device).index_add(0, seq, logp)
    return sums, torch.bincount(seq, minlength=n_seq)
