"""`prefvec run` against a read-only place (issue 14), real CLI."""

from __future__ import annotations

from tests.conftest import REPO
from tests.faults.conftest import mount, prefvec, remount_read_only  # noqa: F401

RECIPE = REPO / "recipes" / "quickstart.yaml"


def test_run_dir_on_a_read_only_mount_is_one_line(mount):  # noqa: F811
    ro = mount(4)
    remount_read_only(ro)
    for run_dir in (ro / "run", ro):
        proc = prefvec("run", RECIPE, f"run_dir={run_dir}")
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "config parameter run_dir: cannot write in" in proc.stderr

