"""Merge-method kernels (ckpt/methods.py) against hand-computed tensors and a whole-tensor
reference written from the TIES / DARE definitions (mergekit's: magnitude top-k per tensor,
sign elected by the summed weighted deltas, disjoint sum divided by the agreeing weights)."""

import numpy as np
import pytest
import torch

from prefvec_ds.ckpt.methods import (MERGE_METHODS, ChunkContext, MethodParams, TopMagnitude,
                                     check_params, kept_at_random, drop_key, mix_chunk,
                                     needs_thresholds)


def thresholds(deltas, density, chunk):
    """Each vector's trim threshold, fed chunk by chunk as the merge would."""
    out = []
    for d in deltas:
        tm, passes = TopMagnitude(d.size, density), 0
        while True:
            passes += 1
            for s in range(0, d.size, chunk):
                tm.feed(d[s:s + chunk])
            if not tm.end_pass():
                break
        assert passes <= 2
        out.append(tm.threshold())
    return tuple(out)


def merged(method, base, deltas, weights, p, chunk, name="w"):
    out = base.astype(np.float32).copy()
    th = thresholds(deltas, p.density, chunk) if needs_thresholds(method, p) else ()
    for s in range(0, base.size, chunk):
        mix_chunk(method, out[s:s + chunk], [d[s:s + chunk] for d in deltas], weights, p,
                  ChunkContext(name, s, th))
    return out


def test_ties_by_hand():
    base = np.full(4, 10, np.float32)
    d1 = np.array([1, -2, 3, 0.5], np.float32)   # top-2 magnitudes: -2, 3
    d2 = np.array([-1, 1.5, 2, -4], np.float32)  # top-2 magnitudes: 2, -4
    # trimmed [0,-2,3,0] + [0,0,2,-4] = [0,-2,5,-4]; signs elected [+,-,+,-]; agreeing
    # weights [0->1, 1, 2, 1]; disjoint mean [0, -2, 2.5, -4]
    out = merged("ties", base, [d1, d2], [1.0, 1.0], MethodParams(density=0.5, normalize=True), 3)
    np.testing.assert_array_equal(out, [10, 8, 12.5, 6])
    out = merged("ties", base, [d1, d2], [1.0, 1.0], MethodParams(density=0.5), 4)
    np.testing.assert_array_equal(out, [10, 8, 15, 6])   # without normalize: disjoint sum


@pytest.mark.parametrize("n,chunk", [(1000, 1000), (1000, 7), (5000, 4096)])
@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.999])
def test_top_magnitude_is_the_exact_kth_largest(n, chunk, density):
    rng = np.random.default_rng(n + int(density * 1000))
    x = (rng.standard_normal(n) * rng.choice([1e-6, 1.0, 1e3], n)).astype(np.float32)
    x[::50] = 0.0
    k = int(density * n)
    (bits,) = thresholds([x], density, chunk)
    kth = np.sort(np.abs(x))[::-1][k - 1]
    mags, kth_bits = np.abs(x).view(np.uint32), np.float32(kth).view(np.uint32)
    # keeping |x| >= threshold keeps exactly the |x| >= k-th largest: k values, more only on
    # exact ties at the k-th (here: the zeros at density 0.999)
    np.testing.assert_array_equal(mags >= bits, mags >= kth_bits)
    assert np.count_nonzero(mags > kth_bits) < k <= np.count_nonzero(mags >= kth_bits)
    if kth > 0:
        assert np.count_nonzero(mags >= bits) == k


def test_top_magnitude_keeps_nothing_when_k_is_zero():
    (bits,) = thresholds([np.ones(10, np.float32)], 0.05, 4)  # int(0.5) = 0
    assert bits == 0xFFFFFFFF


