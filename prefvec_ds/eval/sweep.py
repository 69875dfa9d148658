"""The eta sweep: one fp32 theta_base in memory, vectors applied and removed in place per point.

For every point of the grid (prefvec_ds.eval.grid) the sweep applies sum_p eta_p * phi_p
(prefvec_ds.ckpt.apply_vectors), answers the prompts, scores the answers with every scorer,
measures the held-out log-prob margins, and removes the vectors again, so no model is written
per point. theta_base is scored first on the fresh load; the all-zero point is scored last,
after every apply/remove cycle, and compared with it (same answers, parameter drift against the
files on disk), which is how "eta = 0 reproduces the base" is checked. Merged model folders
(`prefvec merge` outputs) are scored as they are, for comparison with the in-place points.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from prefvec_ds.atomic import temporary_beside
from prefvec_ds.data.pairs import Messages
from prefvec_ds.eval import margins as margin_mod
from prefvec_ds.eval.generate import (GenerationSpec, free_accelerator_memory, generate,
                                      generate_vllm, load_policy, use_vllm)
from prefvec_ds.eval.grid import Point, label
from prefvec_ds.eval.scorers import Scorer, mean_scores, score_all


@dataclass
class SweepSpec:
    """Everything one sweep needs besides the model."""

    base_dir: Path
    """theta_base (HF folder); loaded once, in fp32."""
    vectors: dict[str, Path]
    """Preference -> vector folder (or `PLUS,MINUS` checkpoints)."""
    points: list[Point]
    """Eta points, the all-zero point first (grid.sweep_points)."""
    prompts: list[Messages]
    """Prompts answered at every point."""
    generation: GenerationSpec
    """Decoding."""
    scorers: list[Scorer]
    """Scorers of the answers (their axes become the table's columns)."""
    margin_sets: list = field(default_factory=list)
    """margins.MarginSet per preference (tokenized held-out pairs)."""
    models: dict[str, Path] = field(default_factory=dict)
    """Merged model folders scored as they are (name -> folder)."""
    samples_kept: int = 3
    """Answers kept per point in the summary (all go to the answers file)."""
    prompt_sets: list[str] = field(default_factory=list)
    """The named set of each prompt (pipeline.eval.prompt_sets); empty: one unnamed set."""
    set_axes: dict[str, list[str]] = field(default_factory=dict)
    """Set -> the axes reported for it (empty list: all)."""


def _score(spec: SweepSpec, answers: list[list[str]]) -> dict:
    prompts = [p for p, samples in zip(spec.prompts, answers) for _ in samples]
    flat = [a for samples in answers for a in samples]
    sets = [s for s, samples in zip(spec.prompt_sets, answers) for _ in samples]
    return mean_scores(score_all(spec.scorers, prompts, flat, sets, spec.set_axes))


def evaluate_loaded(model, tok, spec: SweepSpec, answers: list[list[str]] | None = None
                    ) -> dict:
    """Scores, margins, timing and answers of the model as it is now (answers: reuse)."""
    t0 = time.time()
    if answers is None:
        answers = generate(model, tok, spec.prompts, spec.generation)
    margins = margin_mod.measure(model, spec.margin_sets, tok.pad_token_id,
                                 spec.generation.batch_size)
    return {"scores": _score(spec, answers), "margins": margins,
            "seconds": round(time.time() - t0, 2), "answers": answers}


def _record(result: dict, spec: SweepSpec, name: str, eta: Point | None, log) -> dict:
    """Write the answers to the log, keep a few in the summary row."""
    answers = result.pop("answers")
    sets = spec.prompt_sets or [None] * len(spec.prompts)
    for prompt, samples, prompt_set in zip(spec.prompts, answers, sets):
        row = {"point": name, "prompt": prompt[-1][1], "answers": samples}
        log.write(json.dumps({**row, **({"set": prompt_set} if prompt_set else {})}) + "\n")
    result["samples"] = kept_samples(spec, answers)
    row = {"name": name, **({"eta": eta} if eta is not None else {}), **result}
    shown = " ".join(f"{k}={v:.3f}" for k, v in result["scores"].items()
                     if not k.startswith("n_") and v is not None)
    shown += "".join(f" margin_{p}={m['margin']:.3f}" for p, m in result["margins"].items())
    print(f"[sweep] {name}: {shown} ({result['seconds']} s)", flush=True)
    return row


def kept_samples(spec: SweepSpec, answers: list[list[str]]) -> list[dict]:
    """The first samples_kept answers (of each prompt set, when there are sets)."""
    if not spec.prompt_sets:
        return [{"prompt": p[-1][1], "answer": a[0]}
                for p, a in list(zip(spec.prompts, answers))[:spec.samples_kept]]
    seen: dict[str, int] = {}
    out = []
    for prompt, samples, name in zip(spec.prompts, answers, spec.prompt_sets):
        seen[name] = seen.get(name, 0) + 1
        if seen[name] <= spec.samples_kept:
            out.append({"set": name, "prompt": prompt[-1][1], "answer": samples[0]})
    return out


def param_drift(model, base_dir: Path) -> float:
    """max |theta - theta_base| over every parameter stored in base_dir, read tensor by tensor."""
    import numpy as np  # noqa: PLC0415

    from prefvec_ds.ckpt.segments import FDS  # noqa: PLC0415
    from prefvec_ds.ckpt.sources import open_source  # noqa: PLC0415

    src = open_source(base_dir, "base")
    have = set(src.names())
    worst = 0.0
    try:
        for name, param in model.named_parameters():
            if name not in have:
                continue  # a tied alias stored under its other name: checked through it
            buf = np.empty(param.numel(), dtype=np.float32)
            src.add_into(name, buf, copy=True)
            now = param.detach().float().cpu().reshape(-1).numpy()
            worst = max(worst, float(np.abs(now - buf).max()))
    finally:
        FDS.close()
    return worst


def run_sweep(spec: SweepSpec, answers_path: Path) -> dict:
    """Score theta_base, every point and every merged model; see the module docstring."""
    from prefvec_ds.ckpt import apply_vectors, remove_vectors  # noqa: PLC0415

    t0 = time.time()
    model, tok = load_policy(spec.base_dir, "fp32")
    answers_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(answers_path)
    rows: dict[int, dict] = {}
    with open(tmp, "w", encoding="utf-8") as log:
        base = evaluate_loaded(model, tok, spec)
        base_answers = base["answers"]
        base_row = _record(base, spec, "base", None, log)
        order = [i for i, pt in enumerate(spec.points) if any(pt.values())]
        for i in order:
            point = spec.points[i]
            etas = {spec.vectors[p]: e for p, e in point.items() if e != 0.0}
            apply_vectors(model, etas)
            try:
                rows[i] = _record(evaluate_loaded(model, tok, spec), spec, label(point), point, log)
            finally:
                remove_vectors(model, etas)
        zero = [i for i, pt in enumerate(spec.points) if not any(pt.values())]
        check = evaluate_loaded(model, tok, spec)
        same = sum(a == b for a, b in zip(check["answers"], base_answers))
        for i in zero:
            rows[i] = _record(dict(check, answers=list(check["answers"])), spec,
                              label(spec.points[i]), spec.points[i], log)
        drift = {"cycles": len(order), "max_abs_param_diff": param_drift(model, spec.base_dir),
                 "zero_point_same_answers": same, "prompts": len(base_answers)}
        del model
        free_accelerator_memory()  # the fp32 base leaves the GPU before any merged model loads
        models = {name: _record(score_model_dir(folder, spec), spec, name, None, log)
                  for name, folder in spec.models.items()}
    tmp.replace(answers_path)
    return {"preferences": list(spec.vectors), "vectors": {p: str(v) for p, v in
                                                           spec.vectors.items()},
            "base_model": str(spec.base_dir), "prompts": len(spec.prompts),
            "generation": asdict(spec.generation),
            "scorers": [s.name for s in spec.scorers],
            "margin_pairs": {s.preference: len(s.pairs) for s in spec.margin_sets},
            "base": base_row, "points": [rows[i] for i in range(len(spec.points))],
            "models": models, "drift": drift, "answers": str(answers_path),
            "seconds": round(time.time() - t0, 1)}


def score_model_dir(folder: Path, spec: SweepSpec) -> dict:
    """A merged model folder as written: vLLM answers when it can run, else transformers."""
    answers = None
    if use_vllm(spec.generation):
        # the engine is shut down and its memory freed before the fp32 load for the margins
        answers = generate_vllm(folder, spec.prompts, spec.generation)
    model, tok = load_policy(folder, "fp32")
    try:
        return evaluate_loaded(model, tok, spec, answers)
    finally:
        del model
        free_accelerator_memory()


def scores_table(summary: dict) -> list[dict]:
    """One flat row per point: eta_<p>, every score axis, margin_<p>, acc_<p>."""
    rows = []
    for row in summary["points"]:
        flat = {f"eta_{p}": e for p, e in row["eta"].items()}
        flat.update({k: v for k, v in row["scores"].items() if not k.startswith("n_")})
        for p, m in row["margins"].items():
            flat[f"margin_{p}"], flat[f"acc_{p}"] = m["margin"], m["accuracy"]
        rows.append(flat)
    return rows


def axes_of(summary: dict) -> list[str]:
    """Score and margin columns of the table, in order."""
    cols: list[str] = []
    for row in scores_table(summary):
        cols += [k for k in row if not k.startswith("eta_") and k not in cols]
    return cols


def values_at(summary: dict, indices: Sequence[int], column: str) -> list[float | None]:
    table = scores_table(summary)
    return [table[i].get(column) for i in indices]
