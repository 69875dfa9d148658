"""SFT and DPO under the real deepspeed launcher: 2 ranks, ZeRO-3, CPU/gloo."""

from __future__ import annotations

import json
import math


from tests.distributed.conftest import metrics, prefvec, write_config


def test_sft_loss_falls_and_exports_a_loadable_base(sft_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run = sft_run
    losses = [r["train/loss"] for r in metrics(run / "sft") if "train/loss" in r]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0]
    done = json.loads((run / "sft" / "done.json").read_text())
    assert len(done["peak_rss_mb_per_rank"]) == 2
    model = AutoModelForCausalLM.from_pretrained(run / "sft" / "model")
    tok = AutoTokenizer.from_pretrained(run / "sft" / "model")
    ids = tok.apply_chat_template([{"role": "user", "content": "what is 2 plus 3 ?"}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert (run / "sft" / "config.yaml").is_file() and (run / "sft" / "ds_config.json").is_file()


def test_plus_and_minus_move_the_held_out_margin_in_opposite_directions(sft_run, tmp_path):
    config, run = sft_run
    results = {}
    for direction in ("harmless+", "harmless-"):
        prefvec("train", "dpo", str(config), "--direction", direction)
        folder = run / "dpo" / direction
        results[direction] = json.loads((folder / "eval.json").read_text())
        losses = [r["train/loss"] for r in metrics(folder) if "train/loss" in r]
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
        assert any((folder / "ckpt").glob("global_step*/zero_pp_rank_1_mp_rank_00_optim_states.pt"))
        if direction == "harmless+":
            ref_mtime = (run / "ref_logps" / "harmless.pt").stat().st_mtime_ns
    # the - run reused the table the + run computed (no second reference pass)
    assert (run / "ref_logps" / "harmless.pt").stat().st_mtime_ns == ref_mtime
    # in the + frame (sign * own margin): + raises the held-out margin, - lowers it
    plus, minus = results["harmless+"], results["harmless-"]
    assert abs(plus["eval_start"]["eval/rewards/margins"]) < 1e-3  # policy == reference at step 0
    assert plus["eval_end"]["eval/rewards/margins"] > 0.5
    assert -minus["eval_end"]["eval/rewards/margins"] < -0.5
    assert plus["eval_end"]["eval/rewards/accuracies"] > 0.8
    assert minus["eval_end"]["eval/rewards/accuracies"] > 0.8


def test_dpo_bad_inputs_fail_cleanly_before_writing(sft_run, tmp_path):
    config, run = sft_run
    proc = prefvec("train", "dpo", str(config), "--direction", "sideways+", check=False)
    assert proc.returncode == 2 and "unknown direction 'sideways+'" in proc.stderr
    proc = prefvec("train", "dpo", str(config), "--direction", "helpful+", "dpo.loss_type=kto",
                   check=False)
    assert proc.returncode == 2 and "dpo.loss_type" in proc.stderr
    proc = prefvec("train", "dpo", str(config), "--direction", "helpful+",
                   f"model.base={tmp_path / 'no-such-model'}", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = prefvec("train", "sft", str(config), "model.path=/nonexistent/model", check=False)
    assert proc.returncode == 2 and "model.path" in proc.stderr
    assert not (run / "dpo" / "sideways+").exists()


def test_missing_columns_fail_with_file_and_row(sft_run, tmp_path):
    config, run = sft_run
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a"}\n')
    cfg = write_config(tmp_path / "bad.yaml", tmp_path / "badrun", {
        "model": {"base": str(run / "sft" / "model")},
        "data": {"preferences": {"custom": {"source": "jsonl", "path": str(bad)}}}})
    proc = prefvec("train", "dpo", str(cfg), "--direction", "custom+", check=False)
    # the real 1-based line, found in the driver before any rank starts: one line, exit 2
    assert proc.returncode == 2
    assert "bad.jsonl:1: missing column(s) rejected" in proc.stdout + proc.stderr
    assert not (tmp_path / "badrun" / "dpo").exists()
    assert not (tmp_path / "badrun" / "ref_logps").exists()
