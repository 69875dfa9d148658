"""One rank (world 1) that trains a pico Llama for one step under DeepSpeed ZeRO stage 2 and saves
a real ZeRO-2 checkpoint into argv[1] (for tests/faults: the tools must name it as such)."""

from __future__ import annotations

import sys
from pathlib import Path


def main(out: Path) -> None:
    import torch
    import torch._dynamo  # noqa: F401  (before deepspeed, as in tests/ckpt_fixtures.py)
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).float()
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
          "zero_optimization": {"stage": 2}, "steps_per_print": 10**6}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    ids = torch.randint(0, 96, (1, 8))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    engine.save_checkpoint(str(out), tag="global_step1")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
