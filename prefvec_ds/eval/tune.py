"""`prefvec tune-eta`: choose eta under constraints, margins first, answers only to confirm.

1. theta_base is loaded once in fp32 and answers the held-out prompts (its scores are the
   `base` of relative constraints); its held-out margins are measured.
2. Search: at every point of the eta grid of pipeline.eval.tune (`space`, the product over
   preferences) the vectors are applied in place (as the sweep does), the held-out log-prob
   margins measured (no generation) and the vectors removed.
3. The `candidates` best points by the margin surrogate (prefvec_ds.eval.tuning) are confirmed:
   applied again, answered, scored by pipeline.eval.scorers, with bootstrap intervals over
   prompts.
4. The chosen point is the best confirmed one meeting every constraint (or none, with the
   closest named); it is written as <run_dir>/merged/<merge_to> by the checkpoint merge.
Outputs: <run_dir>/eval/tune/tune.json and tune.md (prefvec_ds.eval.tune_report).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from prefvec_ds import PrefvecError
from prefvec_ds.atomic import write_json_atomic
from prefvec_ds.config.layout import RunLayout
from prefvec_ds.config.schema import RunConfig
from prefvec_ds.eval import tuning
from prefvec_ds.eval.grid import Point, key, label


def search_grid(cfg: RunConfig) -> list[Point]:
    """The product of every preference's search etas, the all-zero point included once."""
    tcfg, prefs = cfg.pipeline.eval.tune, list(cfg.data.preferences)
    unknown = sorted(set(tcfg.space) - set(prefs))
    if unknown:
        raise PrefvecError(f"config parameter pipeline.eval.tune.space: unknown preference(s) "
                           f"{', '.join(unknown)}; expected some of {', '.join(prefs)}")
    axes = [tcfg.etas_of(p) for p in prefs]
    size = 1
    for a in axes:
        size *= len(a)
    if size > 20000:  # ~hours of margin passes on an 8B model: ask for a coarser step
        raise PrefvecError(f"config parameter pipeline.eval.tune.space: {size} grid points; "
                           "expected at most 20000 (raise the step or narrow the ranges)")
    points = [dict(zip(prefs, values)) for values in itertools.product(*axes)]
    zero = {p: 0.0 for p in prefs}
    return [zero] + [pt for pt in points if key(pt) != key(zero)]


def _per_prompt(values: list, num_samples: int) -> list[list[float]]:
    """An axis' per-answer values regrouped by prompt (None: not applicable, left out)."""
    return [[v for v in values[i:i + num_samples] if v is not None]
            for i in range(0, len(values), num_samples)]