def reference(method, base, deltas, weights, density, normalize):
    """Whole-tensor torch reference (magnitude trim by argsort, as mergekit does)."""
    b, ds = torch.from_numpy(base), [torch.from_numpy(d.copy()) for d in deltas]
    if MERGE_METHODS[method].sparsify == "magnitude" and density < 1:
        k = int(density * b.numel())
        for d in ds:
            mask = torch.zeros_like(d)
            mask[torch.argsort(d.abs(), descending=True)[:k]] = 1
            d.mul_(mask)
    w = torch.tensor(weights).unsqueeze(-1)
    weighted = torch.stack(ds) * w
    if MERGE_METHODS[method].elect_sign:
        majority = (weighted.sum(0) >= 0).float() * 2 - 1
        mask = weighted.sign() == majority
        mixed, divisor = (weighted * mask).sum(0), (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = weighted.sum(0), w.sum()
    return (b + (mixed / divisor if normalize else mixed)).numpy()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
@pytest.mark.parametrize("normalize", [False, True])
def test_chunked_merge_equals_the_whole_tensor_reference(method, normalize):
    rng = np.random.default_rng(7)
    base = rng.standard_normal(3001).astype(np.float32)
    deltas = [rng.standard_normal(3001).astype(np.float32) * s for s in (0.01, 0.03, 0.02)]
    weights = [1.0, -0.5, 0.7]
    p = MethodParams(density=0.2, normalize=normalize)
    out = merged(method, base, deltas, weights, p, 256)
    np.testing.assert_allclose(out, reference(method, base, deltas, weights, 0.2, normalize),
                               rtol=0, atol=2e-7)


def test_task_arithmetic_is_base_plus_weighted_sum():
    rng = np.random.default_rng(1)
    base, d1, d2 = (rng.standard_normal(100).astype(np.float32) for _ in range(3))
    out = merged("task_arithmetic", base, [d1, d2], [0.6666667, 1.0],
                 MethodParams(lam=2.0), 33)
    np.testing.assert_allclose(out, base + 2.0 * (np.float32(0.6666667) * d1 + d2), atol=1e-6)


def test_dare_drops_reproducibly_whatever_the_chunking():
    rng = np.random.default_rng(3)
    base, d = np.zeros(20000, np.float32), rng.standard_normal(20000).astype(np.float32)
    p = MethodParams(density=0.3, seed=11)
    a = merged("dare", base, [d], [1.0], p, 20000)
    b = merged("dare", base, [d], [1.0], p, 999)
    np.testing.assert_array_equal(a, b)
    kept = np.count_nonzero(a)
    assert abs(kept - 0.3 * 20000) < 5 * np.sqrt(20000 * 0.3 * 0.7)   # binomial, 5 sigma
    np.testing.assert_allclose(a[a != 0], d[a != 0] / np.float32(0.3), rtol=1e-6)
    other = merged("dare", base, [d], [1.0], MethodParams(density=0.3, seed=12), 999)
    assert np.count_nonzero((a != 0) != (other != 0)) > 1000   # another seed, other drops
    renamed = merged("dare", base, [d], [1.0], p, 999, name="other.weight")
    assert not np.array_equal(a != 0, renamed != 0)             # per tensor streams


def test_dare_at_density_one_is_task_arithmetic():
    rng = np.random.default_rng(4)
    base, d1, d2 = (rng.standard_normal(64).astype(np.float32) for _ in range(3))
    for m in ("dare", "dare_ties"):
        p = MethodParams(density=1.0, normalize=False)
        a = merged(m, base, [d1, d2], [1.0, 0.5], p, 16)
        want = "task_arithmetic" if m == "dare" else "ties"
        np.testing.assert_array_equal(a, merged(want, base, [d1, d2], [1.0, 0.5], p, 16))


def test_drop_mask_rate_and_independence_of_keys():
    m1 = kept_at_random(drop_key(0, "t", 0), 0, 100000, 0.5)
    m2 = kept_at_random(drop_key(0, "t", 1), 0, 100000, 0.5)
    assert abs(m1.mean() - 0.5) < 0.01 and abs((m1 & m2).mean() - 0.25) < 0.01


@pytest.mark.parametrize("method,params,msg", [
    ("median", MethodParams(), "expected one of task_arithmetic, ties, dare, dare_ties"),
    ("ties", MethodParams(density=0.0), "density: expected a fraction in (0, 1]"),
    ("ties", MethodParams(density=1.5), "density: expected a fraction in (0, 1]"),
    ("dare", MethodParams(lam=float("nan")), "lambda: expected a finite number"),
])
def test_bad_params_are_one_line(method, params, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        check_params(method, params)
