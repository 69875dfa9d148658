"""Real DeepSpeed ZeRO-3 and ZeRO-1/2 checkpoints for the ckpt tests, built once per test session.

Run as a script, this file is one rank of a tiny training job: it builds a pico Llama from a seed,
saves it as the HF base, then trains a "plus" and a "minus" copy for two AdamW steps on different
random tokens under ZeRO-3 and saves both with `engine.save_checkpoint`. The test process starts
W such ranks itself (env:// rendezvous on a free port, gloo) with a hard timeout instead of a hang.

Sets (each a folder with base/, plus/, minus/; built in ~20-40 s each on 2 CPU cores):
- "w2_fp32_tied":  W=2, fp32, tied embeddings, sub_group_size 3000 -> several sub-groups.
- "w3_bf16_frozen": W=3, bf16, untied, one frozen weight, plus a 1-element parameter whose padding
  spans two ranks (p = ceil(1/3) = 1: ranks 1 and 2 hold nothing but padding).
- "w3_fp32_tied": W=3, same architecture and seed as "w2_fp32_tied" but sub_group_size 5000, so
  its layout differs from the W=2 set (different W and sub-groups) for the named-range path.

Set PREFVEC_TEST_CKPT_CACHE=/some/dir to reuse built checkpoints across pytest runs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

SETS = {
    "w2_fp32_tied": dict(world=2, dtype="fp32", tie=True, frozen=False, tiny=False, sub_group=3000),
    "w3_bf16_frozen": dict(world=3, dtype="bf16", tie=False, frozen=True, tiny=True, sub_group=3000),
    "w3_fp32_tied": dict(world=3, dtype="fp32", tie=True, frozen=False, tiny=False, sub_group=5000),
}
# ZeRO-1/2 sets (zero12_sets): two optimizer param groups (decay / no decay) in each, so the fp32
# masters are several flat groups split over the ranks.
# - "z2_w2_fp32_tied":   stage 2, W=2, fp32, tied embeddings (stored once: shared_params).
# - "z2_w3_bf16_frozen": stage 2, W=3, bf16_ prefix, a frozen weight (stage 2 keeps it in
#   frozen_param_fragments), a 1-element param, parameter_alignment on (non-zero
#   param_alignment_paddings) and round-robin gradients (param_shapes order != module order).
# - "z1_w1_fp32_tied":   stage 1, W=1, fp32, tied.
# - "z1_w2_bf16":        stage 1, W=2, bf16, a frozen weight (stage 1 saves no frozen fragments:
#   it is only in the full `module`).
# - "z1_w2_bf16_fp32acc": stage 1, W=2, bf16 with fp32 gradient accumulation: DeepSpeed picks its
#   BF16_Optimizer, whose state has no zero_stage (only ds_config says 1) and keeps the group
#   padding; zero_to_fp32 cannot read it, so the test checks the masters against the module's
#   bf16 weights (DeepSpeed copies the masters into them after each step).
ZERO12_SETS = {
    "z2_w2_fp32_tied": dict(world=2, dtype="fp32", tie=True, frozen=False, tiny=False, stage=2),
    "z2_w3_bf16_frozen": dict(world=3, dtype="bf16", tie=False, frozen=True, tiny=True, stage=2,
                              align=True, round_robin=True),
    "z1_w1_fp32_tied": dict(world=1, dtype="fp32", tie=True, frozen=False, tiny=False, stage=1),
    "z1_w2_bf16": dict(world=2, dtype="bf16", tie=False, frozen=True, tiny=False, stage=1),
    "z1_w2_bf16_fp32acc": dict(world=2, dtype="bf16", tie=True, frozen=False, tiny=False, stage=1,
                               fp32_accumulation=True),
}
ALL_SETS = {**SETS, **ZERO12_SETS}
BUILD_TIMEOUT_S = 600
PICO = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_set(name: str, root: Path) -> Path:
    """Build checkpoint set `name` under root/name (skipped when already complete)."""
    spec = ALL_SETS[name]
    out = Path(root) / name
    if (out / "done.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), WORLD_SIZE=str(spec["world"]),
               OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=os.environ.get(
                   "TORCH_EXTENSIONS_DIR", "/root/.cache/prefvec-ds/torch_extensions"))
    cmd = [sys.executable, __file__, "--out", str(out), "--set", name]
    procs = []
    for rank in range(spec["world"]):
        renv = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
        log = open(out / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen(cmd, env=renv, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=BUILD_TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        logs = "\n".join((out / f"rank{r}.log").read_text()[-3000:] for r in range(spec["world"]))
        raise RuntimeError(f"building checkpoint set {name} failed ({codes}):\n{logs}")
    (out / "done.json").write_text(json.dumps(spec))
    return out


def _ds_config(spec: dict) -> dict:
    if spec.get("stage", 3) != 3:
        zero = {"stage": spec["stage"], "parameter_alignment": spec.get("align", False),
                "round_robin_gradients": spec.get("round_robin", False)}
    else:
        zero = {"stage": 3, "sub_group_size": spec["sub_group"],
                "stage3_param_persistence_threshold": 0}
    extra = {"data_types": {"grad_accum_dtype": "fp32"}} if spec.get("fp32_accumulation") else {}
    return {
        **extra,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 1000,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0,
                                                  "torch_adam": True}},
        "zero_optimization": zero,
        "bf16": {"enabled": spec["dtype"] == "bf16"},
    }


def _param_groups(model, spec: dict):
    """Trainable params; for ZeRO-1/2 sets two optimizer groups (matrices decay, vectors not)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.get("stage", 3) == 3:
        return params
    return [{"params": [p for p in params if p.dim() > 1], "weight_decay": 0.01},
            {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]


def _tiny_home(model, spec: dict):
    """The norm that owns the 1-element parameter: the final norm, or with parameter_alignment
    the first layer's norm, so it sits mid-group and gets a real alignment padding after it
    (1 element, bf16: 7 padding elements to the next 16-byte boundary)."""
    return model.model.layers[0].input_layernorm if spec.get("align") else model.model.norm


def _rank_main(out: Path, set_name: str) -> None:
    """One rank: base model -> HF folder; plus/minus trained copies -> ZeRO-3 checkpoints."""
    import copy

    import torch
    import torch._dynamo  # noqa: F401  (must be imported before any zero.Init; see facts note)
    import deepspeed
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = ALL_SETS[set_name]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(1234)  # same seed on every rank -> identical base everywhere
    config = LlamaConfig(**PICO, tie_word_embeddings=spec["tie"])
    base = LlamaForCausalLM(config).float()
    if spec["tiny"]:  # a 1-element parameter: with W=3, ranks 1 and 2 hold only padding
        _tiny_home(base, spec).register_parameter("tiny_gate",
                                                  torch.nn.Parameter(torch.full((1,), 0.5)))
    if rank == 0:
        base.save_pretrained(out / "base")
        base.generation_config.save_pretrained(out / "base")
    for label, data_seed in (("plus", 1), ("minus", 2)):
        model = copy.deepcopy(base)
        if spec["frozen"]:
            model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
        if spec["tiny"]:  # used inside norm's forward, so ZeRO-3 gathers it and it gets a grad
            _tiny_home(model, spec).register_forward_hook(
                lambda mod, args, out: out * mod.tiny_gate)
        params = _param_groups(model, spec)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params,
                                          config=_ds_config(spec))
        gen = torch.Generator().manual_seed(data_seed * 100 + rank)
        for _ in range(2):
            ids = torch.randint(0, PICO["vocab_size"], (2, 12), generator=gen)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
        engine.save_checkpoint(str(out / label), tag="global_step2")
        dist.barrier()
        del engine
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", required=True, choices=sorted(ALL_SETS))
    a = parser.parse_args()
    _rank_main(a.out, a.set)


