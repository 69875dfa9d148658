"""Fixtures of the fault-injection tier: the real `prefvec` CLI in subprocesses, inputs big
enough that a merge takes about a second (so signals land in the middle of it), and small
tmpfs / read-only mounts (root only; each unmounted in teardown)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def prefvec(*args, timeout: int = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefvec_ds.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prefvec_ds.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def leftovers(folder: Path, keep=()) -> list[str]:
    """Names in `folder` other than `keep`: hidden temporaries, half-written outputs."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name not in keep)


def _big_state_dict(n_tensors: int = 6, numel: int = 3 << 20, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {f"layers.{i}.w": torch.randn(numel // 1024, 1024, generator=g) for i in range(n_tensors)}
    sd["norm.weight"] = torch.randn(1000, generator=g)  # a size that leaves padding
    return sd


@pytest.fixture(scope="session")
def big_inputs(tmp_path_factory) -> dict[str, Path]:
    """base (HF), plus and minus (ZeRO-3, W=2), ~75 MB each: a merge reads ~225 MB."""
    from tests.ckpt_fixtures import write_hf_folder, write_synthetic_zero3

    root = tmp_path_factory.mktemp("faults_inputs")
    base = write_hf_folder(root / "base", _big_state_dict(seed=0),
                           {"architectures": ["Big"], "torch_dtype": "float32"})
    (base / "tokenizer.json").write_text("{}")
    plus = write_synthetic_zero3(root / "plus", _big_state_dict(seed=1), 2, sub_group=8 << 20)
    minus = write_synthetic_zero3(root / "minus", _big_state_dict(seed=2), 2, sub_group=8 << 20)
    return {"base": base, "plus": plus, "minus": minus, "root": root}


def merge_args(inputs: dict, out: Path, *extra) -> list:
    return ["merge", "--base", inputs["base"], "--vector",
            f"{inputs['plus']},{inputs['minus']}=0.5", "--out", out, *extra]


@pytest.fixture
def mount(tmp_path):
    """mount(size_mb, read_only=False) -> a fresh tmpfs folder; unmounted at teardown."""
    mounted = []

    def _mount(size_mb: int, read_only: bool = False) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        opts = f"size={size_mb}m" + (",ro" if read_only else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (root needed): {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield _mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


def remount_read_only(point: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
