"""Chat-template tokenization, truncation that keeps the response, and batch collation.

Prompt and response are tokenized separately and concatenated, so the prompt/response boundary
(the label mask) is exact whatever the tokenizer does at the seam.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from prefvec_ds import PrefvecError
from prefvec_ds.config.schema import DataConfig
from prefvec_ds.data.pairs import Messages, PreferencePair

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    key: str
    """PreferencePair.key(): order-free identity, shared by the + and - views."""
    chosen_safe: bool | None = None
    """Safety label of the chosen response (None = unlabelled); read by dpo.loss_type bfpo."""
    rejected_safe: bool | None = None


@dataclass(frozen=True)
class TokenizedExample:
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]


def render_prompt(tokenizer, prompt: Messages) -> str:
    """The model's own chat template when it has one, else an HH-style transcript."""
    messages = [{"role": r, "content": c} for r, c in prompt]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{names.get(r, r)}: {c}" for r, c in prompt) + "\n\nAssistant:"


def encode_prompt(tokenizer, prompt: Messages) -> list[int]:
    return tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text if getattr(tokenizer, "chat_template", None) else " " + text,
                    add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]


def fit(prompt: list[int], longest_response: int, data: DataConfig) -> int:
    """How many prompt tokens to keep (from the end) so the responses fit in max_len.

    The prompt keeps at least max_prompt_len tokens; responses get the rest and are cut only
    when even that does not fit.
    """
    if len(prompt) + longest_response <= data.max_len:
        return len(prompt)
    return min(len(prompt), max(data.max_prompt_len, data.max_len - longest_response))


def _check_prompt(n_prompt: int, data: DataConfig, origin: str) -> bool:
    """False (drop) or an error for a prompt that leaves no room for a response."""
    if n_prompt < data.max_len:
        return True
    if data.drop_overlong_prompts:
        return False
    raise PrefvecError(f"{origin}: prompt has {n_prompt} tokens, not less than data.max_len="
                       f"{data.max_len} (raise data.max_len or set "
                       "data.drop_overlong_prompts=true)")


def tokenize_pairs(pairs: list[PreferencePair], tokenizer, data: DataConfig
                   ) -> tuple[list[TokenizedPair], dict[str, int]]:
    """Tokenize and truncate; drop pairs whose responses are identical after truncation."""
    out, stats = [], {"pairs": len(pairs), "identical": 0, "overlong_prompt": 0, "truncated": 0}
    for pair in pairs:
        p = encode_prompt(tokenizer, pair.prompt)
        if not _check_prompt(len(p), data, pair.origin):
            stats["overlong_prompt"] += 1
            continue
        c, r = encode_response(tokenizer, pair.chosen), encode_response(tokenizer, pair.rejected)
        keep = fit(p, max(len(c), len(r)), data)
        room = data.max_len - keep
        stats["truncated"] += int(keep < len(p) or max(len(c), len(r)) > room)
        c, r = c[:room], r[:room]
        if c == r:
            stats["identical"] += 1
            continue
        out.append(TokenizedPair(tuple(p[len(p) - keep:]), tuple(c), tuple(r), pair.key(),
                                 pair.chosen_safe, pair.rejected_safe))
    if not out:
        raise PrefvecError(f"no preference pairs left after tokenization and filtering ({stats})")
    return out, stats


def tokenize_sft(examples: list[tuple[Messages, str]], tokenizer, data: DataConfig
                 ) -> list[TokenizedExample]:
    out = []
    for i, (prompt, response) in enumerate(examples):
        p = encode_prompt(tokenizer, prompt)
        if not _check_prompt(len(p), data, f"SFT example {i}"):
            continue
        r = encode_response(tokenizer, response)
        keep = fit(p, len(r), data)
        out.append(TokenizedExample(tuple(p[len(p) - keep:]), tuple(r[: data.max_len - keep])))
    if not out:
        raise PrefvecError("no SFT examples left after tokenization and filtering")
    return out


def direction_view(pairs: list[TokenizedPair], sign: int) -> list[TokenizedPair]:
    """The + direction is the pairs as labelled; the - direction swaps chosen and rejected.

    Label switching is the only difference between theta+ and theta- of one preference.
    """
    if sign not in (1, -1):
        raise ValueError(f"direction sign must be +1 or -1, got {sign}")
    if sign == 1:
        return list(pairs)
    return [TokenizedPair(p.prompt_ids, p.rejected_ids, p.chosen_ids, p.key, p.rejected_safe,
                          p.chosen_safe) for p in pairs]