class Evaluator:
    """theta_base in memory; margin passes and generation passes at eta points, counted."""

    def __init__(self, cfg: RunConfig, base: Path, vectors: dict[str, Path]):
        from prefvec_ds.eval.generate import load_policy  # noqa: PLC0415
        from prefvec_ds.eval.margins import held_out_pairs  # noqa: PLC0415
        from prefvec_ds.eval.runner import answered_prompts  # noqa: PLC0415
        from prefvec_ds.eval.scorers import build_scorer  # noqa: PLC0415

        ecfg = cfg.pipeline.eval
        self.cfg, self.vectors, self.gen = cfg, vectors, ecfg.generation
        self.model, self.tok = load_policy(base, "fp32")
        self.margin_sets = held_out_pairs(cfg, self.tok, ecfg.margin_pairs)
        missing = sorted(set(cfg.data.preferences) - {s.preference for s in self.margin_sets})
        if missing:
            raise PrefvecError(f"tune-eta: no held-out pairs for {', '.join(missing)} (config "
                               "parameter pipeline.eval.margin_pairs must be >= 1 and "
                               "data.preferences.<p>.eval_fraction > 0): the search reads them")
        self.prompts, self.sets, self.set_axes = answered_prompts(cfg)
        self.scorers = [build_scorer(s) for s in ecfg.scorers]
        self.margin_passes = self.generation_passes = 0

    def _applied(self, point: Point, fn):
        from prefvec_ds.ckpt import apply_vectors, remove_vectors  # noqa: PLC0415

        etas = {self.vectors[p]: e for p, e in point.items() if e != 0.0}
        if etas:
            apply_vectors(self.model, etas)
        try:
            return fn()
        finally:
            if etas:
                remove_vectors(self.model, etas)

    def margins(self, point: Point) -> dict[str, float]:
        from prefvec_ds.eval import margins as margin_mod  # noqa: PLC0415

        self.margin_passes += 1
        got = self._applied(point, lambda: margin_mod.measure(
            self.model, self.margin_sets, self.tok.pad_token_id, self.gen.batch_size))
        return {p: m["margin"] for p, m in got.items()}

    def scores(self, point: Point) -> dict:
        """Mean scores with bootstrap intervals, and two sample answers, at `point`."""
        from prefvec_ds.eval.generate import generate  # noqa: PLC0415
        from prefvec_ds.eval.scorers import score_all  # noqa: PLC0415

        self.generation_passes += 1
        answers = self._applied(point, lambda: generate(self.model, self.tok, self.prompts,
                                                        self.gen))
        prompts = [p for p, samples in zip(self.prompts, answers) for _ in samples]
        sets = [name for name, s in zip(self.sets, answers) for _ in s]
        per_answer = score_all(self.scorers, prompts, [a for s in answers for a in s], sets,
                               self.set_axes)
        tcfg = self.cfg.pipeline.eval.tune
        ci = {axis: tuning.bootstrap_mean(_per_prompt(values, self.gen.num_samples),
                                          tcfg.bootstrap, tcfg.confidence, tcfg.seed)
              for axis, values in per_answer.items()}
        return {"scores": {a: c["mean"] for a, c in ci.items()}, "ci": ci,
                "samples": [{"prompt": p[-1][1], "answer": a[0]}
                            for p, a in list(zip(self.prompts, answers))[:2]]}


def tune_eta(cfg: RunConfig, out_dir: Path | None = None) -> dict:
    """Search, confirm, choose, merge; returns the result (also written as tune.json)."""
    from prefvec_ds.eval.runner import cap_cpu_threads, check_vectors, run_vectors  # noqa: PLC0415
    from prefvec_ds.eval.scorers import build_scorer, set_columns  # noqa: PLC0415
    from prefvec_ds.eval.tune_report import write_tune_report  # noqa: PLC0415
    from prefvec_ds.models.hf import check_model_dir  # noqa: PLC0415
    from prefvec_ds.train.stage import base_model_dir  # noqa: PLC0415

    t0 = time.time()
    tcfg, prefs = cfg.pipeline.eval.tune, list(cfg.data.preferences)
    out = Path(out_dir) if out_dir else RunLayout.of(cfg).eval / "tune"
    vectors = run_vectors(cfg)
    check_vectors(vectors)
    grid = search_grid(cfg)  # config errors before the model loads
    axes = [a for s in cfg.pipeline.eval.scorers for a in build_scorer(s).axes]
    sets = {name: spec.axes for name, spec in cfg.pipeline.eval.prompt_sets.items()}
    tuning.check_names(tcfg, prefs, set_columns(axes, sets) if sets else axes)
    cap_cpu_threads(cfg.pipeline.eval.cpu_threads)
    base = check_model_dir(base_model_dir(cfg), "theta_base")
    ev = Evaluator(cfg, base, vectors)
    base_row = {"eta": grid[0], **ev.scores(grid[0])}
    tuning.score_of(base_row["scores"], tcfg.objective, "objective")
    base_margins = ev.margins(grid[0])
    rows = [{"eta": grid[0], "margins": base_margins}]
    for i, point in enumerate(grid[1:], 1):
        rows.append({"eta": point, "margins": ev.margins(point)})
        if i % 20 == 0 or i == len(grid) - 1:
            print(f"[tune] margins at {i + 1}/{len(grid)} points", flush=True)
    confirmed, picked, slopes, floors = [], [], {}, {}
    while len(picked) < min(tcfg.candidates, len(rows)):
        for row in rows:  # re-ranked after every confirmation, with the calibrated slopes
            row["surrogate"] = tuning.surrogate(row["margins"], base_margins, tcfg, prefs,
                                                base_row["scores"], slopes, floors)
        i = tuning.rank_candidates(rows, 1, set(picked))[0]
        picked.append(i)
        confirmed.append(_confirm(ev, rows[i], base_row, i == 0, tcfg))
        slopes = tuning.calibrate(confirmed, base_margins, base_row["scores"], tcfg, prefs)
        floors = tuning.failure_floors(confirmed, base_margins, base_row["scores"], tcfg, prefs)
    result = _result(cfg, rows, base_row, confirmed, ev, picked)
    result["slopes"] = slopes
    del ev  # the fp32 base leaves memory before the merge reads the vectors
    result["merged"] = _merge_choice(cfg, result) if result["chosen"]["met"] else None
    result["seconds"] = round(time.time() - t0, 1)
    write_json_atomic(out / "tune.json", result)
    result["report"] = str(write_tune_report(result, out))
    write_json_atomic(out / "tune.json", result)
    return result


