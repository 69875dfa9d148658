"""Correctness guard of the optimised DPO step: its loss and gradients equal a simple
implementation's on a tiny Llama.

The simple step is the textbook one: chosen and rejected as separate right-padded rows, full
[N, T, V] logits, log_softmax, gather, sum over response tokens, -logsigmoid(beta * h). The
optimised step (prefvec_ds.train.dpo.pair_forward) runs one shared-prompt row per pair, projects
only the labelled positions and takes log-softmax in fp32 chunks with its own backward.

Tolerance (fp32): loss within 1e-6 absolute; every gradient element within 1e-6 + 1e-4 * |g|.
The two differ only in float rounding (matmuls over other shapes, sums in another order); the
masked attention entries contribute exact zeros. Measured: ~4e-6 on log-probs of ~-40, ~2e-8 on
gradients of ~0.1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prefvec_ds.config.schema import DPOConfig, RunConfig
from prefvec_ds.data.tokenize import (IGNORE_INDEX, TokenizedPair, collate_pairs,
                                      collate_pairs_shared, pair_tokens)
from prefvec_ds.train import logps as logps_mod
from prefvec_ds.train.dpo import pair_forward
from prefvec_ds.train.logps import batch_logps, label_logps

transformers = pytest.importorskip("transformers")

LOSS_ATOL = 1e-6
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-4
VOCAB, PAD = 101, 0


def tiny_llama(attn: str = "sdpa"):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    cfg._attn_implementation = attn
    return transformers.LlamaForCausalLM(cfg).float()


def random_pairs(n: int, seed: int = 1) -> list[TokenizedPair]:
    gen = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        k = int(torch.randint(lo, hi, (1,), generator=gen))
        return tuple(torch.randint(1, VOCAB, (k,), generator=gen).tolist())

    # lengths differ on purpose: padding in both layouts, a 1-token response, a long prompt
    return [TokenizedPair(ids(1, 14), ids(1, 9), ids(1, 9), f"k{i}") for i in range(n)]


def simple_logps(model, pairs):
    """Textbook per-sequence log-probs: [2B] (chosen first) from full logits."""
    batch = collate_pairs(pairs, PAD)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    lp = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (lp * mask).sum(-1), mask.sum(-1)


def simple_step(model, pairs, ref, beta):
    lp, _ = simple_logps(model, pairs)
    b = len(pairs)
    h = (lp[:b] - ref[:, 0]) - (lp[b:] - ref[:, 1])
    return (-F.logsigmoid(beta * h)).mean()


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_same_step(model, loss_a, loss_b):
    assert abs(loss_a.item() - loss_b.item()) <= LOSS_ATOL, (loss_a.item(), loss_b.item())
    ga, gb = grads_of(model, loss_a), grads_of(model, loss_b)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=GRAD_ATOL, rtol=GRAD_RTOL,
                                   msg=lambda m, n=name: f"{n}: {m}")


def ref_table(pairs):
    gen = torch.Generator().manual_seed(7)
    counts = torch.tensor([[len(p.chosen_ids), len(p.rejected_ids)] for p in pairs],
                          dtype=torch.float64)
    return torch.cat([-20 * torch.rand(len(pairs), 2, generator=gen, dtype=torch.float64),
                      counts], 1)


@pytest.mark.parametrize("attn,share", [("sdpa", True), ("eager", True), ("sdpa", False)])
def test_optimised_step_equals_simple_step(attn, share, monkeypatch):
    monkeypatch.setattr(logps_mod, "CHUNK_ELEMENTS", 3 * VOCAB)  # several chunks per batch
    model = tiny_llama(attn)
    pairs = random_pairs(5)
    ref = ref_table(pairs)
    cfg = RunConfig(dpo=DPOConfig(beta=0.1, share_prompt=share))
    idx = [0, 1, 2, 3, 4]
    loss, metrics, n_tokens = pair_forward(model, pairs, ref, idx, PAD, cfg)
    assert n_tokens == sum(pair_tokens(p) for p in pairs)
    assert_same_step(model, simple_step(model, pairs, ref[:, :2].float(), 0.1), loss)
    lp, _ = simple_logps(model, pairs)
    assert metrics["logps/chosen"].item() == pytest.approx(lp[:5].mean().item(), abs=1e-4)


def test_shared_prompt_layout_counts_and_masks():
    pairs = [TokenizedPair((5, 6, 7), (8, 9), (10, 11, 12), "a"),
             TokenizedPair((5,), (13,), (14, 15), "b")]
    b = collate_pairs_shared(pairs, PAD)
    assert b["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 10, 11, 12]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    mask = b["attention_mask"][0, 0]
    assert mask[5].tolist() == [True, True, True, False, False, True, False, False]
    assert not mask[:, 3:5][5:].any()  # rejected never sees chosen
    assert b["attention_mask"][1, 0, 7].tolist() == [False] * 7 + [True]  # padding: itself only
    # chosen of pair 0 is sequence 0, rejected of pair 1 is sequence 3; the prompt's last
    # position predicts the first token of both responses
    assert torch.bincount(b["target_seq"], minlength=4).tolist() == [2, 1, 3, 2]
    assert b["keep"][0].tolist() == [False, False, True, True, False, True, True, False]


def test_label_logps_matches_log_softmax_in_bf16_and_fp32():
    torch.manual_seed(3)
    for dtype, atol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        logits = torch.randn(6, 40).to(dtype).requires_grad_()
        row = torch.tensor([0, 0, 1, 3, 5, 5, 5])  # a row may serve several labels
        tgt = torch.tensor([1, 2, 3, 39, 0, 0, 7])
        out = label_logps(logits, row, tgt)
        assert out.dtype == torch.float32
        grad = torch.randn(7)
        (gx,) = torch.autograd.grad((out * grad).sum(), logits)
        ref_lp = logits.float().log_softmax(-1)[row, tgt]
        (gr,) = torch.autograd.grad((ref_lp * grad).sum(), logits)
        torch.testing.assert_close(out, ref_lp, atol=atol, rtol=0)
        torch.testing.assert_close(gx.float(), gr.float(), atol=atol, rtol=0)


def test_batch_logps_both_layouts_agree_with_full_logits():
    model = tiny_llama()
    pairs = random_pairs(4, seed=5)
    with torch.no_grad():
        want, n_want = simple_logps(model, pairs)
        for batch in (collate_pairs(pairs, PAD), collate_pairs_shared(pairs, PAD)):
            got, n_got = batch_logps(model, batch)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-6)
            assert n_got.tolist() == n_want.tolist()
