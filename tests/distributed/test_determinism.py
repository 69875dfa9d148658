"""The same short SFT + DPO run twice gives byte-identical theta_base and vectors.

Published figures are only reproducible if a run is: two runs of one config on one stack must
agree to the byte (2 ranks, gloo, ZeRO-3), from the seeded embedded model to the vector file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.distributed.conftest import prefvec, write_config

SHORT = {"data": {"embedded_size": 400},
         "sft": {"max_steps": 8, "log_every": 4},
         "dpo": {"max_steps": 4, "lr": 5.0e-4, "micro_batch_size": 8, "log_every": 2,
                 "save_every": 0}}


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob("*.safetensors"))}


def _short_run(root: Path) -> Path:
    root.mkdir(parents=True)
    config = write_config(root / "config.yaml", root / "run", SHORT)
    prefvec("train", "sft", str(config))
    prefvec("train", "dpo", str(config), "--direction", "helpful+")
    run = root / "run"
    # one direction against theta_base keeps the tier short; helpful- is the same code path
    prefvec("vector", "--plus", str(run / "dpo" / "helpful+" / "ckpt"),
            "--minus", str(run / "sft" / "model"), "--out", str(run / "vector"))
    return run


def test_two_runs_of_one_config_give_byte_identical_vectors(tmp_path):
    first, second = _short_run(tmp_path / "a"), _short_run(tmp_path / "b")
    base = _digests(first / "sft" / "model")
    assert base and base == _digests(second / "sft" / "model")
    vector = _digests(first / "vector")
    assert vector and vector == _digests(second / "vector")
    # and not trivially: DPO really moved away from theta_base
    from safetensors.numpy import load_file

    tensors = [t for f in sorted((first / "vector").glob("*.safetensors"))
               for t in load_file(f).values()]
    assert max(float(abs(t).max()) for t in tensors) > 0
