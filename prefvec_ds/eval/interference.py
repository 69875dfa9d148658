"""Interference by merge method (pipeline.eval.interference_methods): does trimming reduce the
alignment tax?

For task_arithmetic and each configured method (ties, dare, dare_ties at
pipeline.eval.interference_density) the report shows
- the pairwise cosines and the STI of the vectors *as that method uses them*
  (ckpt.methods.kept_deltas: each phi_i trimmed to its top-density magnitudes or dropped at
  random and rescaled, then zeroed where eta_i * phi_i lost the sign election), at the default
  merge's etas, and the share of each vector's nonzero elements the method keeps;
- the scores of the composition: the merge by that method at the same etas, written by the
  checkpoint merge and scored like the merged models.
Streaming: one tensor at a time is read for every vector (memory: the vectors' copies of the
largest tensor, as for the plain STI). Pass 1 accumulates the Gram matrices of every method
and the norms of the 2-D tensors; pass 2 reads the `sti_matrices` largest (by the plain
vectors' norm, so every method is measured on the same matrices) for the STI.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np

from prefvec_ds.ckpt.methods import (MERGE_METHODS, ChunkContext, MethodParams, TopMagnitude,
                                     kept_deltas, needs_thresholds)
from prefvec_ds.ckpt.segments import FDS
from prefvec_ds.ckpt.sources import alias_groups, match_names, open_vector_arg
from prefvec_ds.eval.diagnostics import _read, matrix_interference


def method_params(method: str, density: float) -> MethodParams:
    """The knobs of a compared method: its density, its default normalisation, lambda 1."""
    if method == "task_arithmetic":
        return MethodParams()
    return MethodParams(density=density, normalize=MERGE_METHODS[method].normalize_default)


def _threshold(d: np.ndarray, density: float) -> int:
    top = TopMagnitude(d.size, density)
    while True:
        top.feed(d)
        if not top.end_pass():
            return top.threshold()


def kept(method: str, p: MethodParams, name: str, deltas: list[np.ndarray],
         weights: list[float]) -> list[np.ndarray]:
    """Every vector's values of one tensor as `method` uses them (the whole tensor at once, so
    its trim thresholds and drop masks are those of the merge's chunked pass)."""
    flat = [np.ascontiguousarray(d, dtype=np.float32).reshape(-1) for d in deltas]
    thresholds = (tuple(_threshold(d, p.density) for d in flat)
                  if needs_thresholds(method, p) else ())
    ctx = ChunkContext(name, 0, thresholds, tuple(range(len(flat))))
    return [k.reshape(np.shape(d)) for k, d in
            zip(kept_deltas(method, flat, weights, p, ctx), deltas)]


def _open(paths: list[str]):
    vecs = [open_vector_arg(p) for p in paths]
    first = vecs[0]
    maps = [match_names(first.names(), v, alias_groups(first, v), f"vector {first.path}",
                        "vector") for v in vecs]
    return first, vecs, maps


def method_interference(vectors: dict[str, str], weights: dict[str, float], methods: list[str],
                        density: float, sti_rank: int = 8, sti_matrices: int = 32) -> dict:
    """method -> {'cosine': {a: {b: c}}, 'sti', 'sti_chance', 'kept': {p: share}, 'density'}."""
    import torch  # noqa: PLC0415

    prefs = list(vectors)
    w = [float(weights.get(p, 1.0)) for p in prefs]
    methods = ["task_arithmetic", *[m for m in methods if m != "task_arithmetic"]]
    params = {m: method_params(m, density) for m in methods}
    n = len(prefs)
    gram = {m: np.zeros((n, n)) for m in methods}
    nonzero = {m: np.zeros(n) for m in methods}
    first, vecs, maps = _open([str(vectors[p]) for p in prefs])
    total, norms = np.zeros(n), {}
    try:
        for name in first.names():
            shape = tuple(first.shape(name))
            deltas = [_read(v, mp[name], shape) for v, mp in zip(vecs, maps)]
            total += [np.count_nonzero(d) for d in deltas]
            for m in methods:
                ks = [k.reshape(-1).astype(np.float64) for k in
                      kept(m, params[m], name, deltas, w)]
                gram[m] += np.array([[a @ b for b in ks] for a in ks])
                nonzero[m] += [np.count_nonzero(k) for k in ks]
            sq = [float(np.square(d, dtype=np.float64).sum()) for d in deltas]
            if len(shape) == 2 and all(s > 0 for s in sq):
                norms[name] = math.sqrt(sum(sq))
        chosen = sorted(norms, key=norms.get, reverse=True)[:sti_matrices]
        sti = {m: [] for m in methods}
        for name in chosen:
            shape = tuple(first.shape(name))
            deltas = [_read(v, mp[name], shape) for v, mp in zip(vecs, maps)]
            for m in methods:
                mats = [torch.from_numpy(np.ascontiguousarray(k))
                        for k in kept(m, params[m], name, deltas, w)]
                if all(float(x.abs().sum()) > 0 for x in mats):  # an emptied slice: no subspace
                    sti[m].append(matrix_interference(mats, sti_rank))
    finally:
        FDS.close()
    return {m: _summary(gram[m], nonzero[m], total, sti[m], prefs, params[m]) for m in methods}


def _summary(gram, nonzero, total, sti: list, prefs: list[str], p: MethodParams) -> dict:
    diag = np.sqrt(np.maximum(np.diag(gram), 0))
    cos = {a: {b: (float(gram[i, j] / (diag[i] * diag[j])) if diag[i] * diag[j] > 0
                   else float("nan")) for j, b in enumerate(prefs)}
           for i, a in enumerate(prefs)}
    k = len(sti)
    return {"density": p.density, "cosine": cos,
            "norms": {a: float(diag[i]) for i, a in enumerate(prefs)},
            "kept": {a: float(nonzero[i] / max(total[i], 1)) for i, a in enumerate(prefs)},
            "sti": sum(s for s, _ in sti) / k if k else float("nan"),
            "sti_chance": sum(c for _, c in sti) / k if k else float("nan"), "matrices": k}


def score_compositions(spec, base: Path, vectors: dict[str, Path], weights: dict[str, float],
                       methods: list[str], density: float, work: Path,
                       dtype: str | None = None) -> dict[str, dict]:
    """method -> scores, margins of the merge by that method at `weights`: written by the
    checkpoint merge into `work/<method>`, scored like the merged models, then removed (an
    8B merge is 16 GB; the figures stay in summary.json)."""
    from prefvec_ds.ckpt.merge import merge_vectors  # noqa: PLC0415
    from prefvec_ds.eval.sweep import score_model_dir  # noqa: PLC0415

    out = {}
    for method in methods:
        folder = work / method
        opened = [(open_vector_arg(str(vectors[p])), float(weights.get(p, 1.0)))
                  for p in vectors]
        merge_vectors(base, opened, folder, dtype=dtype, overwrite=True, method=method,
                      params=method_params(method, density))
        try:
            result = score_model_dir(folder, spec)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        result.pop("answers", None)
        out[method] = {"scores": result["scores"], "margins": result["margins"]}
        print(f"[sweep] composition {method}: " + " ".join(
            f"{k}={v:.3f}" for k, v in result["scores"].items()
            if not k.startswith("n_") and v is not None), flush=True)
    if work.is_dir() and not any(work.iterdir()):
        work.rmdir()
    return out