# ---------------------------------------------------------------------------------------------
# Synthetic ZeRO-3 checkpoints (no deepspeed): same file layout, for fast unit tests of edge cases.
# Padding is filled with NaN so any read of padding shows up as NaN in the result.

def pico_state_dict(seed: int = 0, tiny: bool = False) -> dict:
    """A small named state dict with awkward sizes (1, 5, 7x3) besides matrix weights."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {"embed.weight": torch.randn(11, 6, generator=g),
          "layers.0.proj.weight": torch.randn(7, 3, generator=g),
          "layers.0.norm.weight": torch.randn(5, generator=g),
          "layers.1.proj.weight": torch.randn(6, 6, generator=g),
          "head.weight": torch.randn(4, 6, generator=g)}
    if tiny:
        sd["layers.1.gate"] = torch.randn(1, generator=g)
    return sd


def write_synthetic_zero3(folder: Path, sd: dict, world: int, sub_group: int = 40,
                          prefix: str = "", frozen: tuple = (), shared: dict | None = None,
                          zero_stage: int = 3, tag: str = "global_step1") -> Path:
    """Write `sd` as a ZeRO-3 checkpoint of `world` ranks under folder/tag (+ `latest`)."""
    import math
    from collections import OrderedDict

    import torch

    tag_dir = Path(folder) / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    (Path(folder) / "latest").write_text(tag)
    groups, used = [OrderedDict()], 0
    for name, t in sd.items():
        if name in frozen:
            continue
        part = math.ceil(t.numel() / world)
        if used and used + part > sub_group:
            groups.append(OrderedDict())
            used = 0
        groups[-1][name] = t.shape
        used += part
    frozen_shapes = OrderedDict((n, sd[n].shape) for n in frozen)
    for rank in range(world):
        flats = []
        for group in groups:
            pieces = []
            for name in group:
                flat = sd[name].reshape(-1).float()
                part = math.ceil(flat.numel() / world)
                padded = torch.full((part * world,), float("nan"))
                padded[:flat.numel()] = flat
                pieces.append(padded[rank * part:(rank + 1) * part])
            flats.append(torch.cat(pieces))
        fragments = OrderedDict()
        for name in frozen:
            flat = sd[name].reshape(-1)
            part = math.ceil(flat.numel() / world)
            fragments[name] = flat[rank * part:(rank + 1) * part].clone()
        model_states = {"module": {n: torch.empty(0) for n in sd}, "buffer_names": [],
                        "param_shapes": groups, "frozen_param_shapes": frozen_shapes,
                        "frozen_param_fragments": fragments, "shared_params": shared or {},
                        "dp_world_size": world, "ds_version": "synthetic"}
        optim = {"optimizer_state_dict": {
            "zero_stage": zero_stage, "partition_count": world, "fp32_flat_groups": flats,
            "optimizer_state_dict": {"state": {i: {"exp_avg": torch.zeros_like(f)}
                                               for i, f in enumerate(flats)}}}}
        torch.save(model_states, tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        torch.save(optim, tag_dir / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    return Path(folder)


def write_hf_folder(folder: Path, sd: dict, config: dict | None = None) -> Path:
    """A minimal HF-style folder: model.safetensors (+ config.json when given)."""
    import json as _json

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seen, unique = set(), {}
    for k, v in sd.items():  # tied weights are stored once, as save_pretrained does
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            unique[k] = v.contiguous()
    save_file(unique, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(_json.dumps(config))
    return folder


# ---------------------------------------------------------------------------------------------
# pytest glue: import these names into a test module to use them.

def zero3_root(tmp_path_factory) -> Path:
    cache = os.environ.get("PREFVEC_TEST_CKPT_CACHE")
    return Path(cache) if cache else tmp_path_factory.mktemp("zero3_sets")


def reference_state_dict(folder: Path) -> dict:
    """DeepSpeed's own gather (the reference), fp32, with its prints silenced."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        sd = get_fp32_state_dict_from_zero_checkpoint(str(folder))
    return {k: v.detach().float() for k, v in sd.items()}


try:
    import pytest

    @pytest.fixture(scope="session")
    def zero3_sets(tmp_path_factory) -> dict[str, Path]:
        """All real ZeRO-3 checkpoint sets, built once per session (~1 min on 2 cores)."""
        root = zero3_root(tmp_path_factory)
        return {name: build_set(name, root) for name in SETS}

    @pytest.fixture(scope="session")
    def zero12_sets(tmp_path_factory) -> dict[str, Path]:
        """All real ZeRO-1/2 checkpoint sets, built once per session (~1-2 min on 2 cores)."""
        root = zero3_root(tmp_path_factory)
        return {name: build_set(name, root) for name in ZERO12_SETS}
except ImportError:  # running as a rank script without pytest installed
    pass
