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
from prefvec_ds.ckpt.dtypes import CODE_BY_NAME
from prefvec_ds.ckpt.sources import VECTOR_FORMAT, VECTOR_MANIFEST, DiffSource, open_source
from prefvec_ds.ckpt.stream import OutputTensor, run_plan
from prefvec_ds.ckpt.writer import (ShardedSafetensorsWriter, TensorSpec, atomic_output_dir,
                                    parse_size)

VECTOR_DTYPES = ("fp32", "bf16")


def _numel(shape) -> int:
    return math.prod(int(d) for d in shape)


def compute_vector(plus: str | Path, minus: str | Path, out: str | Path, dtype: str = "fp32",
                   max_shard_size: str | int = "5GB", workers: int = 2,
                   overwrite: bool = False) -> dict:
    """Write phi = plus - minus to the vector folder `out`; return its manifest.

    plus/minus: DeepSpeed ZeRO-1/2/3 checkpoint folders (with `latest`, or a tag folder) or HF
    folders.
    Memory: the bounded read-ahead and job queues of stream.run_plan (~0.15-0.2 GB), whatever
    the model size.
    """
    if dtype not in VECTOR_DTYPES:
        raise PrefvecError(f"--dtype {dtype}: expected one of {', '.join(VECTOR_DTYPES)}")
    diff = DiffSource(open_source(plus, "plus"), open_source(minus, "minus"))
    code = CODE_BY_NAME[dtype]
    names = diff.names()
    specs = [TensorSpec(n, tuple(diff.shape(n)), code) for n in names]
    plan = [OutputTensor(n, _numel(diff.shape(n)), code, tuple(diff.terms(n, 1.0)),
                         label=f"vector {plus} - {minus}, parameter {n}") for n in names]
    started = time.perf_counter()
    with atomic_output_dir(Path(out), overwrite, inputs=[("--plus", plus), ("--minus", minus)],
                           param="--out") as tmp:
        with ShardedSafetensorsWriter(tmp, specs, parse_size(max_shard_size),
                                      {"prefvec": VECTOR_FORMAT}, direct=True) as writer:
            sq_norm = run_plan(plan, writer, workers, norms=True, desc="vector")
        manifest = {
            "format": VECTOR_FORMAT, "version": 1, "dtype": dtype,
            "plus": str(plus), "minus": str(minus), "aliases": diff.aliases,
            "fast_flat_path": diff.fast, "num_tensors": len(names),
            "num_elements": sum(_numel(s.shape) for s in specs), "norm": math.sqrt(sq_norm),
            "prefvec_version": __version__, "seconds": round(time.perf_counter() - started, 3),
        }
        (tmp / VECTOR_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
