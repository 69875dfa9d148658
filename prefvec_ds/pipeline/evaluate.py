"""The pipeline's eval stage (a placeholder for the full evaluation): rule scores of greedy
answers on held-out prompts, for theta_base and every merged model.

Only the embedded data has a rule scorer (prefvec_ds.data.embedded.score: helpful, harmless,
over_refusal, verbosity); for other sources the summary says so and the stage still succeeds.
Swap `score_models` for the full evaluation without touching the DAG:
`<run_dir>/eval/summary.json` is the stage's only contract.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefvec_ds.config.schema import RunConfig
from prefvec_ds.data import embedded
from prefvec_ds.data.pairs import Messages, is_held_out
from prefvec_ds.data.sources import load_preference
from prefvec_ds.pipeline.dag import Stage, merge_etas
from prefvec_ds.atomic import write_json_atomic
from prefvec_ds.train.stage import base_model_dir

AXES = ("helpful", "harmless", "over_refusal", "verbosity")
BATCH = 32


def held_out_prompts(cfg: RunConfig) -> list[Messages]:
    """Distinct prompts of the held-out pairs of every preference, in data order."""
    seen, out = set(), []
    for name, pref in cfg.data.preferences.items():
        for pair in load_preference(name, pref, cfg.data):
            if is_held_out(pair.key(), pref.eval_fraction) and pair.prompt not in seen:
                seen.add(pair.prompt)
                out.append(pair.prompt)
    return out[:cfg.pipeline.eval_prompts]


def generate(model_dir: Path, prompts: list[Messages], max_new_tokens: int) -> list[str]:
    """Greedy answers, batched with left padding."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    from prefvec_ds.data.tokenize import render_prompt  # noqa: PLC0415
    from prefvec_ds.train.stage import load_tokenizer  # noqa: PLC0415

    tok = load_tokenizer(model_dir)
    tok.padding_side = "left"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    answers = []
    for i in range(0, len(prompts), BATCH):
        texts = [render_prompt(tok, p) for p in prompts[i:i + BATCH]]
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        answers += tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def rule_scores(prompts: list[Messages], answers: list[str]) -> dict[str, float | int]:
    """Mean of each embedded axis over the prompts it applies to (and how many those are)."""
    sums = {a: 0.0 for a in AXES}
    counts = {a: 0 for a in AXES}
    for prompt, answer in zip(prompts, answers):
        for axis, value in embedded.score(prompt[-1][1], answer).items():
            if value is not None:
                sums[axis] += value
                counts[axis] += 1
    out: dict[str, float | int] = {a: sums[a] / counts[a] if counts[a] else None for a in AXES}
    out.update({f"n_{a}": counts[a] for a in AXES if a != "verbosity"})
    return out


def score_models(cfg: RunConfig, models: dict[str, Path]) -> dict:
    """name -> scores (and a few sample answers), for every model."""
    if any(p.source != "embedded" for p in cfg.data.preferences.values()):
        return {"scorer": None, "note": "no rule scorer for non-embedded data; the full "
                "evaluation (reward/cost models) is a separate stage"}
    prompts = held_out_prompts(cfg)
    results = {}
    for name, folder in models.items():
        answers = generate(folder, prompts, cfg.pipeline.eval_max_new_tokens)
        results[name] = {**rule_scores(prompts, answers),
                         "samples": [{"prompt": p[-1][1], "answer": a}
                                     for p, a in list(zip(prompts, answers))[:3]]}
    return {"scorer": "embedded-rules", "prompts": len(prompts), "models": results}


def run_eval(cfg: RunConfig, stages: list[Stage]) -> dict:
    """Score theta_base and each merged model; write <run_dir>/eval/summary.json."""
    t0 = time.time()
    run = Path(cfg.run_dir)
    models = {"base": base_model_dir(cfg)}
    # a merge stage that was skipped (ckpt tools absent) leaves no folder to score
    models.update({s.key: run / "merged" / s.key for s in stages
                   if s.kind == "merge" and (run / s.done_file).is_file()})
    summary = {**score_models(cfg, models), "eta": merge_etas(cfg),
               "seconds": round(time.time() - t0, 2)}
    write_json_atomic(run / "eval" / "summary.json", summary)
    for name, scores in summary.get("models", {}).items():
        print(f"eval {name}: " + " ".join(f"{a}={scores[a]:.3f}" for a in AXES
                                         if scores[a] is not None), flush=True)
    return summary
