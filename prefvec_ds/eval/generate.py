"""Answers of a policy to a prompt set: batched, greedy or sampled, N samples per prompt.

Two back ends with one contract (`list[list[str]]`: per prompt, its samples in order):
- transformers `generate`, for a model already in memory (the eta sweep applies vectors in place
  on one loaded base, so no model is written per grid point) or loaded from a folder;
- vLLM, for a model folder when vLLM is installed and a GPU is present (`backend: auto`): one
  engine per call, started on freed memory with the config's VllmOptions, fed our own token ids,
  and shut down before the call returns.

Sampling is reproducible: every batch reseeds from (spec.seed, batch index), so the answers do
not depend on what ran before in the process (the sweep's points stay comparable).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

from prefvec_ds import PrefvecError
from prefvec_ds.config.checks import check
# the spec is a config section (pipeline.eval.generation, mora.selfplay...): it lives with the
# config dataclasses and is re-exported here, where it is used
from prefvec_ds.config.evaluation import BACKENDS, GenerationSpec, VllmOptions  # noqa: F401
from prefvec_ds.data.pairs import Messages

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def device() -> str:
    import torch  # noqa: PLC0415

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_policy(model_dir: str | Path, dtype: str = "fp32"):
    """(model, tokenizer) from a HF folder, on the GPU when there is one, in eval mode.

    The tokenizer pads on the left (decoder-only batched generation).
    """
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    from prefvec_ds.models.hf import check_model_dir  # noqa: PLC0415
    from prefvec_ds.train.stage import load_tokenizer  # noqa: PLC0415

    check(dtype in DTYPES, "dtype", " | ".join(DTYPES), dtype)
    folder = check_model_dir(model_dir, "model")
    tok = load_tokenizer(folder)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, DTYPES[dtype]))
    return model.to(device()).eval(), tok


def generate(model, tokenizer, prompts: Sequence[Messages], spec: GenerationSpec
             ) -> list[list[str]]:
    """spec.num_samples answers per prompt with transformers, batched with left padding."""
    import torch  # noqa: PLC0415

    from prefvec_ds.data.tokenize import render_prompt  # noqa: PLC0415

    tokenizer.padding_side = "left"
    dev = next(model.parameters()).device
    options = dict(max_new_tokens=spec.max_new_tokens, do_sample=spec.do_sample,
                   num_return_sequences=spec.num_samples, pad_token_id=tokenizer.pad_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    if spec.do_sample:
        options.update(temperature=spec.temperature, top_p=spec.top_p, top_k=0)
    out: list[list[str]] = []
    for b, start in enumerate(range(0, len(prompts), spec.batch_size)):
        texts = [render_prompt(tokenizer, p) for p in prompts[start:start + spec.batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True,
                          add_special_tokens=False).to(dev)
        torch.manual_seed(spec.seed + b)
        with torch.no_grad():
            ids = model.generate(**batch, **options)
        answers = tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:],
                                         skip_special_tokens=True)
        answers = [a.strip() for a in answers]
        k = spec.num_samples
        out += [answers[i:i + k] for i in range(0, len(answers), k)]
    return out


def use_vllm(spec: GenerationSpec) -> bool:
    if spec.backend == "transformers":
        return False
    try:
        import vllm  # noqa: F401,PLC0415
    except ImportError:
        if spec.backend == "vllm":
            raise PrefvecError("generation.backend=vllm but vllm is not installed "
                               "(pip install vllm, on a GPU machine)") from None
        return False
    if device() != "cuda":
        if spec.backend == "vllm":
            raise PrefvecError("generation.backend=vllm needs a GPU; none is visible")
        return False
    return True


def free_accelerator_memory() -> None:
    """Give memory of deleted models back to the device. `del model` leaves the blocks in
    torch's caching allocator (reserved, not free): vLLM's start-up check then sees an 8B fp32
    base's 32 GB as used and refuses to start ("Free memory on device ... is less than desired
    GPU memory utilization")."""
    import gc  # noqa: PLC0415

    import torch  # noqa: PLC0415

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def vllm_prompts(tokenizer, prompts: Sequence[Messages]) -> list[dict]:
    """Token-id prompts (vLLM's TokensPrompt) from our own tokenization, the one training and
    the transformers path use (`encode_prompt`: the chat template, no added special tokens).
    Text prompts would be re-tokenized by vLLM with add_special_tokens=True: a second
    <|begin_of_text|> after a Llama-3 template, or a BOS that training never saw."""
    from prefvec_ds.data.tokenize import encode_prompt  # noqa: PLC0415

    return [{"prompt_token_ids": encode_prompt(tokenizer, p)} for p in prompts]


