"""safe-rlhf score models (beaver-7b reward / cost) -> HF `LlamaForSequenceClassification`.

The source format (PKU-Alignment/safe-rlhf, safe_rlhf/models/score_model/: `ScoreModelMixin`
and `llama/modeling_llama.py` `LlamaForScore`):
- config.json: a Llama config with architectures ["LlamaForScore"] plus score_dim (1), bias
  (False), score_type (reward | cost | critic), do_normalize, normalizer_type, momentum, mean,
  var;
- weights (sharded safetensors, or pytorch_model*.bin from `save_pretrained` / zero_to_fp32):
  the backbone `model.*` (a LlamaModel), `score_head.weight` [score_dim, hidden] (and
  `score_head.bias` when bias), the normalizer's buffers `normalizer.{mean,var,count}`;
- a sequence's score (`end_scores`) = score_head(the last hidden state at its last attended
  token), normalised when do_normalize (reward: affine, (x - mean) / (std + 1e-8); cost: scale,
  x / (std + 1e-8); critic: identity).
HF's LlamaForSequenceClassification has the same backbone under `model.*` and a bias-free
`score` Linear(hidden, num_labels) read at the last non-pad token. So `model.*` is copied byte
for byte, `score_head.weight` becomes `score.weight` (with a scale normalisation folded in),
the normalizer buffers, any `lm_head` and old
`rotary_emb.inv_freq` buffers are dropped. A non-zero head bias or an affine
normalisation with a non-zero mean has no place in the HF head and is refused.

Tensors stream one at a time (safetensors headers / the allow-list unpickler give names,
shapes and byte offsets; ckpt.writer writes the shards), so memory stays at one tensor (the
largest: 32000 x 4096 bf16 embeddings, 262 MB); output is atomic (ckpt.writer.atomic_output_dir).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

from prefvec_ds import PrefvecError
from prefvec_ds.ckpt.dtypes import ITEMSIZE, NUMPY, narrow_into, widen_into
from prefvec_ds.ckpt.writer import ShardedSafetensorsWriter, TensorSpec, atomic_output_dir

SCORE_KEYS = ("score_dim", "bias", "score_type", "do_normalize", "normalizer_type", "momentum",
              "mean", "var")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
SIDE_FILE = "safe_rlhf_score.json"
EPSILON = 1e-8  # safe-rlhf Normalizer.normalize's epsilon


class _Weights:
    """name -> (shape, dtype code) and flat reads of one tensor, from safetensors or .bin."""

    def __init__(self, folder: Path):
        self.folder = folder
        if list(folder.glob("*.safetensors")):
            from prefvec_ds.ckpt.safetensors_io import SafetensorsFolder  # noqa: PLC0415

            src = SafetensorsFolder(folder)
            self.specs = {n: (src.shape(n), src.dtype_code(n)) for n in src.names()}
            self._read = src.read_array
        else:
            self._stored = self._open_bins(folder)
            self.specs = {n: (tuple(t.shape), t.dtype) for n, t in self._stored.items()}
            self._read = lambda name: self._stored[name].numpy().reshape(-1)

    @staticmethod
    def _open_bins(folder: Path) -> dict:
        from prefvec_ds.ckpt.safe_load import StoredTensor, load_pickle_file  # noqa: PLC0415

        index = folder / "pytorch_model.bin.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) \
            if index.is_file() else sorted(p.name for p in folder.glob("*.bin"))
        if not files:
            raise PrefvecError(f"safe-rlhf model {folder}: no *.safetensors or pytorch_model*.bin "
                               "weights")
        stored = {}
        for name in files:
            state = load_pickle_file(folder / name, "a safe-rlhf score model state dict")
            stored.update({k: v for k, v in state.items() if isinstance(v, StoredTensor)})
        return stored

    def read(self, name: str) -> np.ndarray:
        return self._read(name)


def read_score_config(folder: Path) -> dict:
    """The source config.json, checked to be a safe-rlhf Llama score model."""
    path = folder / "config.json"
    if not path.is_file():
        raise PrefvecError(f"safe-rlhf model {folder}: no config.json (expected the folder of "
                           "a LlamaForScore model, e.g. beaver-7b-unified-reward)")
    config = json.loads(path.read_text())
    if config.get("architectures") != ["LlamaForScore"] or config.get("model_type") != "llama":
        raise PrefvecError(f"file {path}: architectures {config.get('architectures')}, "
                           f"model_type {config.get('model_type')!r}: expected a safe-rlhf "
                           "LlamaForScore (model_type llama)")
    if config.get("score_dim", 1) != 1:
        raise PrefvecError(f"file {path}: parameter score_dim: expected 1 (one scalar score), "
                           f"got {config['score_dim']}")
    return config


def head_scale(config: dict) -> float:
    """What the HF head must be multiplied by to give safe-rlhf's (normalised) end_scores."""
    if not config.get("do_normalize", False):
        return 1.0
    kind = {"reward": "affine", "cost": "scale"}.get(config.get("score_type", "reward"),
                                                     "identity")
    mean = float((config.get("mean") or [0.0])[0])
    std = math.sqrt(float((config.get("var") or [1.0])[0]))
    if kind == "affine" and mean != 0.0:
        raise PrefvecError(f"safe-rlhf config: do_normalize with an affine normalisation (mean "
                           f"{mean}) needs a score bias, which LlamaForSequenceClassification "
                           "has not; convert a copy with do_normalize false (raw scores rank "
                           "the same)")
    return 1.0 if kind == "identity" else 1.0 / (std + EPSILON)


