"""A benchmark's printed lines, kept as a results page under docs/results/ (--results FILE).

Published figures are what a script printed, never hand-typed: `recording(path)` tees every
line the benchmark prints and writes them, under the date, the versions and the exact command,
to `path` when the benchmark finishes (nothing is written if it fails).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import io
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

PACKAGES = ("torch", "deepspeed", "transformers", "kernels", "numpy", "isal")


def stamp() -> str:
    """Date, code version, Python, package versions and machine, on one line."""
    repo = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "prefvec_ds",
                            "recipes", "benchmarks"], capture_output=True, text=True).stdout.strip()
    pkgs = []
    for name in PACKAGES:
        try:
            pkgs.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pkgs.append(f"{name} absent")
    return (f"{datetime.date.today().isoformat()}; prefvec-ds {commit}"
            f"{' (modified)' if dirty else ''}, Python "
            f"{platform.python_version()}, {', '.join(pkgs)}; {platform.machine()}, "
            f"{os.cpu_count()} CPU cores")


class _Tee(io.TextIOBase):
    def __init__(self, stream):
        self.stream, self.lines = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.lines.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def recording(path: Path | None, title: str):
    """Tee stdout; on success write `path` (a markdown page) with the stamp and the lines."""
    if path is None:
        yield
        return
    tee = _Tee(sys.stdout)
    command = "python " + shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    with contextlib.redirect_stdout(tee):
        yield
    page = [f"# {title}", "", f"Written by `{command}` on {stamp()}.", "", "```",
            tee.lines.getvalue().rstrip("\n"), "```", ""]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(page))
