"""The sweep on the embedded tiny Llama without training: margins, in-place points, the eta = 0
check, the summary contract and the report's PNGs (a few seconds of CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from prefvec_ds.ckpt import apply_vectors, remove_vectors
from prefvec_ds.config.loader import load_config
from prefvec_ds.eval.margins import held_out_pairs, pair_margins
from prefvec_ds.eval.runner import evaluate_run
from prefvec_ds.models.embedded import materialize_embedded_model
from prefvec_ds.train.stage import load_tokenizer
from tests.conftest import REPO

pytestmark = pytest.mark.unit
RECIPE = REPO / "recipes" / "quickstart.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


def small_cfg(run_dir, *extra):
    return load_config(RECIPE, [
        f"run_dir={run_dir}", "data.embedded_size=200", "pipeline.eval.prompts=6",
        "pipeline.eval.margin_pairs=8", "pipeline.eval.etas=[-1, 0, 1]",
        "pipeline.eval.generation={max_new_tokens: 6, do_sample: true, num_samples: 2}",
        *extra])


def save_vector(tmp_path, name: str, tensors: dict) -> str:
    from safetensors.torch import save_file

    folder = tmp_path / name
    folder.mkdir(parents=True)
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()},
              str(folder / "model.safetensors"))
    (folder / "prefvec_vector.json").write_text(json.dumps(
        {"format": "prefvec-vector", "version": 1, "dtype": "fp32", "aliases": {}}))
    return str(folder)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """theta_base = the embedded tiny Llama's init; vectors: the gradient of the held-out
    margins of each preference (so +eta must raise that preference's margin)."""
    from transformers import AutoModelForCausalLM

    run = tmp_path_factory.mktemp("eval") / "run"
    base = materialize_embedded_model("tiny-llama", run / "sft" / "model", seed=0)
    cfg = small_cfg(run)
    tok = load_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for s in held_out_pairs(cfg, tok, 8):
        model.zero_grad()
        margins = pair_margins_grad(model, s.pairs, tok.pad_token_id)
        margins.sum().backward()
        grads = {n: p.grad / p.grad.norm() * 0.5 for n, p in model.named_parameters()}
        save_vector(run / "vectors", s.preference, grads)
    return run


def pair_margins_grad(model, pairs, pad_id):
    from prefvec_ds.data.tokenize import collate_pairs
    from prefvec_ds.train.logps import sequence_logps, split_pair_logps

    batch = collate_pairs(pairs, pad_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    chosen, rejected = split_pair_logps(sequence_logps(logits, batch["labels"])[0])
    return chosen - rejected


def test_margins_are_chosen_minus_rejected_and_move_along_their_vector(tiny_run):
    from prefvec_ds.data.tokenize import TokenizedPair
    from prefvec_ds.eval.generate import load_policy

    cfg = small_cfg(tiny_run)
    model, tok = load_policy(tiny_run / "sft" / "model")
    sets = {s.preference: s.pairs for s in held_out_pairs(cfg, tok, 8)}
    assert set(sets) == {"helpful", "harmless"} and len(sets["helpful"]) == 8
    pairs = sets["helpful"]
    m = pair_margins(model, pairs, tok.pad_token_id, batch_size=3)
    with torch.no_grad():
        direct = pair_margins_grad(model, pairs, tok.pad_token_id)
    assert m == pytest.approx(direct.tolist(), abs=1e-4)
    swapped = [TokenizedPair(p.prompt_ids, p.rejected_ids, p.chosen_ids, p.key) for p in pairs]
    assert pair_margins(model, swapped, tok.pad_token_id) == pytest.approx([-x for x in m],
                                                                           abs=1e-4)
    vec = {tiny_run / "vectors" / "helpful": 0.5}
    apply_vectors(model, vec)
    up = sum(pair_margins(model, pairs, tok.pad_token_id))
    remove_vectors(model, vec)
    assert up > sum(m)


def test_sweep_summary_report_and_the_eta0_check(tiny_run):
    cfg = small_cfg(tiny_run)
    summary = evaluate_run(cfg)
    out = tiny_run / "eval"
    assert json.loads((out / "summary.json").read_text())["report"] == summary["report"]
    assert summary["points"] == 9 and summary["prompts"] == 6
    assert set(summary["models"]) == {"base"} and "helpful" in summary["models"]["base"]
    drift = summary["drift"]
    assert drift["cycles"] == 8 and drift["zero_point_same_answers"] == 6
    assert drift["max_abs_param_diff"] < 1e-5
    sweep = json.loads((out / "sweep.json").read_text())
    zero = sweep["points"][0]
    assert zero["eta"] == {"helpful": 0.0, "harmless": 0.0}
    assert zero["scores"] == sweep["base"]["scores"]
    for pref, m in zero["margins"].items():  # fp32 rounding of 8 apply/remove cycles only
        assert m["margin"] == pytest.approx(sweep["base"]["margins"][pref]["margin"], rel=1e-5)
    # the margin of a preference rises along its own vector (the gradient of that margin)
    for pref in ("helpful", "harmless"):
        t = summary["trends"][pref][f"margin_{pref}"]
        assert t["etas"] == [-1.0, 0.0, 1.0] and t["trend"] == "rises", t
    lines = (out / "answers.jsonl").read_text().splitlines()
    assert len(lines) == 10 * 6 and len(json.loads(lines[0])["answers"]) == 2
    report = (out / "report.md").read_text()
    for section in ("## Trends along each eta", "## eta = 0 reproduces theta_base",
                    "## Vector diagnostics", "## Every point", "Subspace Task Interference"):
        assert section in report, section
    for png in ("lines.png", "heatmap_helpful_harmless.png"):
        assert f"]({png})" in report
        assert (out / png).read_bytes()[:8] == PNG
    assert summary["diagnostics"]["cosine"]["helpful"]["helpful"] == pytest.approx(1.0)


def test_eval_command_scores_one_model_with_a_vector(tiny_run, capsys):
    from prefvec_ds.cli import main

    rc = main(["eval", str(RECIPE), f"run_dir={tiny_run}", "data.embedded_size=200",
               "pipeline.eval.prompts=3", "pipeline.eval.margin_pairs=4",
               "pipeline.eval.generation={max_new_tokens: 4}", "--vector", "helpful=1"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompts"] == 3 and set(result["margins"]) == {"helpful", "harmless"}
    assert list(result["vectors"].values()) == [1.0]
    assert main(["eval", str(RECIPE), f"run_dir={tiny_run}", "--vector", "helpful=x"]) == 2