def require_safety_labels(pairs: list[TokenizedPair], where: str, reader: str) -> None:
    """One clear line when what reads safety labels (`reader`: "dpo.loss_type bfpo",
    "baseline dpo_safe_first") meets an unlabelled pair."""
    unlabelled = sum(p.chosen_safe is None or p.rejected_safe is None for p in pairs)
    if unlabelled:
        raise PrefvecError(f"{where}: {reader} needs both responses' safety labels "
                           f"(is_response_0_safe / is_response_1_safe, as pku_saferlhf and "
                           f"embedded data carry); {unlabelled} of {len(pairs)} pairs have none")


def fingerprint_pairs(pairs: list[TokenizedPair]) -> str:
    """sha256 of every token id (they already reflect truncation): changes when the data does."""
    h = hashlib.sha256()
    for pair in pairs:
        for seq in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            h.update(len(seq).to_bytes(4, "little"))
            h.update(torch.tensor(seq, dtype=torch.int32).numpy().tobytes())
    return h.hexdigest()


def _pad_batch(seqs: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """seqs = [(ids, n_prompt)]; labels mask the prompt and the padding (right padding)."""
    width = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(seqs):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[i, : len(ids)] = t
        labels[i, n_prompt: len(ids)] = t[n_prompt:]
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def collate_pairs(batch: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of 2B rows: the B chosen sequences, then the B rejected ones."""
    seqs = [(list(p.prompt_ids) + list(p.chosen_ids), len(p.prompt_ids)) for p in batch]
    seqs += [(list(p.prompt_ids) + list(p.rejected_ids), len(p.prompt_ids)) for p in batch]
    return _pad_batch(seqs, pad_id)


def collate_pairs_shared(batch: list[TokenizedPair], pad_id: int) -> dict:
    """One row per pair: prompt, chosen and rejected back to back, the prompt run once.

    The rejected response attends to the prompt and to itself, never to the chosen response,
    and its positions restart where the prompt ends: every token sees exactly the context and
    position it has in its own row of `collate_pairs`, so the log-probs are the same while the
    prompt (most of an HH-RLHF pair's tokens) goes through the model once instead of twice.

    Returns input_ids and position_ids [B, L]; attention_mask [B, 1, L, L] (bool, True = may
    attend; a padding position attends to itself only); and the targets that
    `prefvec_ds.train.logps.batch_logps` reads: keep [B, L] (positions whose logits are needed:
    the prompt's last one predicts the first token of both responses), target_row (each label's
    index among the kept positions, row-major), target_ids, target_seq (pair i's chosen response
    is sequence i, its rejected one B + i) and n_seq = 2B.
    """
    n = len(batch)
    width = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in batch)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    seg = torch.full((n, width), -1, dtype=torch.int8)  # 0 prompt, 1 chosen, 2 rejected, -1 pad
    keep = torch.zeros((n, width), dtype=torch.bool)
    # (pair, position that predicts the label, label id, sequence)
    targets: list[tuple[int, int, int, int]] = []
    for i, p in enumerate(batch):
        n_p, n_c, n_r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        length = n_p + n_c + n_r
        input_ids[i, :length] = torch.tensor(p.prompt_ids + p.chosen_ids + p.rejected_ids)
        position_ids[i, :length] = torch.cat([torch.arange(n_p + n_c),
                                              torch.arange(n_p, n_p + n_r)])
        seg[i, :n_p], seg[i, n_p:n_p + n_c], seg[i, n_p + n_c:length] = 0, 1, 2
        for seq, start, ids in ((i, n_p, p.chosen_ids), (n + i, n_p + n_c, p.rejected_ids)):
            for j, tok in enumerate(ids):
                at = n_p - 1 if j == 0 else start + j - 1
                if at >= 0:  # with no prompt the first token has no predictor (as in a row)
                    targets.append((i, at, tok, seq))
    # causal, and a key is the prompt or in the query's own segment; a pad attends to itself
    query, key = seg[:, :, None], seg[:, None, :]
    mask = (((key == 0) | (key == query)) & (query >= 0)).tril()
    mask |= torch.eye(width, dtype=torch.bool)
    mask = mask[:, None]
    pair, at, ids, seq = (torch.tensor(col, dtype=torch.long) for col in zip(*targets))
    keep[pair, at] = True
    index = torch.full((n, width), -1, dtype=torch.long)
    index[keep] = torch.arange(int(keep.sum()))
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask,
            "keep": keep, "target_row": index[pair, at], "target_ids": ids, "target_seq": seq,
            "n_seq": 2 * n}


def pair_tokens(pair: TokenizedPair) -> int:
    """Tokens of the pair's chosen and rejected sequences, prompt included in both (what the
    two-row layout feeds the model; the shared-prompt layout feeds the prompt once)."""
    return 2 * len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def collate_sft(batch: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    return _pad_batch([(list(e.prompt_ids) + list(e.response_ids), len(e.prompt_ids))
                       for e in batch], pad_id)
