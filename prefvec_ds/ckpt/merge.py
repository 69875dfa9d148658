"""`prefvec merge`: theta = theta_base + sum_i eta_i * phi_i, streamed to HF sharded safetensors.

Each output tensor is a plan entry (stream.OutputTensor): the base term, then eta_i * phi_i per
vector (a saved vector, or plus/minus rank slices subtracted on the fly). stream.run_plan works
through it in 1M-element chunks: phi is formed and scaled in place and added to the base chunk
where it was read, the chunk is checked for NaN/Inf while in cache, cast, and appended to its
shard, while threads read ahead (coalesced O_DIRECT reads) and compute the next chunks. Peak
memory is set by the pipeline's bounded queues (~0.15-0.2 GB), so it does not grow with the
model (nor with its largest tensor); the output appears only when complete (atomic rename). No
torch import on this path.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

from prefvec_ds import PrefvecError
from prefvec_ds.ckpt.dtypes import CODE_BY_NAME
from prefvec_ds.ckpt.paths import contained
from prefvec_ds.ckpt.methods import (Mix, MethodParams, TopMagnitude, check_params, is_plain_sum,
                                     needs_thresholds)
from prefvec_ds.ckpt.segments import CHUNK_ELEMS, Segment, Term, read_side
from prefvec_ds.ckpt.sources import (DEEPSPEED_KINDS, alias_groups, check_shapes, match_names,
                                     open_source)
from prefvec_ds.ckpt.stream import OutputTensor, run_plan
from prefvec_ds.ckpt.writer import (ShardedSafetensorsWriter, TensorSpec, atomic_output_dir,
                                    parse_size)

# Files in a HF folder that are weights (never copied) rather than config or tokenizer.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _base_plan(base) -> list[str]:
    """Names the merged model will hold: the base's tensors (DeepSpeed: params, tied aliases and
    persistent buffers, since a HF loader may expect each of them)."""
    if base.kind in DEEPSPEED_KINDS:
        return base.names() + list(base.aliases) + list(base.buffers())
    if base.kind != "safetensors":
        raise PrefvecError(f"base {base.path}: a saved vector cannot be a base model")
    return base.names()


def _float_names(base, names: list[str]) -> list[str]:
    if base.kind in DEEPSPEED_KINDS:
        buffers = base.buffers()
        return [n for n in names if n not in buffers or buffers[n].is_floating_point()]
    return [n for n in names if base.is_float(n)]


def _default_dtype(base) -> str:
    if base.kind in DEEPSPEED_KINDS:
        return "fp32"
    counts: dict[str, int] = {}
    for n in base.names():
        if base.is_float(n):
            counts[base.dtype_name(n)] = counts.get(base.dtype_name(n), 0) + 1
    best = max(counts, key=counts.get) if counts else "fp32"
    return best if best in CODE_BY_NAME else "fp32"


def _config_folder(base, config_from: str | Path | None) -> Path | None:
    """Where config/tokenizer files come from: --config-from, the HF base, or for a DeepSpeed base
    the checkpoint folder or its parent (trainers save the HF config beside checkpoints)."""
    if config_from is not None:
        folder = Path(config_from)
        if not (folder / "config.json").is_file():
            raise PrefvecError(f"--config-from {folder}: no config.json there")
        return folder
    if base.kind not in DEEPSPEED_KINDS:
        return base.path
    for folder in (base.path, base.path.parent, base.tag_dir.parent.parent):
        if (folder / "config.json").is_file():
            return folder
    return None


def check_eta(eta) -> float:
    """A finite float, or the one-line error naming --vector (NaN or 1e400 = inf would only
    show up later as NaN/Inf in the result)."""
    value = float(eta)
    if not math.isfinite(value):
        raise PrefvecError(f"--vector: eta {eta!r}: expected a finite number (got "
                           f"{value}), e.g. vecs/helpful=0.5")
    return value


def _copy_config(src: Path | None, dst: Path, dtype: str) -> list[str]:
    """Copy config, generation config, tokenizer files (errors, e.g. a full disk, as one line
    naming the file); set the config's dtype to ours."""
    try:
        return _copy_config_files(src, dst, dtype)
    except OSError as err:
        name = getattr(err, "filename", None) or dst
        raise PrefvecError(f"--out: copying config files from {src} failed at {name}: "
                           f"{err.strerror or err} (nothing was written)") from None
    except ValueError as err:
        raise PrefvecError(f"file {src}/config.json: not valid JSON ({err})") from None


