"""Whole-or-nothing file writes: a hidden temporary beside the target, renamed over it.

A reader (or a crash) never sees half a config, manifest, script or metrics log, and processes
that write the same file at once (SLURM array tasks, two DPO directions, ranks of two nodes on a
shared filesystem) never take each other's temporary. Folders use
prefvec_ds.ckpt.writer.atomic_output_dir.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path


def temporary_beside(path: Path, suffix: str = "tmp") -> Path:
    """A hidden name beside `path` that no other process (on any host) picks: a shared name
    let one writer's rename take another's half-written file."""
    path = Path(path)
    token = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    return path.with_name(f".{path.name}.{token}.{suffix}")


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, default=float))


def link_atomic(link: Path, target: Path) -> None:
    """Make `link` a symlink to `target`, race-free when many processes do it at once.

    A correct link and a regular file (a table computed in place) are kept; a missing, dangling
    or different link is replaced by renaming a uniquely named new link over it, which is atomic,
    so concurrent callers all succeed and every reader sees either no link or the right one.
    (Check-then-symlink_to raced: two DPO directions of one seed started together and the second
    died with FileExistsError.)
    """
    link, target = Path(link), Path(target)
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        if os.readlink(link) == str(target):
            return
    elif link.exists():
        return
    tmp = temporary_beside(link, "link")
    tmp.symlink_to(target)
    try:
        tmp.replace(link)
    finally:
        tmp.unlink(missing_ok=True)
