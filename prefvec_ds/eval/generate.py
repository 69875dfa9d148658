"""Answers of a policy to a prompt set: batched, greedy or sampled, N samples per prompt.

Two back ends with one contract (`list[list[str]]`: per prompt, its samples in order):
- transformers `generate`, for a model already in memory (the eta sweep applies vectors in place
  on one loaded base, so no model is written per grid point) or loaded from a folder;
- vLLM, for a model folder when vLLM is installed and a GPU is present (`backend: auto`).

Sampling is reproducible: every batch reseeds from (spec.seed, batch index), so the answers do
not depend on what ran before in the process (the sweep's points stay comparable).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from prefvec_ds import PrefvecError
from prefvec_ds.config.checks import check
# the spec is a config section (pipeline.eval.generation, mora.selfplay...): it lives with the
# config dataclasses and is re-exported here, where it is used
from prefvec_ds.config.evaluation import BACKENDS, GenerationSpec  # noqa: F401
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


def generate_vllm(model_dir: str | Path, prompts: Sequence[Messages], spec: GenerationSpec
                  ) -> list[list[str]]:
    """The same contract with vLLM (continuous batching; the whole prompt list at once)."""
    from vllm import LLM, SamplingParams  # noqa: PLC0415

    from prefvec_ds.data.tokenize import render_prompt  # noqa: PLC0415
    from prefvec_ds.train.stage import load_tokenizer  # noqa: PLC0415

    tok = load_tokenizer(Path(model_dir))
    llm = LLM(model=str(model_dir), seed=spec.seed)
    params = SamplingParams(n=spec.num_samples, max_tokens=spec.max_new_tokens, seed=spec.seed,
                            temperature=spec.temperature if spec.do_sample else 0.0,
                            top_p=spec.top_p if spec.do_sample else 1.0)
    outputs = llm.generate([render_prompt(tok, p) for p in prompts], params)
    return [[c.text.strip() for c in o.outputs] for o in outputs]


def generate_from_dir(model_dir: str | Path, prompts: Sequence[Messages], spec: GenerationSpec,
                      dtype: str = "fp32") -> list[list[str]]:
    """Answers of the model in a HF folder, with vLLM when spec.backend allows and it can run."""
    if use_vllm(spec):
        return generate_vllm(model_dir, prompts, spec)
    model, tok = load_policy(model_dir, dtype)
    return generate(model, tok, prompts, spec)
