"""Interference by merge method on hand-computable vectors: what ties keeps (trim, sign
election) agrees with the merge kernel, and the cosines, kept shares and STI of the vectors
as each method uses them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prefvec_ds.ckpt.methods import ChunkContext, MethodParams, kept_deltas, mix_chunk
from prefvec_ds.eval.interference import _threshold, kept, method_interference, method_params
from prefvec_ds.eval.report import _interference_section

pytestmark = pytest.mark.unit


def write_vector(folder, tensors: dict) -> str:
    """A saved vector folder (as tests/unit/test_eval_diagnostics.py writes them)."""
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({k: v.float().contiguous() for k, v in tensors.items()},
              str(folder / "model.safetensors"))
    (folder / "prefvec_vector.json").write_text(json.dumps(
        {"format": "prefvec-vector", "version": 1, "dtype": "fp32", "aliases": {}}))
    return str(folder)


def test_ties_keeps_the_top_magnitudes_that_win_the_sign_election():
    d1 = np.array([3, -1, 2, -4], np.float32)
    d2 = np.array([-5, 2, 1, 1], np.float32)
    p = MethodParams(density=0.5)
    # trim: d1 -> [3, 0, 0, -4], d2 -> [-5, 2, 0, 0]; sum [-2, 2, 0, -4] elects [-, +, +, -]
    got = kept("ties", p, "w", [d1, d2], [1.0, 1.0])
    assert got[0].tolist() == [0, 0, 0, -4] and got[1].tolist() == [-5, 2, 0, 0]
    out = np.zeros(4, np.float32)
    thresholds = tuple(_threshold(d, 0.5) for d in (d1, d2))
    mix_chunk("ties", out, [d1, d2], [1.0, 1.0], p, ChunkContext("w", 0, thresholds))
    assert out.tolist() == [-5, 2, 0, -4]  # = sum of what each vector keeps


@pytest.mark.parametrize("method", ["task_arithmetic", "dare", "dare_ties"])
def test_kept_deltas_sum_to_the_merge_kernel(method):
    rng = np.random.default_rng(0)
    ds = [rng.standard_normal(1000).astype(np.float32) for _ in range(3)]
    w = [0.5, -1.0, 1.0]
    p = MethodParams(density=0.3, seed=7)
    ctx = ChunkContext("layer.w", 4096, (), (0, 1, 2))
    out = np.zeros(1000, np.float32)
    mix_chunk(method, out, ds, w, p, ctx)
    ks = kept_deltas(method, ds, w, p, ctx)
    assert np.allclose(out, sum(np.float32(x) * k for x, k in zip(w, ks)), atol=1e-5)


def test_method_interference_from_folders(tmp_path):
    a = torch.tensor([[4.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[-4.0, 0.0], [0.0, 1.0]])
    vecs = {"helpful": write_vector(tmp_path / "a", {"w": a}),
            "harmless": write_vector(tmp_path / "b", {"w": b})}
    got = method_interference(vecs, {"helpful": 1.0, "harmless": 1.0}, ["ties"], 0.5,
                              sti_rank=1, sti_matrices=4)
    plain, ties = got["task_arithmetic"], got["ties"]
    assert plain["cosine"]["helpful"]["harmless"] == pytest.approx(-15 / 17)
    assert plain["kept"] == {"helpful": 1.0, "harmless": 1.0}
    assert plain["sti"] == pytest.approx(1.0)  # both lead with the first row
    # ties: the tie at element 0 (4 - 4 = 0) elects +, so b loses it: a [4,0,0,1], b [0,0,0,1]
    assert ties["cosine"]["helpful"]["harmless"] == pytest.approx(1 / 17 ** 0.5)
    assert ties["kept"] == {"helpful": 1.0, "harmless": 0.5}  # of their nonzero elements
    assert ties["sti"] == pytest.approx(0.0, abs=1e-12) and ties["density"] == 0.5
    assert method_params("ties", 0.5).normalize and not method_params("dare", 0.5).normalize
    lines = "\n".join(_interference_section({"etas": {"helpful": 1.0, "harmless": 1.0},
                                             "methods": got}))
    assert "| ties | 0.500 | 0.243 | 0.000 | 1.000 | 0.500 |" in lines