def _config_files(src: Path | None) -> list[Path]:
    """The files _copy_config copies; each must be inside `src` (a link to /etc/passwd must
    not be copied into the output), checked before any work."""
    if src is None:
        return []
    files = [f for f in sorted(src.iterdir())
             if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES)
             and f.name not in _WEIGHT_INDEXES and not f.name.startswith(".")
             and f.name != "latest"]
    return [contained(f, src) for f in files]


def _copy_config_files(src: Path | None, dst: Path, dtype: str) -> list[str]:
    copied = []
    for f in _config_files(src):
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    cfg_path = dst / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        for key in ("torch_dtype", "dtype"):  # transformers 4 reads torch_dtype, 5 reads dtype
            if key in cfg or key == "dtype":
                cfg[key] = _TORCH_DTYPE_NAMES[dtype]
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return copied


def _vector_maps(base, names: list[str], vectors: list) -> list[dict[str, str]]:
    """For each vector: base name -> the vector's name; every vector tensor must be used."""
    maps = []
    for vec, _eta in vectors:
        groups = alias_groups(base, vec)
        mapping = match_names(names, vec, groups, f"base {base.path}", "vector")
        unused = set(vec.names()) - set(mapping.values())
        if unused:
            raise PrefvecError(f"vector {vec.path}: parameter {sorted(unused)[0]}: not in base "
                               f"{base.path} (different architectures?)")
        check_shapes(mapping, base, vec, "base", "vector")
        maps.append(mapping)
    return maps


def _ordered(names: list[str], vectors: list, maps: list[dict[str, str]]) -> list[str]:
    """Follow the first vector's storage order: for ZeRO-3 inputs that is flat order, so every
    rank file is read front to back (sequential I/O) instead of hopping around."""
    if not vectors:
        return names
    rank = {n: i for i, n in enumerate(vectors[0][0].names())}
    return sorted(names, key=lambda n: rank.get(maps[0].get(n), len(rank)))


def _buffer_segments(name: str, tensor) -> tuple:
    """A DeepSpeed base's persistent buffer (full in a model-states file) as one segment."""
    if not tensor.is_contiguous():
        raise PrefvecError(f"file {tensor.file}: buffer {name}: not contiguous")
    return (Segment(0, tensor.numel(), tensor.dtype, tensor.file, tensor.offset,
                    tensor.record),)


def _plan(base_src, order, floats, vectors, maps, code: str, out,
          method=("task_arithmetic", MethodParams())) -> tuple[list, list]:
    """(writer specs, stream plan) for every output tensor, in writing order."""
    owner = {**base_src.aliases}
    buffers = base_src.buffers() if base_src.kind in DEEPSPEED_KINDS else {}
    specs, plan = [], []
    for name in order:
        if name in buffers:
            shape, segs = tuple(buffers[name].shape), _buffer_segments(name, buffers[name])
            terms, stored = [Term(segs)], buffers[name].dtype
        else:
            shape = tuple(base_src.shape(owner.get(name, name)))
            terms = base_src.terms(owner.get(name, name), 1.0)
            stored = base_src.dtype_code(name) if base_src.kind not in DEEPSPEED_KINDS else "F32"
        numel = math.prod(shape)
        if name not in floats:  # integer/bool buffers pass through untouched
            specs.append(TensorSpec(name, shape, stored))
            plan.append(OutputTensor(name, numel, stored, tuple(terms), raw=True))
            continue
        ids = []
        for k, ((vec, eta), mapping) in enumerate(zip(vectors, maps)):
            if eta != 0.0:
                terms += vec.terms(mapping[name], float(eta))
                ids.append(k)
        specs.append(TensorSpec(name, shape, code))
        plan.append(OutputTensor(name, numel, code, tuple(terms),
                                 label=f"merged model {out}, parameter {name}",
                                 mix=_mix_of(method, numel, terms[1:], ids)))
    return specs, plan


