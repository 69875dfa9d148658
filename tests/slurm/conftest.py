"""The slurm tier runs against one real cluster per session (see tests/slurm_fixtures.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slurm_fixtures import slurm_cluster, two_node_cluster  # noqa: E402,F401
