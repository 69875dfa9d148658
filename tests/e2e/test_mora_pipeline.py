"""`prefvec run` of the MORA recipe, shrunk: sft -> mora -> ref_logps -> dpo +/- -> vectors ->
merge -> eval, where the DPO data is the embedded helpful set with the MORA pairs mixed in.

The SFT stage is the one of the shrunken quickstart (`local_run`, shared with the other e2e and
slurm tests): its folder and manifest are copied in, and the copy is up to date because the
SFT settings are the same (the plain embedded SFT data: this checks the plumbing, the
figures come from recipes/quickstart-mora.yaml itself). Should they ever differ, the pipeline
simply redoes SFT here."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline_fixtures import (REPO, SMALL, local_run, prefvec,  # noqa: E402,F401
                               read_manifests)

RECIPE = REPO / "recipes" / "quickstart-mora.yaml"
# the quickstart's shrunken SFT, one preference (helpful + MORA pairs), 4 DPO steps,
# 32 pool prompts at N = K = 8
MORA_SMALL = [*SMALL, "data.sft_source=embedded", "dpo.max_steps=4", "dpo.log_every=2",
              "pipeline.eval.prompts=8", "pipeline.eval.etas=[0, 1]",
              "pipeline.eval.margin_pairs=8", "pipeline.mora.pass_n=8",
              "pipeline.mora.selfplay_k=8", "pipeline.mora.pool.max_prompts=32",
              "pipeline.mora.max_new_tokens=24",
              "data.preferences={helpful: {source: mora, "
              "path: '{run_dir}/mora/mixed/helpful.jsonl'}}",
              "pipeline.mora.mix_into={helpful: [{source: embedded, "
              "order_by: better_response_id}]}"]
STAGES = {"sft", "mora", "ref_logps/helpful", "dpo/helpful+", "dpo/helpful-", "vectors/helpful",
          "merge/default", "eval"}


@pytest.fixture(scope="module")
def mora_run(tmp_path_factory, local_run) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("mora-pipeline") / "run"
    for rel in ("sft", "init_model", "pipeline/manifests/sft.json"):
        src, dst = local_run / rel, run_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    proc = prefvec("run", str(RECIPE), f"run_dir={run_dir}", *MORA_SMALL, timeout=1500)
    return run_dir, proc.stdout


def test_mora_stage_feeds_the_dpo_trainers(mora_run):
    run, stdout = mora_run
    manifests = read_manifests(run)
    assert set(manifests) == STAGES and all(m["status"] == "done" for m in manifests.values())
    assert manifests["mora"]["started_at"] >= manifests["sft"]["finished_at"]
    assert manifests["ref_logps/helpful"]["started_at"] >= manifests["mora"]["finished_at"]
    out = run / "mora"
    records = (out / "records.jsonl").read_text().splitlines()
    pairs = (out / "pairs.jsonl").read_text().splitlines()
    mixed = (out / "mixed" / "helpful.jsonl").read_text().splitlines()
    assert len(records) == 32 and len(mixed) == 400 + len(pairs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompts"] == 32 and summary["pairs"] == len(pairs)
    assert set(summary["ceiling"]["all"]) == {"1", "2", "4", "8"}
    # the snapshot holds the pairs' real path; the DPO runs trained on the mixed set
    snapshot = (run / "pipeline" / "config.yaml").read_text()
    assert f"{run.resolve()}/mora/mixed/helpful.jsonl" in snapshot
    assert (run / "dpo" / "helpful+" / "done.json").is_file()
    assert (run / "eval" / "summary.json").is_file()
    assert re.search(r"^mora\s+done\s+\d+\.\ds", stdout, re.M), stdout


def test_rerun_does_nothing(mora_run):
    run, _ = mora_run
    proc = prefvec("run", str(RECIPE), f"run_dir={run}", *MORA_SMALL)
    assert "every stage is up to date" in proc.stdout
    assert re.search(r"^mora\s+up-to-date", proc.stdout, re.M)
