"""One rank of a tiny DeepSpeed ZeRO stage 2 training job that saves a real ZeRO-2 checkpoint into
argv[1]; the caller starts WORLD_SIZE such processes (env:// rendezvous, gloo).

    python -m tests.faults.zero2_build OUT          # pico Llama, one step (tests/faults)
    python -m tests.faults.zero2_build OUT big      # one 32 Mi-element weight (memory test)

`big`: a 4096 x 8192 weight (128 MiB fp32) and a 3-element one in one param group, so with W=2
the big weight straddles the two ranks' partitions and the reader must stream it across them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def build(out: Path, world: int = 1, big: bool = False, timeout: int = 300) -> Path:
    """Run `world` ranks of this script (a hard timeout instead of a hang); returns `out`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WORLD_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tests.faults.zero2_build", str(out)] + (["big"] if big else [])
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        raise RuntimeError(f"ZeRO-2 build failed: {[p.returncode for p in procs]}\n"
                           + "\n".join(log[-3000:] for log in logs))
    return Path(out)


def _big_model():
    import torch

    class Big(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8192, 4096) * 0.01)
            self.gate = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            return (x @ self.w.t()).square().mean() * self.gate.sum()

    return Big()


def main(out: Path, big: bool = False) -> None:
    import torch
    import torch._dynamo  # noqa: F401  (before deepspeed, as in tests/ckpt_fixtures.py)
    import deepspeed
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    if big:
        model = _big_model()
    else:
        config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64)
        model = LlamaForCausalLM(config).float()
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True,
                                                    "foreach": False}},
          "zero_optimization": {"stage": 2}, "steps_per_print": 10**6}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    if big:
        loss = engine(torch.randn(2, 4096))
    else:
        ids = torch.randint(0, 96, (1, 8))
        loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(str(out), tag="global_step1")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), big=len(sys.argv) > 2 and sys.argv[2] == "big")
