"""Hugging Face model folders: resolve the configured model, read its safetensors index."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefvec_ds import PrefvecError


def safetensors_index(model_dir: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index or the single model.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = model_dir / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open  # noqa: PLC0415

        with safe_open(single, framework="pt") as fh:
            return {k: single.name for k in fh.keys()}
    raise PrefvecError(f"model folder {model_dir}: no model.safetensors or "
                       "model.safetensors.index.json (only safetensors weights are read)")


def check_model_dir(path: str | Path, param: str = "model.path") -> Path:
    """A clear error when a model folder is missing or incomplete."""
    p = Path(path)
    if not p.is_dir():
        raise PrefvecError(f"config parameter {param}: model folder {p} does not exist")
    if not (p / "config.json").is_file():
        raise PrefvecError(f"config parameter {param}: {p} has no config.json "
                           "(expected a Hugging Face model folder)")
    safetensors_index(p)
    return p


def model_fingerprint(model_dir: Path) -> str:
    """Identity of a model folder's weights: name, size and mtime of every file, plus config.

    Cheap (no hashing of GBs of weights) and changes whenever a stage rewrites the model.
    """
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update((model_dir / "config.json").read_bytes())
    return h.hexdigest()
