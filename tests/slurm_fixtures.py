"""A real single-node SLURM cluster (slurm/cluster.sh) as a session fixture, `slurm_cluster`.

Used by tests/slurm (through its conftest.py); an e2e test that submits a pipeline can import it
the same way (`from slurm_fixtures import slurm_cluster`).

The cluster lives in a private temporary folder on free ports, so it never touches a cluster a
developer already runs (default folder, ports 16817-16820), and is torn down at the end.

Skipped only when the SLURM binaries are missing and cannot be installed (not root, no apt);
with CI=true that is a failure instead, so CI can never pass by skipping this tier.

Environment:
    PREFVEC_SLURM_TEST_HOME   use this folder instead of a temporary one (kept afterwards)
    PREFVEC_SLURM_KEEP=1      leave the cluster running after the session (for debugging)
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "slurm" / "cluster.sh"
INSTALL_SH = REPO / "slurm" / "install_deps.sh"
BINARIES = ("sbatch", "srun", "squeue", "scontrol", "slurmctld", "slurmd", "munged")
# Variables of an enclosing job (CI itself under SLURM) would steer our sbatch/srun into that
# job's allocation; the tests must talk to their own cluster only.
_FOREIGN_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")


@dataclass(frozen=True)
class SlurmCluster:
    """The running test cluster."""

    home: Path
    """Its private folder (configs, logs, state)."""
    conf: Path
    """Its slurm.conf; SLURM_CONF points here for the whole session."""


def _missing_binaries() -> list[str]:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


def _can_install() -> bool:
    return shutil.which("apt-get") is not None and (os.geteuid() == 0 or shutil.which("sudo"))


def _ensure_binaries() -> None:
    """Install the packages when possible; skip (fail under CI=true) when not."""
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if _missing_binaries() and _can_install():
        subprocess.run([str(INSTALL_SH)], capture_output=True, text=True, timeout=900)
    missing = _missing_binaries()
    if missing:
        message = f"SLURM binaries missing and not installable here: {', '.join(missing)}"
        if in_ci:
            pytest.fail(message + " (CI=true: the slurm tier must run; see slurm/install_deps.sh)")
        pytest.skip(message)


def _free_port_base(count: int = 4) -> int:
    """First of `count` consecutive free ports below 20000 (jobs use 20000-39999 for MASTER_PORT)."""
    for _ in range(200):
        base = random.randrange(15000, 19990)
        try:
            for port in range(base, base + count):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no 4 consecutive free ports in 15000-19999")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    """Bring the cluster up once per session; SLURM_CONF is set while the session runs."""
    _ensure_binaries()
    keep_home = "PREFVEC_SLURM_TEST_HOME" in os.environ
    home = Path(os.environ.get("PREFVEC_SLURM_TEST_HOME") or tmp_path_factory.mktemp("slurm"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_PREFIXES)}
    # job ids from a random start: two private clusters on one machine (two CI runs, a
    # developer's tests beside CI) handed out the same ids, hence the same MASTER_PORT
    # (dist.env.slurm_job_port), and one job's rank 0 died with EADDRINUSE
    env.update(PREFVEC_SLURM_HOME=str(home), PREFVEC_SLURM_PORT_BASE=str(_free_port_base()),
               PREFVEC_SLURM_FIRST_JOB_ID=str(random.randrange(1000, 11000, 100)))
    proc = subprocess.run([str(CLUSTER_SH), "up"], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p.name}\n{_tail(p)}" for p in sorted((home / "log").glob("*.log")))
        pytest.fail(f"slurm/cluster.sh up failed ({proc.returncode}):\n{proc.stderr}\n{logs}")

    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith(_FOREIGN_PREFIXES)]:
        del os.environ[key]
    os.environ["SLURM_CONF"] = str(home / "etc" / "slurm.conf")
    try:
        yield SlurmCluster(home, home / "etc" / "slurm.conf")
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if os.environ.get("PREFVEC_SLURM_KEEP") != "1":
            down = ["down"] if keep_home else ["down", "--purge"]
            subprocess.run([str(CLUSTER_SH), *down], env=env, capture_output=True, timeout=120)
