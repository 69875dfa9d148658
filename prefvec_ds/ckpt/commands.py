"""`prefvec vector`, `prefvec merge`, `prefvec vector-stats`: argparse wiring only.

The handlers never import torch (nor transformers): checkpoints are read by our own allow-listed
unpickler and the arithmetic is numpy, so a merge starts in ~0.2 s instead of ~3 s.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from prefvec_ds import PrefvecError
from prefvec_ds.atomic import signals_raise


def _workers(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("expected a positive number of workers")
    return n


def _vector_eta(text: str) -> tuple[str, float]:
    """'VEC=ETA' or 'PLUS,MINUS=ETA' (ETA defaults to 1.0 when '=ETA' is left out)."""
    vec, sep, eta = text.rpartition("=")
    if not sep:
        return text, 1.0
    try:
        value = float(eta)
    except ValueError:
        raise PrefvecError(f"--vector {text}: expected VEC=ETA with ETA a number, e.g. "
                           "vecs/helpful=0.5") from None
    if not math.isfinite(value):  # nan, inf, and 1e400 (which float() reads as inf)
        raise PrefvecError(f"--vector {text}: eta {eta!r} is not a finite number; expected e.g. "
                           "vecs/helpful=0.5")
    return vec, value


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vector", help="phi = plus - minus, straight from ZeRO shards",
                       description="Compute a preference vector phi = theta_plus - theta_minus "
                       "from two DeepSpeed ZeRO-1/2/3 checkpoints (or HF folders), streaming, and "
                       "save it as a vector folder (safetensors + prefvec_vector.json).")
    p.add_argument("--plus", required=True, help="checkpoint of the + run (folder with `latest`, "
                   "a tag folder, or a HF model folder)")
    p.add_argument("--minus", required=True, help="checkpoint of the - run")
    p.add_argument("--out", required=True, help="vector folder to write")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--max-shard-size", default="5GB", help="e.g. 500MB, 5GB")
    p.add_argument("--workers", type=_workers, default=2,
                   help="reader threads, and as many arithmetic threads (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run_vector)

    p = sub.add_parser("merge", help="theta_base + sum eta*phi -> HF sharded safetensors",
                       description="Merge preference vectors into a base model, one tensor at a "
                       "time, and write a HF folder (safetensors shards + index + config + "
                       "tokenizer copied from the base).")
    p.add_argument("--base", required=True, help="HF model folder or ZeRO-1/2/3 checkpoint")
    p.add_argument("--vector", action="append", required=True, metavar="VEC=ETA",
                   help="a vector folder, or PLUS_CKPT,MINUS_CKPT to subtract on the fly; "
                   "repeat for several vectors; ETA defaults to 1")
    p.add_argument("--out", required=True, help="output HF folder")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="output dtype (default: the base's)")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--config-from", default=None, help="HF folder to copy config/tokenizer from "
                   "(default: the base, or beside a DeepSpeed checkpoint base)")
    p.add_argument("--workers", type=_workers, default=2,
                   help="reader threads, and as many arithmetic threads (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--method", default="task_arithmetic",
                   choices=["task_arithmetic", "ties", "dare", "dare_ties"],
                   help="how the vectors combine (docs/checkpoints-and-merging.md); default: "
                   "base + lambda * sum eta*phi")
    p.add_argument("--density", type=float, default=1.0,
                   help="ties/dare: fraction of each vector's values kept (default 1)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="divide by the summed eta of the vectors that contribute to each value "
                   "(default: on for ties and dare_ties, off otherwise, as mergekit)")
    p.add_argument("--lambda", dest="lam", type=float, default=1.0,
                   help="scale of the combined vectors (default 1)")
    p.add_argument("--seed", type=int, default=0, help="dare: the drop seed (default 0)")
    p.set_defaults(func=run_merge)

    p = sub.add_parser("vector-stats", help="norms per layer and cosine between vectors",
                       description="Per-layer and total L2 norms of each vector and the cosine "
                       "similarity between every pair, computed streaming.")
    p.add_argument("vectors", nargs="+", metavar="VEC", help="vector folders (or PLUS,MINUS)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    p.set_defaults(func=run_vector_stats)


def run_vector(args) -> int:
    from prefvec_ds.ckpt.vector import compute_vector

    with signals_raise():  # SIGTERM removes the temporary output like Ctrl-C does
        m = compute_vector(args.plus, args.minus, args.out, dtype=args.dtype,
                           max_shard_size=args.max_shard_size, workers=args.workers,
                           overwrite=args.overwrite)
    print(f"wrote vector {args.out}: {m['num_tensors']} tensors, {m['num_elements']:,} values, "
          f"norm {m['norm']:.6g} ({'flat fast path' if m['fast_flat_path'] else 'named ranges'}, "
          f"{m['seconds']:.2f} s)")
    return 0


def run_merge(args) -> int:
    from prefvec_ds.ckpt.merge import merge_vectors
    from prefvec_ds.ckpt.sources import open_vector_arg

    etas = [_vector_eta(v) for v in args.vector]  # all parsed before any folder is opened
    with signals_raise():
        vectors = [(open_vector_arg(vec), eta) for vec, eta in etas]
        info = merge_vectors(args.base, vectors, args.out, dtype=args.dtype,
                             max_shard_size=args.max_shard_size, workers=args.workers,
                             overwrite=args.overwrite, config_from=args.config_from,
                             method=args.method, params=_method_params(args))
    print(f"wrote {args.out}: {info['tensors']} tensors, {info['bytes'] / 1e9:.3f} GB "
          f"{info['dtype']} ({info['method']}); copied "
          f"{', '.join(info['copied']) or 'no config files'}")
    return 0


def _method_params(args):
    from prefvec_ds.ckpt.methods import MERGE_METHODS, MethodParams

    normalize = (MERGE_METHODS[args.method].normalize_default if args.normalize is None
                 else args.normalize)
    return MethodParams(density=args.density, normalize=normalize, lam=args.lam, seed=args.seed)


def run_vector_stats(args) -> int:
    from prefvec_ds.ckpt.stats import format_stats, vector_stats

    from prefvec_ds.atomic import write_text_atomic  # noqa: PLC0415

    if args.json:  # before minutes of reading: the folder must exist, the name be free to use
        check_json_target(args.json)
    stats = vector_stats(args.vectors)
    print(format_stats(stats))
    if args.json:
        text = json.dumps(stats, indent=2, allow_nan=False)  # stats() leaves no NaN/Inf
        try:
            write_text_atomic(args.json, text + "\n")
        except OSError as err:
            raise PrefvecError(f"--json {args.json}: cannot be written "
                               f"({err.strerror or err})") from None
    sys.stdout.flush()
    return 0


def check_json_target(path: str) -> None:
    """--json FILE: its folder must exist and be writable, and FILE must not be a folder."""
    import os  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    target = Path(path)
    folder = target.parent
    if not folder.is_dir():
        raise PrefvecError(f"--json {path}: folder {folder} does not exist "
                           f"({'it is a file' if folder.exists() else 'create it first'})")
    if target.is_dir():
        raise PrefvecError(f"--json {path}: is a folder, expected a file name")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PrefvecError(f"--json {path}: cannot write in {folder} (permission denied or "
                           "read-only file system)")
