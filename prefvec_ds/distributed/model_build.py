"""DeepSpeed engines over HF model folders, for ZeRO stage 1, 2 or 3 (the ds_config's choice).

ZeRO-3: models are built inside `deepspeed.zero.Init` (each rank allocates only its partition)
and filled one tensor at a time from the HF folder's safetensors: rank 0 reads a tensor (mmap)
and `GatheredParameters(modifier_rank=0)` scatters it, so no rank ever holds a full state dict.
ZeRO-1/2: every rank holds the whole model by design (only optimizer states, and at stage 2
gradients, are partitioned), so every rank fills its own copy from the same mmapped files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from prefvec_ds.config.loader import zero_stage
from prefvec_ds.distributed.group import rank
from prefvec_ds.distributed.zero_sizing import resolve_zero_auto


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights  # noqa: PLC0415 - v5
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # noqa: PLC0415 - v4
    return no_init_weights()


def import_model_class(config) -> None:
    """Import the causal-LM class of `config` now, before any `deepspeed.zero.Init`.

    zero.Init wraps the `__init__` of every nn.Module subclass, including classes first defined
    inside it (`__init_subclass__`), and on exit restores the `__init__` it saw at class
    creation. transformers imports model modules lazily, and hub-kernel decorators
    (`kernels.use_kernelized_func`, on LlamaAttention since transformers 5.x) replace `__init__`
    *after* class creation: if the module is first imported inside zero.Init, the restore drops
    the decorator's `__init__` but keeps its `forward`, and every later instance fails with
    "'LlamaAttention' object has no attribute '_kernel_funcs'" (a second engine in one process:
    DPO building its reference table, a resumed run, a sweep after training). Importing the
    class first makes zero.Init see the finished class, so it restores the decorated `__init__`.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING  # noqa: PLC0415

    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:  # remote code is imported by from_config
        MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # the lazy mapping imports the module


def _build_model(model_dir: Path, ds_config: dict, gradient_checkpointing: bool):
    import contextlib  # noqa: PLC0415

    import deepspeed  # noqa: PLC0415
    import torch._dynamo  # noqa: F401, PLC0415 - must precede zero.Init (dynamo signature bug)
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

    config = AutoConfig.from_pretrained(model_dir)
    import_model_class(config)
    partitioned = (deepspeed.zero.Init(config_dict_or_path=ds_config)
                   if zero_stage(ds_config) == 3 else contextlib.nullcontext())
    # no dtype= here: DeepSpeed 0.19 drops it on the CPU accelerator; the config decides.
    # no weight init: every parameter is overwritten from the folder, and HF's init indexes
    # rows (padding_idx) of partitions that are empty on this rank.
    with partitioned, _no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def _fill_from_safetensors(model, model_dir: Path, partitioned: bool) -> None:
    """Copy every parameter from the folder's safetensors: into its ZeRO-3 partitions through
    rank 0, or (ZeRO-1/2, whole parameters on every rank) on each rank."""
    import deepspeed  # noqa: PLC0415
    from safetensors import safe_open  # noqa: PLC0415

    from prefvec_ds.models.hf import safetensors_index  # noqa: PLC0415

    index = safetensors_index(model_dir)
    tied = getattr(model.config, "tie_word_embeddings", False)
    is_src = rank() == 0 or not partitioned
    for name, param in model.named_parameters():
        key = name if name in index else ("model.embed_tokens.weight"
                                          if tied and name == "lm_head.weight" else None)
        if key not in index:
            raise FileNotFoundError(f"{model_dir}: parameter {name} not found in safetensors")
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if is_src:
                with safe_open(model_dir / index[key], framework="pt") as fh:
                    param.data.copy_(fh.get_tensor(key))


def build_engine(model_dir: Path, ds_config: dict, train: bool, lr_lambda=None,
                 gradient_checkpointing: bool = False):
    """A ZeRO-1/2/3 engine over the HF model in model_dir (optimizer + LambdaLR when train)."""
    import deepspeed  # noqa: PLC0415

    stage = zero_stage(ds_config)  # 1, 2 or 3: config.loader.resolve_ds_config checked it
    model_cfg = json.loads((Path(model_dir) / "config.json").read_text())
    hidden = model_cfg.get("hidden_size") or model_cfg.get("text_config", {}).get("hidden_size")
    cfg = resolve_zero_auto(ds_config, hidden)
    if not train:
        cfg.pop("optimizer", None)
        if stage < 3:  # ZeRO-1/2 partition optimizer states: an inference engine
            cfg["zero_optimization"] = {"stage": 0}  # (no optimizer) is plain data parallel
    model = _build_model(model_dir, cfg, gradient_checkpointing and train)
    _fill_from_safetensors(model, model_dir, partitioned=stage == 3)
    kwargs = {}
    if train:
        # the engine builds the optimizer from the config; our schedule is a plain LambdaLR.
        kwargs["lr_scheduler"] = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
        kwargs["model_parameters"] = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, config=cfg, **kwargs)
    if not train:
        engine.eval()
    return engine
