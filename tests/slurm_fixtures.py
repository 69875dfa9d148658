"""Real SLURM clusters (slurm/cluster.sh) as session fixtures: `slurm_cluster` (one node,
localhost) and `two_node_cluster` (node1 and node2, each in its own network namespace).

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
BINARIES = ("sbatch", "srun", "squeue", "scontrol", "slurmctld", "slurmd", "munged", "ip",
            "nsenter", "unshare")
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
    """First of `count` consecutive free ports below 20000 (jobs use 20000-32767 for MASTER_PORT)."""
    for _ in range(200):
        base = random.randrange(15000, 19990)
        try:
            for port in range(base, base + count):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports in 15000-19999")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def cluster_env(home: Path, ports: int = 4, **extra: str) -> dict[str, str]:
    """Environment for slurm/cluster.sh with a private folder, free ports and, for job ids, a
    random start: two private clusters on one machine (two CI runs, a developer's tests beside
    CI) handed out the same ids, hence the same MASTER_PORT (dist.env.slurm_job_port), and one
    job's rank 0 died with EADDRINUSE."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_PREFIXES)}
    env.update(PREFVEC_SLURM_HOME=str(home), PREFVEC_SLURM_PORT_BASE=str(_free_port_base(ports)),
               PREFVEC_SLURM_FIRST_JOB_ID=str(random.randrange(1000, 11000, 100)), **extra)
    return env


def free_subnet() -> tuple[str, str]:
    """(subnet, name prefix) for a multi-node cluster: a 10.213.x.0/24 no address here is in,
    and names (pv<x>br0, pv<x>ns1, ...) no other test cluster uses."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for _ in range(100):
        x = random.randrange(1, 255)
        if f" 10.213.{x}." not in used:
            return f"10.213.{x}", f"pv{x}"
    raise RuntimeError("no free 10.213.x.0/24 subnet")


def cluster_up(home: Path, env: dict[str, str], *args: str) -> None:
    """`slurm/cluster.sh up ARGS`; the test fails with the daemons' last log lines if it fails."""
    proc = subprocess.run([str(CLUSTER_SH), "up", *args], env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p.name}\n{_tail(p)}" for p in sorted((home / "log").glob("*.log")))
        pytest.fail(f"slurm/cluster.sh up failed ({proc.returncode}):\n{proc.stderr}\n{logs}")


@pytest.fixture(scope="session")
def two_node_cluster(tmp_path_factory) -> SlurmCluster:
    """node1 + node2 (network namespaces on a private bridge), up once per session beside the
    one-node cluster (own folder, ports, subnet). SLURM_CONF is NOT set for the session: tests
    set it to `conf` while they talk to this cluster (tests/slurm/test_multinode.py)."""
    _ensure_binaries()
    home = tmp_path_factory.mktemp("slurm2")
    subnet, prefix = free_subnet()
    # 40 ports: controller, slurmd, srun's range (+10..+39); no accounting (squeue is enough
    # within MinJobAge, and mariadb would cost ~10 s of start-up)
    env = cluster_env(home, ports=40, PREFVEC_SLURM_ACCOUNTING="0", PREFVEC_SLURM_CPUS="2",
                      PREFVEC_SLURM_SUBNET=subnet, PREFVEC_SLURM_NET_PREFIX=prefix)
    cluster_up(home, env, "--nodes", "2")
    try:
        yield SlurmCluster(home, home / "etc" / "slurm.conf")
    finally:
        if os.environ.get("PREFVEC_SLURM_KEEP") != "1":
            subprocess.run([str(CLUSTER_SH), "down", "--purge"], env=env, capture_output=True,
                           timeout=120)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    """Bring the cluster up once per session; SLURM_CONF is set while the session runs."""
    _ensure_binaries()
    keep_home = "PREFVEC_SLURM_TEST_HOME" in os.environ
    home = Path(os.environ.get("PREFVEC_SLURM_TEST_HOME") or tmp_path_factory.mktemp("slurm"))
    env = cluster_env(home)
    cluster_up(home, env)

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