def _confirm(ev: Evaluator, row: dict, base_row: dict, is_base: bool, tcfg) -> dict:
    """Answers and scores at a candidate (theta_base's are reused), constraints checked."""
    scored = base_row if is_base else {"eta": row["eta"], **ev.scores(row["eta"])}
    out = {**scored, "margins": row["margins"], "surrogate": dict(row["surrogate"])}
    out["constraints"] = tuning.check_constraints(out["scores"], base_row["scores"], tcfg)
    print(f"[tune] confirmed {label(out['eta'])}: {tcfg.objective}="
          f"{out['scores'][tcfg.objective]:.3f}, constraints "
          f"{'met' if all(c['met'] for c in out['constraints']) else 'NOT met'}", flush=True)
    return out


def _result(cfg: RunConfig, rows, base_row, confirmed, ev: Evaluator, picked) -> dict:
    import dataclasses  # noqa: PLC0415

    tcfg = cfg.pipeline.eval.tune
    choice = tuning.choose(confirmed, tcfg.objective)
    chosen = confirmed[choice["index"]]
    # the base is answered in every run (relative bounds); it joins the front when not picked
    scored = confirmed + ([] if 0 in picked else [{**base_row, "margins": rows[0]["margins"]}])
    front = tuning.pareto_front(scored, tuning.front_columns(tcfg))
    return {"config": dataclasses.asdict(tcfg), "preferences": list(cfg.data.preferences),
            "prompts": len(ev.prompts), "margin_pairs": {s.preference: len(s.pairs)
                                                         for s in ev.margin_sets},
            "base": base_row,
            "chosen": {"eta": chosen["eta"], "met": choice["met"], "scores": chosen["scores"],
                       "ci": chosen["ci"], "constraints": chosen["constraints"],
                       **({"shortfall": choice["shortfall"]} if not choice["met"] else {})},
            "confirmed": confirmed,
            "pareto_front": [{"eta": scored[i]["eta"], "scores": scored[i]["scores"]}
                             for i in front],
            "search": [{k: r[k] for k in ("eta", "margins", "surrogate")} for r in rows],
            "counts": tuning.evaluation_counts(len(rows), ev.generation_passes)}


def _merge_choice(cfg: RunConfig, result: dict) -> str | None:
    """theta_base + sum eta * phi at the chosen point, as merged/<merge_to>, by the typed
    checkpoint merge (the same streaming writer as the merge stage)."""
    from prefvec_ds.ckpt.merge import merge_vectors  # noqa: PLC0415
    from prefvec_ds.ckpt.sources import open_vector_arg  # noqa: PLC0415
    from prefvec_ds.train.stage import base_model_dir  # noqa: PLC0415

    name = cfg.pipeline.eval.tune.merge_to
    if not name:
        return None
    lay = RunLayout.of(cfg)
    dtype = None if cfg.pipeline.merge_dtype == "base" else cfg.pipeline.merge_dtype
    vectors = [(open_vector_arg(str(lay.vectors(p))), eta)
               for p, eta in result["chosen"]["eta"].items() if eta != 0.0]
    info = merge_vectors(base_model_dir(cfg), vectors, lay.merged(name), dtype=dtype,
                         overwrite=True)
    print(f"[tune] wrote {info['out']} ({label(result['chosen']['eta'])})", flush=True)
    return info["out"]
