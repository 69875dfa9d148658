import torch

from prefvec_ds.data.tokenize import IGNORE_INDEX
from prefvec_ds.train.logps import sequence_logps, split_pair_logps


def test_only_labelled_tokens_count():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX],
                           [IGNORE_INDEX, 1, 2, 6, 0]])
    logps, ntok = sequence_logps(logits, labels)
    lsm = logits.log_softmax(-1)
    # logits at t predict labels at t+1
    expected0 = lsm[0, 1, 3] + lsm[0, 2, 4]
    expected1 = lsm[1, 0, 1] + lsm[1, 1, 2] + lsm[1, 2, 6] + lsm[1, 3, 0]
    assert torch.allclose(logps, torch.stack([expected0, expected1]), atol=1e-5)
    assert ntok.tolist() == [2, 4]


def test_padding_values_do_not_leak():
    torch.manual_seed(1)
    logits = torch.randn(1, 6, 5)
    labels = torch.tensor([[IGNORE_INDEX, 2, 3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    a, _ = sequence_logps(logits, labels)
    logits[0, 3:] = 1e4  # garbage logits at padded positions
    b, _ = sequence_logps(logits, labels)
    assert torch.equal(a, b)


def test_chunked_equals_full_and_bf16_is_computed_in_fp32():
    torch.manual_seed(2)
    logits = torch.randn(6, 9, 11)
    labels = torch.randint(0, 11, (6, 9))
    labels[:, :3] = IGNORE_INDEX
    full, n1 = sequence_logps(logits, labels)
    chunked, n2 = sequence_logps(logits, labels, chunk_rows=4)
    assert torch.allclose(full, chunked, atol=1e-6) and torch.equal(n1, n2)
    low, _ = sequence_logps(logits.bfloat16(), labels)
    assert low.dtype == torch.float32


def test_split_pair_logps_halves():
    c, r = split_pair_logps(torch.arange(6.0))
    assert c.tolist() == [0, 1, 2] and r.tolist() == [3, 4, 5]
