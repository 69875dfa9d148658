"""Whole-or-nothing file writes: a hidden temporary beside the target, renamed over it.

A reader (or a crash) never sees half a config, manifest, script or metrics log, and processes
that write the same file at once (SLURM array tasks, two DPO directions, ranks of two nodes on a
shared filesystem) never take each other's temporary. Folders use
prefvec_ds.ckpt.writer.atomic_output_dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import uuid
from pathlib import Path


def temporary_beside(path: Path, suffix: str = "tmp") -> Path:
    """A hidden name beside `path` that no other process (on any host) picks: a shared name
    let one writer's rename take another's half-written file."""
    path = Path(path)
    token = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    return path.with_name(f".{path.name}.{token}.{suffix}")


def _owner_alive(host: str, pid: int) -> bool:
    """Whether the process that made a temporary may still be writing it. Another host's
    processes cannot be checked from here, so they count as alive (their files are kept)."""
    if host != socket.gethostname():
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def dead_temporaries(path: Path) -> list[Path]:
    """Temporaries beside `path` (temporary_beside names, and the older `.NAME.tmp-PID` /
    `.NAME.old-PID` folder names) whose process ran on this host and is gone: a kill -9 or a
    power cut leaves them, and nothing else ever removes them (two killed merges left 638 MB).
    A temporary of a live process, or of another host, is never listed."""
    path = Path(path)
    name = re.escape(path.name)
    ours = re.compile(rf"^\.{name}\.(?P<host>.+)\.(?P<pid>\d+)\.[0-9a-f]{{8}}\.[A-Za-z]+$")
    legacy = re.compile(rf"^\.{name}\.(?:tmp|old)-(?P<pid>\d+)$")
    found = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        m = ours.match(entry.name)
        host = m.group("host") if m else socket.gethostname()
        m = m or legacy.match(entry.name)
        if m and not _owner_alive(host, int(m.group("pid"))):
            found.append(entry)
    return found


def remove_dead_temporaries(path: Path) -> list[Path]:
    """Remove what dead_temporaries(path) lists (files, links or folders); returns them."""
    removed = []
    for entry in dead_temporaries(path):
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:  # another process cleaned it first
            pass
        except OSError:
            continue
        removed.append(entry)
    return removed


class Interrupted(BaseException):
    """SIGTERM / SIGHUP turned into an exception (as SIGINT is a KeyboardInterrupt), so that
    `finally` blocks and atomic_output_dir remove temporaries before the process ends."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return signal.Signals(self.signum).name


@contextlib.contextmanager
def signals_raise(signums=(signal.SIGTERM, signal.SIGHUP)):
    """Inside the block, the given signals raise Interrupted in the main thread (outside it,
    their previous handlers are back). A signal that is ignored (`nohup` ignores SIGHUP) stays
    ignored. Only the main thread can install handlers: elsewhere this does nothing."""
    def _raise(signum, _frame):
        raise Interrupted(signum)

    old = {}
    try:
        for sig in signums:
            try:
                if signal.getsignal(sig) is signal.SIG_IGN:
                    continue
                old[sig] = signal.signal(sig, _raise)
            except ValueError:  # not the main thread
                break
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


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