def _mix_of(method, numel: int, vector_terms: list, ids: list) -> Mix | None:
    """None for the plain sum (the fused fast path), else the method's Mix for the tensor."""
    name, params = method
    if is_plain_sum(name, params) or not vector_terms:
        return None
    if len(vector_terms) != len(ids):
        raise PrefvecError(f"merge method {name}: each vector must be one term")
    thresholds = ()
    if needs_thresholds(name, params):
        thresholds = tuple(_trim_threshold(t, numel, params.density) for t in vector_terms)
    return Mix(name, params, tuple(ids), thresholds)


def _trim_threshold(term: Term, numel: int, density: float) -> int:
    """TopMagnitude of (plus - minus) over the whole tensor, read in chunks (one or two
    passes: the trim's cost is these extra reads of the vectors, never a gathered tensor)."""
    top = TopMagnitude(numel, density)
    while True:
        for c0 in range(0, numel, CHUNK_ELEMS):
            c1 = min(numel, c0 + CHUNK_ELEMS)
            bufs = [np.empty(c1 - c0, np.float32) for _ in term.sides()]
            for segs, buf in zip(term.sides(), bufs):
                read_side(segs, c0, c1, buf)
            if term.minus is not None:
                np.subtract(bufs[0], bufs[1], out=bufs[0])
            top.feed(bufs[0])
        if not top.end_pass():
            return top.threshold()


def _inputs(base, vectors: list, config_from) -> list[tuple[str, object]]:
    """(role, folder) of everything a merge reads, for the output-location check."""
    found = [("--base", base), ("--config-from", config_from)]
    for vec, _eta in vectors:
        sides = (vec.plus, vec.minus) if hasattr(vec, "plus") else (vec,)
        found += [("--vector", side.path) for side in sides]
    return found


def merge_vectors(base: str | Path, vectors: list[tuple[object, float]], out: str | Path,
                  dtype: str | None = None, max_shard_size: str | int = "5GB", workers: int = 2,
                  overwrite: bool = False, config_from: str | Path | None = None,
                  method: str = "task_arithmetic", params: MethodParams | None = None) -> dict:
    """Write base + sum eta * phi as a HF folder (or the merge `method` of the vectors, see
    ckpt/methods.py). `vectors`: [(opened source, eta)]."""
    params = params or MethodParams()
    try:
        check_params(method, params)
    except ValueError as err:
        raise PrefvecError(f"merge: {err}") from None
    for _vec, eta in vectors:
        check_eta(eta)
    base_src = open_source(base, "base")
    names = _base_plan(base_src)
    floats = set(_float_names(base_src, names))
    maps = _vector_maps(base_src, sorted(floats), vectors)
    order = _ordered(names, vectors, maps)
    dtype = dtype or _default_dtype(base_src)
    cfg_src = _config_folder(base_src, config_from)
    if cfg_src is None:
        raise PrefvecError(f"base {base}: no config.json in the checkpoint folder or its parent; "
                           "pass --config-from HF_FOLDER so the merged model is loadable")
    _config_files(cfg_src)
    specs, plan = _plan(base_src, order, floats, vectors, maps, CODE_BY_NAME[dtype], out,
                        (method, params))
    with atomic_output_dir(Path(out), overwrite, inputs=_inputs(base, vectors, config_from),
                           param="--out") as tmp:
        with ShardedSafetensorsWriter(tmp, specs, parse_size(max_shard_size),
                                      direct=True) as writer:
            run_plan(plan, writer, workers, desc="merge")
        copied = _copy_config(cfg_src, tmp, dtype)
    return {"out": str(out), "dtype": dtype, "tensors": len(specs), "copied": copied,
            "bytes": sum(s.nbytes for s in specs), "method": method}
