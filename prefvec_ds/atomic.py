"""Whole-or-nothing file writes: a hidden temporary beside the target, renamed over it.

A reader (or a crash) never sees half a config, manifest, script or metrics log. Folders use
prefvec_ds.ckpt.writer.atomic_output_dir.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # one temporary per process: SLURM array tasks may write the same file at once, and with a
    # shared name one task's rename could take another's half-written file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_json_atomic(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, default=float))
