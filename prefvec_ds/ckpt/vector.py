"""`prefvec vector`: phi = theta_plus - theta_minus, written as a vector artifact.

Vector folder format (version 1):
    prefvec_vector.json              manifest: format, version, dtype, plus, minus, aliases
                                     (tied alias -> stored owner), num_tensors, num_elements,
                                     norm (total L2), prefvec_version
    model.safetensors                phi by parameter name (HF names), or when larger than
    model-0000k-of-0000N.safetensors --max-shard-size: shards + model.safetensors.index.json
Tied weights are stored once (under the name the plus checkpoint stores them under) and listed
in `aliases`; frozen parameters are included (their phi is usually exactly 0).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from prefvec_ds import PrefvecError, __version__
from prefvec_ds.ckpt.sources import VECTOR_FORMAT, VECTOR_MANIFEST, DiffSource, open_source
from prefvec_ds.ckpt.segments import FDS, accumulate, chunked_dot, prefetch_segments
from prefvec_ds.ckpt.stream import ordered_map, progress, single_threaded_kernels
from prefvec_ds.ckpt.writer import (DTYPES_BY_NAME, ShardedSafetensorsWriter, TensorSpec,
                                    atomic_output_dir, parse_size)

VECTOR_DTYPES = ("fp32", "bf16")


def _numel(shape) -> int:
    return math.prod(int(d) for d in shape)


def compute_vector(plus: str | Path, minus: str | Path, out: str | Path, dtype: str = "fp32",
                   max_shard_size: str | int = "5GB", workers: int = 1,
                   overwrite: bool = False) -> dict:
    """Write phi = plus - minus to the vector folder `out`; return its manifest.

    plus/minus: ZeRO-3 checkpoint folders (with `latest`, or a tag folder) or HF folders.
    Memory: (workers + 1) fp32 tensors of the largest parameter; nothing else is held.
    """
    import torch

    if dtype not in VECTOR_DTYPES:
        raise PrefvecError(f"--dtype {dtype}: expected one of {', '.join(VECTOR_DTYPES)}")
    diff = DiffSource(open_source(plus, "plus"), open_source(minus, "minus"))
    torch_dtype = DTYPES_BY_NAME[dtype]
    names = diff.names()
    specs = [TensorSpec(n, tuple(diff.shape(n)), torch_dtype) for n in names]
    sq_norm = 0.0
    started = time.perf_counter()

    def build(name: str):
        terms = diff.terms(name, 1.0)
        prefetch_segments([seg for segs, _ in terms for seg in segs])
        buf = torch.empty(_numel(diff.shape(name)), dtype=torch.float32)
        accumulate(buf, terms, check=f"vector {plus} - {minus}, parameter {name}")
        return buf

    try:
        with single_threaded_kernels(), atomic_output_dir(Path(out), overwrite) as tmp:
            with ShardedSafetensorsWriter(tmp, specs, parse_size(max_shard_size),
                                          {"prefvec": VECTOR_FORMAT}) as writer, \
                    progress(sum(s.nbytes for s in specs), "vector") as bar:
                for name, buf in ordered_map(build, names, workers):
                    sq_norm += chunked_dot(buf, buf)
                    writer.write(name, buf.view(diff.shape(name)).to(torch_dtype))
                    bar.update(buf.numel() * torch_dtype.itemsize)
            manifest = {
                "format": VECTOR_FORMAT, "version": 1, "dtype": dtype,
                "plus": str(plus), "minus": str(minus), "aliases": diff.aliases,
                "fast_flat_path": diff.fast, "num_tensors": len(names),
                "num_elements": sum(_numel(s.shape) for s in specs), "norm": math.sqrt(sq_norm),
                "prefvec_version": __version__, "seconds": round(time.perf_counter() - started, 3),
            }
            (tmp / VECTOR_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    finally:
        FDS.close()  # also after errors: a cached fd must not outlive its file
    return manifest