def vllm_engine_args(model_dir: str | Path, options: VllmOptions, seed: int,
                     longest_prompt: int, max_new_tokens: int,
                     default_dtype: str = "auto") -> dict:
    """Keyword arguments of `vllm.LLM` from the config (never vLLM's defaults: see
    VllmOptions). max_model_len 0 -> the longest prompt + max_new_tokens."""
    dtype = options.dtype if options.dtype != "auto" else default_dtype
    return {"model": str(model_dir), "seed": seed,
            "gpu_memory_utilization": options.gpu_memory_utilization,
            "max_model_len": options.max_model_len or longest_prompt + max_new_tokens,
            "enforce_eager": options.enforce_eager,
            "dtype": DTYPES.get(dtype, "auto")}


@contextlib.contextmanager
def vllm_engine(**engine_args):
    """A vLLM engine that gives its GPU memory back on exit: freed memory before it starts,
    shut down (engine core process, model-parallel groups) and collected after, so the next
    model (the sweep loads the same merged folder again for its margins) has the GPU."""
    from vllm import LLM  # noqa: PLC0415

    free_accelerator_memory()
    llm = LLM(**engine_args)
    try:
        yield llm
    finally:
        shutdown_vllm(llm)
        del llm
        free_accelerator_memory()


def shutdown_vllm(llm) -> None:
    """Best-effort teardown across vLLM versions (V1: engine_core.shutdown(); both: the
    model-parallel and distributed groups vLLM made in this process)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    try:
        from vllm.distributed.parallel_state import (  # noqa: PLC0415
            destroy_distributed_environment, destroy_model_parallel)
    except ImportError:
        return
    destroy_model_parallel()
    destroy_distributed_environment()


def sampling_params(spec: GenerationSpec):
    from vllm import SamplingParams  # noqa: PLC0415

    return SamplingParams(n=spec.num_samples, max_tokens=spec.max_new_tokens, seed=spec.seed,
                          temperature=spec.temperature if spec.do_sample else 0.0,
                          top_p=spec.top_p if spec.do_sample else 1.0)


def generate_vllm(model_dir: str | Path, prompts: Sequence[Messages], spec: GenerationSpec
                  ) -> list[list[str]]:
    """The same contract with vLLM (continuous batching; the whole prompt list at once), in an
    engine that lives for this call only."""
    from prefvec_ds.train.stage import load_tokenizer  # noqa: PLC0415

    tok = load_tokenizer(Path(model_dir))
    inputs = vllm_prompts(tok, prompts)
    longest = max((len(x["prompt_token_ids"]) for x in inputs), default=1)
    args = vllm_engine_args(model_dir, spec.vllm, spec.seed, longest, spec.max_new_tokens)
    with vllm_engine(**args) as llm:
        outputs = llm.generate(inputs, sampling_params(spec), use_tqdm=False)
    return [[c.text.strip() for c in o.outputs] for o in outputs]


def generate_from_dir(model_dir: str | Path, prompts: Sequence[Messages], spec: GenerationSpec,
                      dtype: str = "fp32") -> list[list[str]]:
    """Answers of the model in a HF folder, with vLLM when spec.backend allows and it can run."""
    if use_vllm(spec):
        return generate_vllm(model_dir, prompts, spec)
    model, tok = load_policy(model_dir, dtype)
    return generate(model, tok, prompts, spec)
