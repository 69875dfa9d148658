"""The in-process stages: `vectors/<p>` and `merge/<name>` as typed calls of the checkpoint
tools (`compute_vector`, `merge_vectors`), with the exact floats the stage fingerprint records.

A merge stage's etas go to merge_vectors as floats: printing them into an argv (`:g`) once
wrote eta 0.6666667 as 0.666667 while the fingerprint recorded the full value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefvec_ds.atomic import signals_raise
from prefvec_ds.ckpt.methods import MethodParams
from prefvec_ds.config.layout import RunLayout, merge_etas, seed_key, split_seed
from prefvec_ds.config.schema import RunConfig
from prefvec_ds.pipeline.dag import Stage


@dataclass(frozen=True)
class VectorCall:
    """phi = plus - minus, written to `out` (replacing an earlier attempt's output)."""

    plus: Path
    minus: Path
    out: Path


@dataclass(frozen=True)
class MergeCall:
    """theta_base + sum eta * phi, written to `out` as a HF folder."""

    base: Path
    vectors: tuple[tuple[Path | tuple[Path, Path], float], ...]
    """(vector, eta), eta exactly as configured; a vector is a folder written by a vectors
    stage, or (plus, minus) checkpoints subtracted on the fly."""
    out: Path
    dtype: str | None
    """Output dtype; None keeps theta_base's (pipeline.merge_dtype: base)."""
    method: str = "task_arithmetic"
    """Merge method of ckpt/methods.py (pipeline.merges[].method)."""
    params: MethodParams = MethodParams()
    """Its knobs (density, normalize, lambda, seed)."""


def vector_call(cfg: RunConfig, stage: Stage) -> VectorCall:
    lay = RunLayout.of(cfg)
    pref, seed = split_seed(stage.key)
    return VectorCall(plus=lay.dpo_ckpt(seed_key(f"{pref}+", seed)),
                      minus=lay.dpo_ckpt(seed_key(f"{pref}-", seed)), out=lay.vectors(stage.key))


def merge_call(cfg: RunConfig, stage: Stage) -> MergeCall:
    from prefvec_ds.train.stage import base_model_dir  # noqa: PLC0415

    lay = RunLayout.of(cfg)
    eta = merge_etas(cfg)[stage.key]
    merge = next(m for m in cfg.pipeline.merges if m.name == stage.key)
    dtype = None if cfg.pipeline.merge_dtype == "base" else cfg.pipeline.merge_dtype
    return MergeCall(base=base_model_dir(cfg, must_exist=False),
                     vectors=tuple((lay.vectors(p), value) for p, value in eta.items()),
                     out=lay.merged(stage.key), dtype=dtype, method=merge.method,
                     params=merge.params())


def run_vector(call: VectorCall) -> None:
    from prefvec_ds.ckpt.vector import compute_vector  # noqa: PLC0415

    with signals_raise():  # SIGTERM removes the temporary output like Ctrl-C does
        m = compute_vector(call.plus, call.minus, call.out, overwrite=True)
    print(f"[prefvec] wrote vector {call.out}: {m['num_tensors']} tensors, norm {m['norm']:.6g}",
          flush=True)


def run_merge(call: MergeCall) -> None:
    from prefvec_ds.ckpt.merge import merge_vectors  # noqa: PLC0415
    from prefvec_ds.ckpt.sources import DiffSource, open_source, open_vector_arg  # noqa: PLC0415

    def opened(vector):
        if isinstance(vector, tuple):
            return DiffSource(open_source(vector[0], "plus"), open_source(vector[1], "minus"))
        return open_vector_arg(str(vector))

    with signals_raise():
        vectors = [(opened(vector), eta) for vector, eta in call.vectors]
        info = merge_vectors(call.base, vectors, call.out, dtype=call.dtype, overwrite=True,
                             method=call.method, params=call.params)
    print(f"[prefvec] wrote {call.out}: {info['tensors']} tensors, {info['dtype']} "
          f"({info['method']})", flush=True)


def baseline_merge_call(cfg: RunConfig, stage: Stage) -> MergeCall:
    """A merged baseline: theta_base + sum w_p (theta_p+ - theta_base); each term is read as
    the + checkpoint minus theta_base, streamed, never gathered."""
    from prefvec_ds.pipeline.baselines import soup_etas  # noqa: PLC0415
    from prefvec_ds.train.stage import base_model_dir  # noqa: PLC0415

    lay = RunLayout.of(cfg)
    base = base_model_dir(cfg, must_exist=False)
    dtype = None if cfg.pipeline.merge_dtype == "base" else cfg.pipeline.merge_dtype
    return MergeCall(base=base, out=lay.baseline_model(stage.key), dtype=dtype,
                     vectors=tuple(((lay.dpo_ckpt(f"{pref}+"), base), w)
                                   for pref, w in soup_etas(cfg, stage.key).items()))


def run_arithmetic(cfg: RunConfig, stage: Stage) -> None:
    """Run a `vectors`, `merge` or `baseline_merge` stage in this process."""
    if stage.kind == "vectors":
        run_vector(vector_call(cfg, stage))
    elif stage.kind == "merge":
        run_merge(merge_call(cfg, stage))
    else:
        run_merge(baseline_merge_call(cfg, stage))
