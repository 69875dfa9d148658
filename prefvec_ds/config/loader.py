"""Load a run config: YAML file -> dotted overrides -> dataclasses -> resolved DeepSpeed JSON.

`load_config("recipe.yaml", ["dpo.beta=0.05"])` returns a validated RunConfig; `resolve_ds_config`
fills DeepSpeed's batch and optimizer fields from the run config and refuses contradictions.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import yaml

from prefvec_ds import PrefvecError
from prefvec_ds.atomic import write_text_atomic
from prefvec_ds.config.choices import ZeroStage
from prefvec_ds.config.schema import OptimConfig, RunConfig

PACKAGE_DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"
REPO_DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"


def apply_override(raw: dict, override: str) -> None:
    """'dpo.beta=0.05' sets raw['dpo']['beta'] = 0.05 (the value is parsed as YAML)."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise PrefvecError(f"override {override!r}: expected KEY=VALUE such as dpo.beta=0.05")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise PrefvecError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(value)


def _build(cls, raw, where: str):
    """Recursively turn a dict into the dataclass `cls`; unknown keys are errors."""
    if not isinstance(raw, dict):
        raise PrefvecError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise PrefvecError(f"{where}: unknown parameter(s) {', '.join(unknown)}; expected some of "
                           f"{', '.join(sorted(names))}")
    kwargs = {}
    for key, value in raw.items():
        hint = hints[key]
        sub = f"{where}.{key}"
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, sub)
        elif typing.get_origin(hint) is dict and dataclasses.is_dataclass(typing.get_args(hint)[1]):
            # name -> section (data.preferences, pipeline.mora.dimensions): each one checked
            item = typing.get_args(hint)[1]
            if not isinstance(value, dict):
                fields = ", ".join(f.name for f in dataclasses.fields(item))
                raise PrefvecError(f"{sub}: expected a mapping of name -> {{{fields}}}")
            kwargs[key] = {k: _build(item, v or {}, f"{sub}.{k}") for k, v in value.items()}
        else:
            kwargs[key] = _coerce(hint, value, sub)
    return cls(**kwargs)


def _coerce(hint, value, where: str):
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 5e-5 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise PrefvecError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def load_dataclass(cls, path: str | Path | None, overrides: list[str] | tuple = (),
                   fixed: dict | None = None):
    """Read YAML (or start from defaults when path is None), apply overrides and then `fixed`
    (values the command decides), validate into `cls`."""
    raw: dict = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise PrefvecError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise PrefvecError(f"config file {path}: not valid YAML ({err})") from None
        except (UnicodeDecodeError, OSError) as err:
            raise PrefvecError(f"config file {path}: cannot be read as YAML text ({err})") from None
        if not isinstance(raw, dict):
            raise PrefvecError(f"config file {path}: expected a mapping of sections (run_dir:, "
                               f"model:, data:, ...), found a {type(raw).__name__}")
        where = str(path)
    for override in overrides:
        apply_override(raw, override)
    raw.update(fixed or {})
    try:
        return _build(cls, raw, where)
    except PrefvecError as err:
        raise PrefvecError(f"{err}" if str(err).startswith(where) else f"{where}: {err}") from None


def load_config(path: str | Path | None, overrides: list[str] | tuple = ()) -> RunConfig:
    """Read YAML (or start from defaults when path is None), apply overrides, validate."""
    cfg = load_dataclass(RunConfig, path, overrides)
    cfg.source_path = str(Path(path).resolve()) if path is not None else ""
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    out = dataclasses.asdict(cfg)
    out.pop("source_path", None)
    return out


def save_resolved(cfg: RunConfig, folder: Path, ds_config: dict | None = None) -> None:
    """Write config.yaml (and ds_config.json) into a run folder, atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if ds_config is not None:
        write_text_atomic(folder / "ds_config.json", json.dumps(ds_config, indent=2))


def find_ds_config(cfg: RunConfig) -> Path:
    """distributed.ds_config as given, then next to the YAML, then in the project's ds_configs/."""
    name = Path(cfg.distributed.ds_config)
    candidates = [name]
    if cfg.source_path and not name.is_absolute():
        candidates.append(Path(cfg.source_path).parent / name)
    candidates += [REPO_DS_CONFIGS / name.name, PACKAGE_DS_CONFIGS / name.name]
    for cand in candidates:
        if cand.is_file():
            return cand
    raise PrefvecError(f"config parameter distributed.ds_config: file {name} not found "
                       f"(looked in {', '.join(str(c) for c in candidates)})")


def zero_stage(ds_config: dict):
    """zero_optimization.stage of a DeepSpeed config as written (DeepSpeed's default: 0);
    resolve_ds_config accepts only the ints of ZeroStage."""
    return (ds_config.get("zero_optimization") or {}).get("stage", 0)


def resolve_ds_config(cfg: RunConfig, stage: OptimConfig, world_size: int) -> dict:
    """The DeepSpeed JSON for one stage: batch and optimizer fields come from the run config.

    A field already in the JSON must agree (or be "auto"); a contradiction is an error naming
    both sides, because DeepSpeed would otherwise silently train with a different batch size.
    """
    path = find_ds_config(cfg)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PrefvecError(f"ds_config {path}: not valid JSON ({err})") from None
    wanted = {"train_micro_batch_size_per_gpu": stage.micro_batch_size,
              "gradient_accumulation_steps": stage.grad_accum,
              "train_batch_size": stage.micro_batch_size * stage.grad_accum * world_size}
    for key, value in wanted.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise PrefvecError(f"ds_config {path}: {key}={ds[key]} contradicts the run config "
                               f"({key}={value} from micro_batch_size={stage.micro_batch_size}, "
                               f"grad_accum={stage.grad_accum}, world size {world_size})")
        ds[key] = value
    if "scheduler" in ds:
        raise PrefvecError(f"ds_config {path}: has a 'scheduler' section, but the learning-rate "
                           "schedule is owned by the run config (<stage>.scheduler, warmup_ratio)")
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    for key, value in {"lr": stage.lr, "weight_decay": stage.weight_decay}.items():
        if params.get(key, "auto") not in ("auto", value):
            raise PrefvecError(f"ds_config {path}: optimizer.params.{key}={params[key]} "
                               f"contradicts the run config ({key}={value})")
        params[key] = value
    stage = zero_stage(ds)
    if stage not in typing.get_args(ZeroStage):
        raise PrefvecError(f"ds_config {path}: zero_optimization.stage must be one of "
                           f"{', '.join(map(str, typing.get_args(ZeroStage)))}, got {stage}")
    return ds
