"""Turn `CONFIG [overrides]` into a run: validated config, snapshot in the run folder, DAG.

Every stage job reads the snapshot `<run_dir>/pipeline/config.yaml`, never the user's file:
the YAML may change (or move) while jobs wait in a queue, and the overrides given on the
command line must reach every rank. Paths that a job resolves from elsewhere (run_dir, the
DeepSpeed JSON) are made absolute, because jobs may start in another directory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from prefvec_ds import PrefvecError
from prefvec_ds.atomic import write_text_atomic
from prefvec_ds.config.loader import find_ds_config, load_config, resolve_ds_config, to_dict
from prefvec_ds.config.layout import SNAPSHOT, RunLayout
from prefvec_ds.config.schema import RunConfig
from prefvec_ds.data.sources import expand_preference_paths
from prefvec_ds.pipeline.dag import Stage, build_dag
from prefvec_ds.train.stage import init_model_dir

def snapshot_path(run_dir: str | Path) -> Path:
    return RunLayout(Path(run_dir)).snapshot


def validate(cfg: RunConfig) -> None:
    """Every check that needs no ranks, before anything is launched or queued."""
    world = cfg.distributed.nproc_per_node * cfg.distributed.nnodes
    if not cfg.model.base:
        init_model_dir(cfg, materialize=False)
        resolve_ds_config(cfg, cfg.sft, world)
    resolve_ds_config(cfg, cfg.dpo, world)
    if cfg.pipeline.mora.enabled:
        from prefvec_ds.mora.stage import validate as validate_mora  # noqa: PLC0415

        validate_mora(cfg)
    build_dag(cfg)  # checks pipeline.merges against data.preferences
    from prefvec_ds.eval.scorers import check_scorer_options  # noqa: PLC0415

    for spec in cfg.pipeline.eval.scorers:  # e.g. a judge's base_url, before any stage runs
        check_scorer_options(spec)
    _check_run_dir(cfg)
    validate_data(cfg)
    for merge in cfg.pipeline.merges:  # '.' and '..' pass the name pattern, but name no folder
        if merge.name in (".", ".."):
            raise PrefvecError(f"config parameter pipeline.merges[].name: expected a folder name "
                               f"(letters, digits, _ . -), got {merge.name!r}")


def validate_data(cfg: RunConfig) -> None:
    """Read every data source the stages will read (a missing column, an empty file, a bad
    line): one error here, before a stage is launched or queued, not one per rank after it.
    MORA pairs do not exist yet (a stage writes them) and are checked by that stage."""
    from prefvec_ds.data.prompts import load_prompt_set  # noqa: PLC0415
    from prefvec_ds.data.sources import load_preference, load_sft_examples  # noqa: PLC0415
    from prefvec_ds.data.tokenize import require_safety_labels  # noqa: PLC0415

    if not cfg.model.base:
        load_sft_examples(cfg.data)
    readers = safety_label_readers(cfg)
    for name, pref in cfg.data.preferences.items():
        if pref.source != "mora":
            pairs = load_preference(name, pref, cfg.data)
            if name in readers:  # the ranks check again; this is the error before any launch
                require_safety_labels(pairs, f"data.preferences.{name}", readers[name])
    for name, spec in cfg.pipeline.eval.prompt_sets.items():  # read by the eval stage, last
        load_prompt_set(name, spec)


def safety_label_readers(cfg: RunConfig) -> dict[str, str]:
    """preference -> what will read its per-response safety labels (a safety-aware dpo loss,
    a baseline that needs them)."""
    from prefvec_ds.train.baselines import BASELINE_LOSS, reads_safety_labels  # noqa: PLC0415
    from prefvec_ds.train.losses import LOSSES  # noqa: PLC0415

    readers = {}
    for name in cfg.pipeline.baselines:
        if name in BASELINE_LOSS and reads_safety_labels(name, cfg.dpo.loss_type):
            readers.setdefault(cfg.pipeline.baseline_roles["helpful"],
                               f"pipeline.baselines {name}")
    if LOSSES[cfg.dpo.loss_type].needs_safety:
        readers.update({p: f"dpo.loss_type {cfg.dpo.loss_type}" for p in cfg.data.preferences})
    return readers


def _check_run_dir(cfg: RunConfig) -> None:
    """run_dir (and every folder above it that exists) must be a folder we can write in."""
    run_dir = Path(cfg.run_dir)
    for folder in [run_dir, *run_dir.resolve().parents]:
        if folder.exists():
            if not folder.is_dir():
                raise PrefvecError(f"config parameter run_dir: {folder} is a file, expected a "
                                   "folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PrefvecError(f"config parameter run_dir: cannot write in {folder} "
                                   "(permission denied or read-only file system)")
            return


def prepare(config: str | Path, overrides: list[str] | tuple = (),
            write: bool = True) -> tuple[RunConfig, list[Stage]]:
    """Load and validate, write the snapshot, and return the config read back from it.
    write=False (a dry run) reads it back from a private temporary copy instead: the run
    folder is not touched (a rewritten snapshot made finished stages look stale)."""
    cfg = load_config(config, overrides)
    validate(cfg)
    expand_preference_paths(cfg)  # "{run_dir}/mora/pairs.jsonl" -> an absolute path
    raw = to_dict(cfg)
    raw["run_dir"] = str(Path(cfg.run_dir).resolve())
    raw["distributed"]["ds_config"] = str(find_ds_config(cfg).resolve())
    path = snapshot_path(raw["run_dir"])
    text = yaml.safe_dump(raw, sort_keys=False)
    if not write:
        with tempfile.TemporaryDirectory(prefix="prefvec-dry-run-") as tmp:
            (Path(tmp) / "config.yaml").write_text(text, encoding="utf-8")
            cfg = load_config(Path(tmp) / "config.yaml")
        return cfg, build_dag(cfg)
    if not path.is_file() or path.read_text() != text:  # keep the mtime of an unchanged run
        try:
            write_text_atomic(path, text)
        except OSError as err:
            raise PrefvecError(f"config parameter run_dir: cannot write {path} "
                               f"({err.strerror or err})") from None
    cfg = load_config(path)
    return cfg, build_dag(cfg)


def load_run(run_dir: str | Path) -> tuple[RunConfig, list[Stage]]:
    """The config and DAG of an existing run folder (for `prefvec status`)."""
    path = snapshot_path(run_dir)
    if not path.is_file():
        raise PrefvecError(f"{run_dir}: not a pipeline run folder (no {'/'.join(SNAPSHOT)}; "
                           "start one with `prefvec run` or `prefvec submit`)")
    cfg = load_config(path)
    return cfg, build_dag(cfg)

