"""The bf16 merge measurement (benchmarks/bf16_merge.py) and the merge dtype the pipeline uses
because of it (review finding R9)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from prefvec_ds import PrefvecError
from prefvec_ds.config.loader import load_config
from prefvec_ds.pipeline.arithmetic import merge_call
from prefvec_ds.pipeline.dag import build_dag
from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("bf16_merge", REPO / "benchmarks" / "bf16_merge.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_half_spacing_of_bf16_at_typical_weights():
    w = torch.tensor([1.0, 0.02, -0.02, 0.5])
    # bf16 keeps 8 significant bits: spacing 2^-7 at 1, 2^-13 = 1.22e-4 at 0.02 (the review's)
    assert bench.half_spacing_bf16(w).tolist() == [2 ** -8, 2 ** -14, 2 ** -14, 2 ** -9]


def test_survival_of_changes_below_and_above_the_bf16_spacing():
    base = {"w": torch.full((1000,), 0.02).to(torch.bfloat16).float()}
    small = {"w": torch.full((1000,), 0.3 * 2 ** -13)}  # under half a bf16 step: rounded away
    res = bench.survival(base, small, eta=1.0, scale=1.0)
    assert res["bf16"]["kept"] == 0.0 and res["bf16"]["lost"] == 1.0
    assert res["fp32"]["kept"] == pytest.approx(1.0, rel=1e-3)
    assert res["fp32"]["rel_err"] < 1e-3
    exact = {"w": torch.full((1000,), 2 * 2 ** -13)}  # two bf16 steps: kept exactly
    res = bench.survival(base, exact, eta=-1.0, scale=1.0)
    assert res["bf16"]["kept"] == pytest.approx(1.0) and res["bf16"]["lost"] == 0.0


def test_pipeline_merges_write_fp32_by_default(tmp_path):
    cfg = load_config(REPO / "recipes" / "quickstart.yaml", [f"run_dir={tmp_path}"])
    merge = next(s for s in build_dag(cfg) if s.kind == "merge")
    assert merge_call(cfg, merge).dtype == "fp32"
    base = load_config(REPO / "recipes" / "quickstart.yaml",
                       [f"run_dir={tmp_path}", "pipeline.merge_dtype=base"])
    assert merge_call(base, merge).dtype is None
    with pytest.raises(PrefvecError, match="pipeline.merge_dtype"):
        load_config(REPO / "recipes" / "quickstart.yaml", ["pipeline.merge_dtype=int8"])


def test_a_merge_stage_passes_the_eta_its_fingerprint_records(tmp_path):
    """The merge stage calls merge_vectors with the configured floats: formatting them into
    an argv with `:g` once wrote eta 0.6666667 as 0.666667."""
    cfg = load_config(REPO / "recipes" / "quickstart.yaml",
                      [f"run_dir={tmp_path}", "pipeline.merges=[{name: third, eta: {helpful: "
                       "0.6666667, harmless: -0.123456789}}]"])
    merge = next(s for s in build_dag(cfg) if s.kind == "merge")
    etas = {path.name: eta for path, eta in merge_call(cfg, merge).vectors}
    assert etas == {"helpful": 0.6666667, "harmless": -0.123456789}
    assert json.loads(merge.config_slice)["eta"] == etas  # what the fingerprint records


def test_a_pipeline_merge_names_its_method_and_the_fingerprint_follows(tmp_path):
    """pipeline.merges[].method reaches merge_vectors; plain task arithmetic keeps the
    fingerprint runs had before methods existed; a bad knob is one clear error."""
    from prefvec_ds.ckpt.methods import MethodParams

    def merge_stage(*extra):
        cfg = load_config(REPO / "recipes" / "quickstart.yaml", [f"run_dir={tmp_path}", *extra])
        return cfg, next(s for s in build_dag(cfg) if s.kind == "merge")

    cfg, plain = merge_stage()
    assert merge_call(cfg, plain).method == "task_arithmetic"
    assert "method" not in json.loads(plain.config_slice)
    cfg, ties = merge_stage("pipeline.merges=[{name: default, method: ties, density: 0.2}]")
    call = merge_call(cfg, ties)
    assert (call.method, call.params) == ("ties", MethodParams(density=0.2, normalize=True))
    assert ties.config_fingerprint() != plain.config_fingerprint()
    with pytest.raises(PrefvecError, match=r"pipeline.merges\[default\]: density"):
        merge_stage("pipeline.merges=[{name: default, method: ties, density: 0}]")
    with pytest.raises(PrefvecError, match="pipeline.merges"):
        merge_stage("pipeline.merges=[{name: default, method: slerp}]")
