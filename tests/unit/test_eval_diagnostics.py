"""Vector diagnostics: STI math on known subspaces, cosines and norms from vector folders."""

from __future__ import annotations

import json

import pytest
import torch

from prefvec_ds.eval.diagnostics import (matrix_interference, pair_overlap, top_subspace,
                                         vector_diagnostics)

pytestmark = pytest.mark.unit


def low_rank(rows: int, cols: int, basis: torch.Tensor, seed: int) -> torch.Tensor:
    """A matrix whose column space is spanned by `basis` [rows, k]."""
    g = torch.Generator().manual_seed(seed)
    return basis @ torch.randn(basis.shape[1], cols, generator=g, dtype=torch.float64)


def orthonormal(rows: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
    return q


def test_sti_is_k_for_one_subspace_and_0_for_orthogonal_ones():
    k, rows = 4, 64
    q = orthonormal(rows, 2 * k, 0)
    a, b = q[:, :k], q[:, k:]
    same = [low_rank(rows, 32, a, 1), low_rank(rows, 32, a, 2)]
    orth = [low_rank(rows, 32, a, 1), low_rank(rows, 32, b, 2)]
    sti, chance = matrix_interference(same, k)
    assert sti == pytest.approx(k, abs=1e-6) and chance == pytest.approx(k * k / rows)
    assert matrix_interference(orth, k)[0] == pytest.approx(0.0, abs=1e-9)
    # three vectors: the sum runs over the 3 pairs
    three = [low_rank(rows, 32, a, s) for s in (1, 2, 3)]
    assert matrix_interference(three, k)[0] == pytest.approx(3 * k, abs=1e-6)
    u = top_subspace(same[0], k)
    assert u.shape == (rows, k) and pair_overlap(u, u) == pytest.approx(k)


def test_randomized_svd_path_agrees_on_a_tall_matrix(monkeypatch):
    from prefvec_ds.eval import diagnostics

    basis = orthonormal(300, 3, 5)
    m = low_rank(300, 40, basis, 6).float()
    monkeypatch.setattr(diagnostics, "EXACT_SVD_MAX", 10)  # force svd_lowrank
    u = top_subspace(m, 3)
    assert pair_overlap(u, basis) == pytest.approx(3.0, abs=1e-4)


def write_vector(folder, tensors: dict) -> str:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({k: v.float().contiguous() for k, v in tensors.items()},
              str(folder / "model.safetensors"))
    (folder / "prefvec_vector.json").write_text(json.dumps(
        {"format": "prefvec-vector", "version": 1, "dtype": "fp32", "aliases": {}}))
    return str(folder)


def test_vector_diagnostics_from_folders(tmp_path):
    q = orthonormal(48, 8, 0)
    helpful = {"w1": low_rank(48, 16, q[:, :2], 1), "w2": low_rank(48, 24, q[:, :2], 2),
               "norm": torch.ones(48)}
    harmless = {"w1": low_rank(48, 16, q[:, 4:6], 3), "w2": low_rank(48, 24, q[:, 4:6], 4),
                "norm": torch.ones(48)}
    seed = {k: v * 1.5 + 1e-3 * torch.randn(v.shape, dtype=v.dtype) for k, v in helpful.items()}
    vecs = {"helpful": write_vector(tmp_path / "h", helpful),
            "harmless": write_vector(tmp_path / "s", harmless)}
    diag = vector_diagnostics(vecs, {"helpful": {43: write_vector(tmp_path / "h43", seed)}},
                              sti_rank=2, sti_matrices=1)
    want = sum(float(t.double().pow(2).sum()) for t in helpful.values()) ** 0.5
    assert diag["norms"]["helpful"] == pytest.approx(want, rel=1e-5)
    assert diag["cross_seed_cosine"]["helpful"]["43"] > 0.999
    cos = diag["cosine"]["helpful"]["harmless"]  # only the 1-D norm parts overlap
    want_cos = 48 / (want * sum(float(t.double().pow(2).sum())
                                for t in harmless.values()) ** 0.5)
    assert cos == pytest.approx(want_cos, rel=1e-4)
    sti = diag["sti"]
    assert sti["matrices"] == 1 and sti["pairs"] == 1 and sti["rank"] == 2
    assert sti["sti"] == pytest.approx(0.0, abs=1e-8)  # orthogonal column spaces
    assert sti["sti_chance"] == pytest.approx(4 / 48)
    assert list(sti["per_matrix"]) in (["w1"], ["w2"])
