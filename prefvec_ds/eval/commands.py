"""`prefvec sweep` (the eta sweep, diagnostics and report of a run) and `prefvec eval` (one
model, or theta_base with vectors at given etas)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefvec_ds import PrefvecError
from prefvec_ds.config.layout import RunLayout, merge_etas


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "sweep", help="eta sweep of a run: scores, margins, diagnostics, report",
        description="Load theta_base once (fp32), apply the preference vectors in place at every "
        "eta point of pipeline.eval, score the answers and held-out margins, add the vector "
        "diagnostics (norms, cosines, cross-seed cosine, STI), and write report.md with its "
        "PNGs (default: <run_dir>/eval/). This is the pipeline's eval stage.")
    _config_args(p)
    p.add_argument("--vector", action="append", default=[], metavar="NAME=PATH",
                   help="the vector of preference NAME (default: <run_dir>/vectors/NAME); "
                   "PATH may be PLUS_CKPT,MINUS_CKPT")
    p.add_argument("--base", help="theta_base HF folder (default: model.base or the SFT output)")
    p.add_argument("--out", help="output folder (default: <run_dir>/eval)")
    p.add_argument("--no-merged", action="store_true",
                   help="do not score the merged model folders of pipeline.merges")
    p.add_argument("--no-diagnostics", action="store_true", help="skip norms, cosines and STI")
    p.set_defaults(func=run_sweep_command)

    p = sub.add_parser(
        "eval", help="score one model on the held-out prompts and pairs",
        description="Answers of one model (a HF folder; default theta_base of the run, with "
        "--vector applied in place) on the held-out prompts, scored by pipeline.eval.scorers, "
        "and its log-prob margins on held-out pairs.")
    _config_args(p)
    p.add_argument("--model", help="HF folder (default: theta_base of the run)")
    p.add_argument("--vector", action="append", default=[], metavar="PATH=ETA",
                   help="apply a vector in place first: a vector folder, a preference name of "
                   "the run (its <run_dir>/vectors/NAME) or PLUS,MINUS checkpoints")
    p.add_argument("--json", help="also write the result to this file")
    p.set_defaults(func=run_eval_command)

    p = sub.add_parser(
        "tune-eta", help="choose eta under constraints (margins first, answers to confirm)",
        description="Maximise pipeline.eval.tune.objective subject to its constraints: search "
        "the eta grid of pipeline.eval.tune.space by held-out log-prob margins (no generation), "
        "confirm the best `candidates` points with generated answers and the scorers, write "
        "<run_dir>/eval/tune/{tune.json,tune.md} and the chosen point as merged/auto.")
    _config_args(p)
    p.add_argument("--out", help="output folder (default: <run_dir>/eval/tune)")
    p.set_defaults(func=run_tune_command)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML, or a pipeline run folder (its "
                   "pipeline/config.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pipeline.eval.prompts=50")


def load_run_config(config: str, overrides: list[str]):
    """A YAML file, or a run folder's resolved snapshot, with its scorers' options checked
    (a judge's base_url, ...) before any answer is generated."""
    from prefvec_ds.config.loader import load_config  # noqa: PLC0415
    from prefvec_ds.eval.scorers import check_scorer_options  # noqa: PLC0415

    path = Path(config)
    if path.is_dir():
        path = RunLayout(path).snapshot
        if not path.is_file():
            raise PrefvecError(f"{config}: not a pipeline run folder (no pipeline/config.yaml)")
    cfg = load_config(path, overrides)
    for spec in cfg.pipeline.eval.scorers:
        check_scorer_options(spec)
    return cfg


def _pairs(items: list[str], what: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        left, sep, right = item.rpartition("=")
        if not sep or not left or not right:
            raise PrefvecError(f"--vector {item!r}: expected {what}")
        out.append((left, right))
    return out


def run_sweep_command(args: argparse.Namespace) -> int:
    from prefvec_ds.eval.runner import evaluate_run, run_vectors  # noqa: PLC0415
    cfg = load_run_config(args.config, args.overrides)
    vectors = run_vectors(cfg)
    for name, path in _pairs(args.vector, "NAME=PATH"):
        if name not in vectors:
            raise PrefvecError(f"--vector {name}={path}: unknown preference {name}; expected "
                               f"one of {', '.join(vectors)} (from data.preferences)")
        vectors[name] = Path(path)
    models = {}
    if not args.no_merged:
        lay = RunLayout.of(cfg)
        models = {name: lay.merged(name) for name in merge_etas(cfg)
                  if (lay.merged(name) / "config.json").is_file()}
    summary = evaluate_run(cfg, Path(args.out) if args.out else None,
                           Path(args.base) if args.base else None, vectors, models,
                           diagnostics=not args.no_diagnostics)
    print(f"report: {summary['report']}")
    return 0


def run_eval_command(args: argparse.Namespace) -> int:
    from prefvec_ds.eval.runner import evaluate_model, run_vectors  # noqa: PLC0415
    from prefvec_ds.train.stage import base_model_dir  # noqa: PLC0415

    cfg = load_run_config(args.config, args.overrides)
    named = run_vectors(cfg)
    etas = {}
    for path, eta in _pairs(args.vector, "PATH=ETA"):
        try:
            etas[str(named.get(path, path))] = float(eta)
        except ValueError:
            raise PrefvecError(f"--vector {path}={eta}: eta must be a number") from None
    model = Path(args.model) if args.model else base_model_dir(cfg)
    result = evaluate_model(cfg, model, etas)
    text = json.dumps(result, indent=2)
    if args.json:
        from prefvec_ds.atomic import write_text_atomic  # noqa: PLC0415

        write_text_atomic(Path(args.json), text + "\n")
    print(text)
    return 0


def run_tune_command(args: argparse.Namespace) -> int:
    from prefvec_ds.eval.tune import tune_eta  # noqa: PLC0415
    from prefvec_ds.eval.grid import label  # noqa: PLC0415

    # a run folder is tuned where it is (a copied run keeps its snapshot's old run_dir)
    here = [f"run_dir={Path(args.config).resolve()}"] if Path(args.config).is_dir() else []
    cfg = load_run_config(args.config, here + args.overrides)
    result = tune_eta(cfg, Path(args.out) if args.out else None)
    chosen, n = result["chosen"], result["counts"]
    verdict = "chosen" if chosen["met"] else "NO point met the constraints; closest"
    print(f"{verdict}: {label(chosen['eta'])}; {n['margin_passes']} margin passes, "
          f"{n['generation_passes']} generation passes (full grid: "
          f"{n['grid']['generation_passes']}); report: {result['report']}")
    return 0 if chosen["met"] else 1
