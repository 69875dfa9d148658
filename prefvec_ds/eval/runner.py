"""Evaluate a run: the eta sweep, vector diagnostics and the report, from a run config.

`evaluate_run(cfg)` is what the pipeline's eval stage and `prefvec sweep` run. It reads
theta_base, `<run_dir>/vectors/<p>` (and `<run_dir>/seeds/<k>/vectors/<p>` for the cross-seed
cosine) and the merged models, and writes into `<run_dir>/eval/`:
    summary.json   the stage's contract: scores of theta_base and of every merged model,
                   the trends along each eta, the diagnostics, where the rest is
    sweep.json     every point: etas, scores, margins, timing, sample answers
    answers.jsonl  every answer of every point
    report.md, lines.png, heatmap_<a>_<b>.png
"""

from __future__ import annotations

import time
from pathlib import Path

from prefvec_ds import PrefvecError
from prefvec_ds.atomic import write_json_atomic
from prefvec_ds.config.layout import RunLayout, merge_etas
from prefvec_ds.config.schema import RunConfig
from prefvec_ds.data.pairs import Messages, is_held_out
from prefvec_ds.data.sources import load_preference
from prefvec_ds.eval.grid import check_names, sweep_points


def eval_prompts(cfg: RunConfig, limit: int) -> list[Messages]:
    """Distinct prompts of the held-out pairs of every preference, in data order."""
    seen, out = set(), []
    for name, pref in cfg.data.preferences.items():
        for pair in load_preference(name, pref, cfg.data):
            if is_held_out(pair.key(), pref.eval_fraction) and pair.prompt not in seen:
                seen.add(pair.prompt)
                out.append(pair.prompt)
    if not out:
        raise PrefvecError("eval: no held-out prompts (every data.preferences.<p>.eval_fraction "
                           "is 0); hold out some pairs to evaluate on")
    return out[:limit]


def answered_prompts(cfg: RunConfig) -> tuple[list[Messages], list[str], dict[str, list[str]]]:
    """The prompts the eval answers: pipeline.eval.prompt_sets when configured (with the set
    of each prompt and the axes kept per set), else the held-out prompts (no sets)."""
    from prefvec_ds.data.prompts import load_prompt_sets  # noqa: PLC0415

    ecfg = cfg.pipeline.eval
    if not ecfg.prompt_sets:
        return eval_prompts(cfg, ecfg.prompts), [], {}
    prompts, sets = load_prompt_sets(ecfg.prompt_sets)
    return prompts, sets, {name: list(spec.axes) for name, spec in ecfg.prompt_sets.items()}


def diagnostic_preferences(cfg: RunConfig) -> list[str]:
    ecfg = cfg.pipeline.eval
    return list(ecfg.diagnostic_preferences) or list(cfg.data.preferences)


def run_vectors(cfg: RunConfig) -> dict[str, Path]:
    return {p: RunLayout.of(cfg).vectors(p) for p in cfg.data.preferences}


def seed_vectors(cfg: RunConfig) -> dict[str, dict[int, Path]]:
    out: dict[str, dict[int, Path]] = {}
    for seed in cfg.pipeline.eval.diagnostic_seeds:
        for pref in diagnostic_preferences(cfg):
            path = RunLayout.of(cfg).seed(seed).vectors(pref)
            if (path / "prefvec_vector.json").is_file():
                out.setdefault(pref, {})[seed] = path
    return out


def cap_cpu_threads(threads: int) -> None:
    """pipeline.eval.cpu_threads torch threads when the sweep runs on CPU (0: leave as is)."""
    import torch  # noqa: PLC0415

    if threads and not torch.cuda.is_available():
        torch.set_num_threads(threads)


def check_vectors(vectors: dict[str, Path]) -> None:
    for pref, path in vectors.items():
        if not Path(str(path).split(",")[0]).exists():
            raise PrefvecError(f"eval: vector of preference {pref} not found at {path} (run the "
                               "vectors stage, or pass --vector NAME=PATH)")


