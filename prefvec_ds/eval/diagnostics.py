"""Vector diagnostics for the report: norms, cosines (between preferences and across seeds), and
Subspace Task Interference, streaming one tensor per vector at a time.

Subspace Task Interference (STI), as reported by the Preference Vector paper (rank-8 SVD over
the 32 largest-norm weight matrices; 0.41 for two preferences, 2.33 for four): for each selected
matrix W and each vector i, let U_i be the top-k left singular vectors of phi_i[W] (its main
output directions). The interference of the matrix is the sum over pairs i < j of
||U_i^T U_j||_F^2: each pair adds between 0 (orthogonal subspaces) and k (the same subspace).
STI is its mean over the selected matrices, which are the 2-D tensors with the largest norm
sqrt(sum_i ||phi_i[W]||^2). The paper's figures scale with the number of pairs (1 pair: 0.41,
6 pairs: 2.33 = 0.39 each), which this sum over pairs reproduces. `sti_chance` is what random
subspaces would give, sum over pairs of k_i k_j / m for an m-row matrix: on a small model
(hidden 128, k = 8: 0.5 per pair) chance alone is large, on an 8B model (4096 rows) it is 0.016.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np

from prefvec_ds.ckpt.segments import FDS
from prefvec_ds.ckpt.sources import alias_groups, match_names, open_vector_arg
from prefvec_ds.ckpt.stats import vector_stats

EXACT_SVD_MAX = 2048  # min(rows, cols) up to which the SVD is exact; above: randomized


def top_subspace(matrix, k: int):
    """[rows, k'] orthonormal top-k left singular vectors (k' = min(k, rank bound))."""
    import torch  # noqa: PLC0415

    k = min(k, *matrix.shape)
    if min(matrix.shape) <= EXACT_SVD_MAX:
        u, _, _ = torch.linalg.svd(matrix.double(), full_matrices=False)
        return u[:, :k]
    u, _, _ = torch.svd_lowrank(matrix.float(), q=min(k + 8, *matrix.shape), niter=6)
    return u[:, :k].double()


def pair_overlap(u_a, u_b) -> float:
    """||U_a^T U_b||_F^2: 0 for orthogonal subspaces, k for identical ones."""
    return float((u_a.T @ u_b).pow(2).sum())


def matrix_interference(matrices: list, k: int) -> tuple[float, float]:
    """(sum over pairs of ||U_i^T U_j||_F^2, the same for random subspaces) of one matrix's
    per-vector slices."""
    subspaces = [top_subspace(m, k) for m in matrices]
    rows = matrices[0].shape[0]
    sti = sum(pair_overlap(a, b) for a, b in itertools.combinations(subspaces, 2))
    chance = sum(a.shape[1] * b.shape[1] / rows
                 for a, b in itertools.combinations(subspaces, 2))
    return sti, chance


def _read(src, name: str, shape) -> np.ndarray:
    buf = np.empty(math.prod(shape), dtype=np.float32)
    src.add_into(name, buf, copy=True)
    return buf.reshape(shape)


def subspace_interference(paths: list[str], k: int = 8, n_matrices: int = 32) -> dict:
    """STI of the vectors at `paths` (see the module docstring), streaming: one pass for the
    norms of the 2-D tensors, one for the selected matrices."""
    import torch  # noqa: PLC0415

    vecs = [open_vector_arg(str(p)) for p in paths]
    first = vecs[0]
    maps = [match_names(first.names(), v, alias_groups(first, v), f"vector {first.path}",
                        "vector") for v in vecs]
    try:
        norms = {}
        for name in first.names():
            shape = tuple(first.shape(name))
            if len(shape) != 2:
                continue
            sq = [float(np.square(_read(v, m[name], shape), dtype=np.float64).sum())
                  for v, m in zip(vecs, maps)]
            if all(s > 0 for s in sq):  # a frozen matrix (phi = 0) has no subspace
                norms[name] = math.sqrt(sum(sq))
        chosen = sorted(norms, key=norms.get, reverse=True)[:n_matrices]
        per_matrix = {}
        for name in chosen:
            shape = tuple(first.shape(name))
            mats = [torch.from_numpy(_read(v, m[name], shape)) for v, m in zip(vecs, maps)]
            per_matrix[name] = matrix_interference(mats, k)
    finally:
        FDS.close()
    n = len(per_matrix)
    return {"rank": k, "matrices": n, "pairs": len(paths) * (len(paths) - 1) // 2,
            "sti": sum(s for s, _ in per_matrix.values()) / n if n else float("nan"),
            "sti_chance": sum(c for _, c in per_matrix.values()) / n if n else float("nan"),
            "per_matrix": {name: round(s, 6) for name, (s, _) in per_matrix.items()}}


def vector_diagnostics(vectors: dict[str, str | Path],
                       seed_vectors: dict[str, dict[int, str | Path]] | None = None,
                       sti_rank: int = 8, sti_matrices: int = 32) -> dict:
    """Norms, the cosine matrix between preferences, cross-seed cosines and STI.

    vectors: preference -> vector folder; seed_vectors: preference -> {seed: vector folder}
    of the same preference trained with another seed.
    """
    seed_vectors = seed_vectors or {}
    labels = list(vectors)
    paths = [str(vectors[p]) for p in labels]
    for pref, by_seed in seed_vectors.items():
        for seed, path in by_seed.items():
            labels.append(f"{pref}@seed{seed}")
            paths.append(str(path))
    stats = vector_stats(paths)
    index = {lab: i for i, lab in enumerate(labels)}
    prefs = list(vectors)
    out = {
        "norms": {lab: stats["total"][i] for lab, i in index.items()},
        "layer_norms": {layer: dict(zip(labels, norms))
                        for layer, norms in stats["layers"].items()},
        "cosine": {a: {b: stats["cosine"][index[a]][index[b]] for b in prefs} for a in prefs},
        "cross_seed_cosine": {
            pref: {str(seed): stats["cosine"][index[pref]][index[f"{pref}@seed{seed}"]]
                   for seed in by_seed} for pref, by_seed in seed_vectors.items()},
    }
    if len(prefs) >= 2:
        out["sti"] = subspace_interference([str(vectors[p]) for p in prefs], sti_rank,
                                           sti_matrices)
    return out