def plan(weights: _Weights, source: Path) -> list[tuple[str, str, TensorSpec]]:
    """(source name, target name, target spec) in source order; refuses what cannot map."""
    out = []
    for name, (shape, dtype) in weights.specs.items():
        if name.startswith("model."):
            out.append((name, name, TensorSpec(name, shape, dtype)))
        elif name == "score_head.weight":
            out.append((name, "score.weight", TensorSpec("score.weight", shape, dtype)))
        elif name == "score_head.bias":
            if np.any(_as_fp32(weights.read(name), dtype) != 0):
                raise PrefvecError(f"safe-rlhf model {source}: score_head.bias is not zero; "
                                   "LlamaForSequenceClassification's score head has no bias")
        elif not (name.startswith("normalizer.") or name == "lm_head.weight"
                  or name.endswith("rotary_emb.inv_freq")):  # a buffer transformers<4.31 saved
            raise PrefvecError(f"safe-rlhf model {source}: unexpected tensor {name} (expected "
                               "model.*, score_head.*, normalizer.*)")
    if "score.weight" not in [t for _, t, _ in out]:
        raise PrefvecError(f"safe-rlhf model {source}: no score_head.weight tensor")
    return out


def _as_fp32(flat: np.ndarray, dtype: str) -> np.ndarray:
    out = np.empty(flat.size, dtype=np.float32)
    widen_into(flat.view(np.uint8), dtype, out)
    return out


def _scaled(flat: np.ndarray, dtype: str, scale: float) -> np.ndarray:
    """The head times `scale`, computed in fp32, stored back in its own dtype."""
    values = _as_fp32(flat, dtype) * np.float32(scale)
    out = np.empty(flat.size * ITEMSIZE[dtype], dtype=np.uint8)
    narrow_into(values, dtype, out)
    return out.view(NUMPY[dtype])


def hf_config(config: dict) -> dict:
    """The LlamaForSequenceClassification config.json: the Llama fields, one label."""
    out = {k: v for k, v in config.items() if k not in SCORE_KEYS}
    out.update(architectures=["LlamaForSequenceClassification"], id2label={"0": "LABEL_0"},
               label2id={"LABEL_0": 0}, problem_type="regression")
    return out


def convert_safe_rlhf(source: Path, out: Path, max_shard_bytes: int = 5 * 10**9,
                      overwrite: bool = False) -> dict:
    """Write `out`; returns {tensors, score_type, scale}."""
    source, out = Path(source), Path(out)
    config = read_score_config(source)
    scale = head_scale(config)
    weights = _Weights(source)
    steps = plan(weights, source)
    with atomic_output_dir(out, overwrite, inputs=[("safe-rlhf model", source)]) as tmp:
        with ShardedSafetensorsWriter(tmp, [s for _, _, s in steps], max_shard_bytes) as writer:
            for name, target, spec in steps:
                flat = weights.read(name)
                if target == "score.weight" and scale != 1.0:
                    flat = _scaled(flat, spec.dtype, scale)
                writer.append(target, np.ascontiguousarray(flat))
        (tmp / "config.json").write_text(json.dumps(hf_config(config), indent=2))
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
        side = {"source": str(source), "score_head_scale": scale,
                **{k: config[k] for k in SCORE_KEYS if k in config}}
        (tmp / SIDE_FILE).write_text(json.dumps(side, indent=2))
    return {"tensors": len(steps), "score_type": config.get("score_type", "reward"),
            "scale": scale}
