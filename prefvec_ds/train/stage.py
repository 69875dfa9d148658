"""Where a stage reads and writes inside the run folder, and what every stage needs first."""

from __future__ import annotations

import time
from pathlib import Path

from prefvec_ds import PrefvecError
from prefvec_ds.atomic import write_json_atomic
from prefvec_ds.config.layout import RunLayout
from prefvec_ds.config.schema import RunConfig
from prefvec_ds.models.embedded import EMBEDDED_PREFIX, materialize_embedded_model
from prefvec_ds.models.hf import check_model_dir

DONE_FILE = "done.json"


def init_model_dir(cfg: RunConfig, materialize: bool = True) -> Path:
    """The SFT stage's starting model: a HF folder, or the embedded model written once."""
    if cfg.model.path.startswith(EMBEDDED_PREFIX):
        folder = RunLayout.of(cfg).init_model
        if materialize:
            materialize_embedded_model(cfg.model.path.removeprefix(EMBEDDED_PREFIX), folder,
                                       cfg.seed)
        return folder
    return check_model_dir(cfg.model.path, "model.path")


def base_model_dir(cfg: RunConfig, must_exist: bool = True) -> Path:
    """theta_base: model.base, else the SFT output."""
    if cfg.model.base:
        return check_model_dir(cfg.model.base, "model.base")
    folder = RunLayout.of(cfg).sft_model
    if must_exist and not (folder / "config.json").is_file():
        raise PrefvecError(f"theta_base {folder} does not exist: run the SFT stage first "
                           "(`prefvec train sft CONFIG`) or set model.base to a HF folder")
    return folder


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer  # noqa: PLC0415

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # Llama-3 and Mistral ship no pad token
    return tok


def direction_dir(cfg: RunConfig, direction: str) -> Path:
    return RunLayout.of(cfg).dpo(direction)


def mark_done(folder: Path, **payload) -> None:
    write_json_atomic(folder / DONE_FILE, {"finished_at": time.time(), **payload})
