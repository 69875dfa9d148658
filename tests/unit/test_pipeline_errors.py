"""`prefvec run|status` and the config/data readers on bad input (issue 14): one line, exit 2,
and nothing written by a dry run; status reports the folder it is given."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from prefvec_ds import PrefvecError
from prefvec_ds.cli import main
from prefvec_ds.pipeline import manifest
from prefvec_ds.pipeline.prepare import prepare, snapshot_path
from tests.conftest import REPO

pytestmark = pytest.mark.unit
RECIPE = REPO / "recipes" / "quickstart.yaml"
NO_SEEDS = "pipeline.eval.diagnostic_seeds=[]"


def finished_run(run_dir):
    """A run folder whose every stage says done (manifests + done files), as `prefvec run`
    leaves it."""
    cfg, stages = prepare(RECIPE, [f"run_dir={run_dir}", NO_SEEDS])
    for stage in stages:
        manifest.begin(run_dir, stage, manifest.input_fingerprint(run_dir, stage))
        done = run_dir / stage.done_file
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text("{}")
        manifest.finish(run_dir, stage, "done", 0)
        time.sleep(0.001)
    return stages


def states(capsys, run_dir) -> dict[str, str]:
    capsys.readouterr()
    assert main(["status", str(run_dir), "--json"]) == 0
    return {r["stage"]: r["state"] for r in json.loads(capsys.readouterr().out)}


def test_dry_run_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    stages = finished_run(run)
    snap = snapshot_path(run)
    before = (snap.read_bytes(), snap.stat().st_mtime_ns)
    assert main(["run", str(RECIPE), f"run_dir={run}", NO_SEEDS, "--dry-run",
                 "dpo.beta=0.05"]) == 0
    out = capsys.readouterr().out
    assert "dpo/helpful+" in out and "inputs changed" in out  # the plan is still shown
    assert (snap.read_bytes(), snap.stat().st_mtime_ns) == before
    assert set(states(capsys, run).values()) == {"done"} and len(stages) > 5
    fresh = tmp_path / "fresh"
    assert main(["run", str(RECIPE), f"run_dir={fresh}", NO_SEEDS, "--dry-run"]) == 0
    assert not fresh.exists()


def test_status_reports_the_folder_it_is_given(tmp_path, capsys):
    run = tmp_path / "run"
    finished_run(run)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "dpo" / "helpful+" / "done.json").unlink()  # the copy lost an output
    copied = states(capsys, copy)
    assert copied["dpo/helpful+"] == "stale" and copied["sft"] == "done"
    assert set(states(capsys, run).values()) == {"done"}  # the original is intact
    moved = tmp_path / "moved"
    run.rename(moved)
    assert set(states(capsys, moved).values()) == {"done"}  # not "not started"


@pytest.mark.parametrize("content,expect", [(b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not a readable"),
                                            (b"[1, 2]", "expected a JSON object, found a list"),
                                            (b'{"stage": "sft", "status": "do', "not a readable")])
def test_bad_manifests_are_named(tmp_path, capsys, content, expect):
    run = tmp_path / "run"
    finished_run(run)
    path = manifest.manifest_path(run, "sft")
    path.write_bytes(content)
    assert main(["status", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"manifest {path}" in err and expect in err and err.count("\n") == 1


def test_config_that_is_a_list_or_binary(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    for content, expect in ((b"- a\n- b\n", "expected a mapping of sections (run_dir:"),
                            (b"\xff\xfe\x00binary", "cannot be read as YAML")):
        cfg.write_bytes(content)
        assert main(["run", str(cfg), "dpo.beta=0.1", "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert f"config file {cfg}" in err and expect in err and err.count("\n") == 1


def test_run_dir_that_is_a_file_and_merge_named_dot(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for overrides, expect in (
            ([f"run_dir={tmp_path / 'afile'}"], "run_dir: " + str(tmp_path / "afile") + " is a file"),
            ([f"run_dir={tmp_path / 'afile' / 'sub'}"], "is a file, expected a folder"),
            ([f"run_dir={tmp_path / 'r'}", "pipeline.merges=[{name: '..', eta: {helpful: 1}}]"],
             "pipeline.merges[].name")):
        assert main(["run", str(RECIPE), NO_SEEDS, *overrides]) == 2
        err = capsys.readouterr().err
        assert expect in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_train_validates_data_in_the_driver_before_any_launch(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    args = ["train", "dpo", str(RECIPE), f"run_dir={tmp_path / 'run'}", f"model.base={base}",
            f"data.preferences.helpful={{source: jsonl, path: {data}}}",
            "--direction", "helpful+", "--launcher", "deepspeed"]
    started = time.time()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{data}:1: missing column(s) rejected" in err
    assert time.time() - started < 30 and not (tmp_path / "run" / "dpo").exists()
    data.write_text("")
    assert main(args) == 2
    assert "no pairs" in capsys.readouterr().err


def test_load_config_rejects_a_list_with_overrides(tmp_path):
    from prefvec_ds.config.loader import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("[1, 2]\n")
    with pytest.raises(PrefvecError, match="found a list"):
        load_config(cfg, ["dpo.beta=0.1"])


def test_run_reads_the_data_before_launching_anything(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n\n"
                    + json.dumps({"prompt": "q", "rejected": "b"}) + "\n")
    run = tmp_path / "run"
    assert main(["run", str(RECIPE), f"run_dir={run}", NO_SEEDS,
                 f"data.preferences.helpful={{source: jsonl, path: {data}}}"]) == 2
    err = capsys.readouterr().err
    assert f"{data}:3: missing column(s) chosen" in err and err.count("\n") == 1
    assert not run.exists()


def test_train_rm_and_convert_refuse_a_foreign_out_before_any_work(tmp_path, capsys):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "notes.txt").write_text("mine")
    started = time.time()
    recipe = REPO / "recipes" / "scorers" / "rm-minilm.yaml"
    assert main(["train", "rm", str(recipe), f"out_dir={thesis}", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"out_dir {thesis}" in err and "not written by prefvec" in err
    assert time.time() - started < 20
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert main(["convert-gguf", "--gguf", str(gguf), "--out", str(tmp_path), "--overwrite"]) == 2
    assert "contains the input --gguf" in capsys.readouterr().err
    assert main(["convert-gguf", "--gguf", str(gguf), "--out", str(thesis), "--overwrite"]) == 2
    assert "not written by prefvec" in capsys.readouterr().err
    assert (thesis / "notes.txt").read_text() == "mine" and gguf.exists()


def test_train_finds_an_overlong_prompt_in_the_driver(tmp_path, capsys):
    from prefvec_ds.models.embedded import materialize_embedded_model

    base = materialize_embedded_model("tiny-llama", tmp_path / "base", 0)
    capsys.readouterr()  # its progress bar
    data = tmp_path / "pairs.jsonl"
    short = {"prompt": "what is 1 plus 2 ?", "chosen": "it is 3 .", "rejected": "it is 4 ."}
    long = {**short, "prompt": "what is 1 plus 2 ? " * 40}
    data.write_text(json.dumps(short) + "\n" + json.dumps(long) + "\n")
    started = time.time()
    assert main(["train", "dpo", str(RECIPE), f"run_dir={tmp_path / 'run'}", f"model.base={base}",
                 f"data.preferences.helpful={{source: jsonl, path: {data}}}", "data.max_len=64",
                 "--direction", "helpful-", "--launcher", "deepspeed"]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: prompt has" in err and "data.max_len=64" in err and err.count("\n") == 1
    assert time.time() - started < 60 and not (tmp_path / "run" / "dpo").exists()