def evaluate_run(cfg: RunConfig, out_dir: Path | None = None, base: Path | None = None,
                 vectors: dict[str, Path] | None = None,
                 models: dict[str, Path] | None = None, diagnostics: bool = True) -> dict:
    """Sweep, diagnostics and report; returns the summary (also written as summary.json)."""
    from prefvec_ds.eval.diagnostics import vector_diagnostics  # noqa: PLC0415
    from prefvec_ds.eval.margins import held_out_pairs  # noqa: PLC0415
    from prefvec_ds.eval.report import trends, write_report  # noqa: PLC0415
    from prefvec_ds.eval.scorers import build_scorer  # noqa: PLC0415
    from prefvec_ds.eval.sweep import SweepSpec, run_sweep  # noqa: PLC0415
    from prefvec_ds.models.hf import check_model_dir  # noqa: PLC0415
    from prefvec_ds.train.stage import base_model_dir, load_tokenizer  # noqa: PLC0415

    t0 = time.time()
    ecfg = cfg.pipeline.eval
    cap_cpu_threads(ecfg.cpu_threads)
    out = Path(out_dir) if out_dir else Path(cfg.run_dir) / "eval"
    vectors = vectors or run_vectors(cfg)
    check_vectors(vectors)
    check_names(ecfg, list(cfg.data.preferences), cfg.seed)
    base = check_model_dir(Path(base) if base else base_model_dir(cfg), "theta_base")
    tok = load_tokenizer(base)
    prompts, sets, set_axes = answered_prompts(cfg)
    spec = SweepSpec(
        base_dir=base, vectors=vectors, points=sweep_points(list(vectors), ecfg),
        prompts=prompts, generation=ecfg.generation,
        scorers=[build_scorer(s) for s in ecfg.scorers],
        margin_sets=held_out_pairs(cfg, tok, ecfg.margin_pairs), models=models or {},
        samples_kept=ecfg.samples_in_report, prompt_sets=sets, set_axes=set_axes)
    print(f"[sweep] {len(spec.points)} points x {len(spec.prompts)} prompts x "
          f"{ecfg.generation.num_samples} answers, {len(spec.models)} merged model(s)", flush=True)
    sweep = run_sweep(spec, out / "answers.jsonl")
    sweep["merge_etas"] = {k: v for k, v in merge_etas(cfg).items() if k in spec.models}
    write_json_atomic(out / "sweep.json", sweep)
    diag = None
    if diagnostics and all(Path(str(v)).is_dir() for v in vectors.values()):
        diag = vector_diagnostics({p: str(v) for p, v in vectors.items()}, seed_vectors(cfg),
                                  ecfg.sti_rank, ecfg.sti_matrices)
    inter = None
    if ecfg.interference_methods and len(vectors) >= 2 and all(
            Path(str(v)).is_dir() for v in vectors.values()):
        inter = interference(cfg, spec, base, vectors, out)
    report = write_report(sweep, diag, out, title=Path(cfg.run_dir).name, interference=inter)
    models_out = {"base": _flat(sweep["base"]),
                  **{name: _flat(row) for name, row in sweep["models"].items()}}
    summary = {"scorer": [s.name for s in spec.scorers], "prompts": len(spec.prompts),
               **({"prompt_sets": {n: spec.prompt_sets.count(n) for n in set_axes}}
                  if set_axes else {}),
               "models": models_out, "eta": sweep["merge_etas"],
               "points": len(spec.points), "trends": trends(sweep), "drift": sweep["drift"],
               "diagnostics": diag, **({"interference": inter} if inter else {}),
               "sweep": str(out / "sweep.json"), "report": str(report),
               "seconds": round(time.time() - t0, 1)}
    write_json_atomic(out / "summary.json", summary)
    print(f"[sweep] report: {report} ({summary['seconds']} s)", flush=True)
    return summary


def composition_etas(cfg: RunConfig) -> dict[str, float]:
    """The etas the merge methods are compared at: the `default` merge's (else the first
    merge's, else 1 for every preference)."""
    etas = merge_etas(cfg)
    return etas.get("default") or next(iter(etas.values()), None) or {
        p: 1.0 for p in cfg.data.preferences}


def interference(cfg: RunConfig, spec, base: Path, vectors: dict[str, Path], out: Path) -> dict:
    """Cosines, STI and composition scores per merge method (prefvec_ds.eval.interference)."""
    from prefvec_ds.eval.interference import (method_interference,  # noqa: PLC0415
                                              score_compositions)

    ecfg = cfg.pipeline.eval
    weights = composition_etas(cfg)
    result = method_interference({p: str(v) for p, v in vectors.items()}, weights,
                                 ecfg.interference_methods, ecfg.interference_density,
                                 ecfg.sti_rank, ecfg.sti_matrices)
    dtype = None if cfg.pipeline.merge_dtype == "base" else cfg.pipeline.merge_dtype
    scores = score_compositions(spec, base, vectors, weights, list(result),
                                ecfg.interference_density, out / "interference", dtype)
    for method, row in scores.items():
        result[method].update(row)
    return {"etas": weights, "methods": result}


def _flat(row: dict) -> dict:
    """A model's scores at top level (summary.json's long-standing shape), margins beside."""
    return {**{k: v for k, v in row["scores"].items()}, "margins": row["margins"],
            "samples": row["samples"]}


def evaluate_model(cfg: RunConfig, model_dir: Path, etas: dict[str, float] | None = None
                   ) -> dict:
    """Scores and held-out margins of one model: a HF folder, with vectors applied in place
    at `etas` ({vector folder: eta}) when given. Decoding and scorers from pipeline.eval."""
    from prefvec_ds.ckpt import apply_vectors  # noqa: PLC0415
    from prefvec_ds.eval.generate import load_policy  # noqa: PLC0415
    from prefvec_ds.eval.margins import held_out_pairs  # noqa: PLC0415
    from prefvec_ds.eval.scorers import build_scorer  # noqa: PLC0415
    from prefvec_ds.eval.sweep import SweepSpec, evaluate_loaded, kept_samples  # noqa: PLC0415

    ecfg = cfg.pipeline.eval
    cap_cpu_threads(ecfg.cpu_threads)
    check_vectors({str(v): v for v in etas or {}})  # before the model is loaded
    model, tok = load_policy(model_dir, "fp32")
    if etas:
        apply_vectors(model, etas)
    prompts, sets, set_axes = answered_prompts(cfg)
    spec = SweepSpec(base_dir=Path(model_dir), vectors={}, points=[],
                     prompts=prompts, generation=ecfg.generation,
                     scorers=[build_scorer(s) for s in ecfg.scorers],
                     margin_sets=held_out_pairs(cfg, tok, ecfg.margin_pairs),
                     samples_kept=ecfg.samples_in_report, prompt_sets=sets, set_axes=set_axes)
    result = evaluate_loaded(model, tok, spec)
    result["samples"] = kept_samples(spec, result.pop("answers"))
    return {"model": str(model_dir), "vectors": {str(k): v for k, v in (etas or {}).items()},
            "prompts": len(spec.prompts), **result}
