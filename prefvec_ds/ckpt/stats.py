"""`prefvec vector-stats`: norms per layer and in total, and cosines between vectors, streaming.

One tensor per vector is in memory at a time; dot products are fp32 per 1M-element chunk and
summed in fp64 (Python floats), because a 8B-param vector's squared norm is a sum of 8e9 terms
(one fp32 accumulation lost 1e-4 relative already on a 131M-element embedding). The paper's
reference figures: cosine across seeds 0.998-0.999, cos(helpful, harmless) ~0.34-0.40.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict

import numpy as np

from prefvec_ds import PrefvecError
from prefvec_ds.ckpt import crc
from prefvec_ds.ckpt.segments import FDS, chunked_dot
from prefvec_ds.ckpt.sources import alias_groups, match_names, open_vector_arg

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_key(name: str) -> str:
    """'model.layers.7.mlp.up_proj.weight' -> 'layer 7'; others keep their module name."""
    m = _LAYER.search(name)
    if m:
        return f"layer {int(m.group(1))}"
    return name.removesuffix(".weight").removesuffix(".bias")


def vector_stats(paths: list[str]) -> dict:
    """{'vectors': [...], 'layers': {layer: [norm per vector]}, 'total': [norm per vector],
    'cosine': [[...]] (k x k), 'tensors': n}. Vectors are matched by name via tied aliases."""
    if not paths:
        raise PrefvecError("vector-stats: expected at least one vector")
    vecs = [open_vector_arg(p) for p in paths]
    first = vecs[0]
    maps = [match_names(first.names(), v, alias_groups(first, v), f"vector {first.path}",
                        "vector") for v in vecs]
    for v, mapping in zip(vecs[1:], maps[1:]):
        for name, other in mapping.items():
            if tuple(first.shape(name)) != tuple(v.shape(other)):
                raise PrefvecError(f"vector {v.path}: parameter {other}: shape "
                                   f"{list(v.shape(other))}, expected {list(first.shape(name))}")
    crc.TRACKER.clear()
    try:
        dots, layers = _accumulate_dots(vecs, maps)
        crc.TRACKER.verify()  # every rank-file record read (PLUS,MINUS pairs) was intact
    finally:
        FDS.close()
    k = len(vecs)
    total = [math.sqrt(dots[i][i]) for i in range(k)]
    # a zero vector has no direction: its cosines are None (JSON null, "n/a"), never NaN
    cosine = [[dots[i][j] / (total[i] * total[j]) if total[i] and total[j] else None
               for j in range(k)] for i in range(k)]
    return {"vectors": [str(p) for p in paths], "tensors": len(first.names()),
            "layers": {key: [math.sqrt(s) for s in sq] for key, sq in layers.items()},
            "total": total, "cosine": cosine}


def format_stats(stats: dict) -> str:
    """A plain-text report: per-layer norm table, totals, cosine matrix."""
    k = len(stats["vectors"])
    labels = [f"v{i}" for i in range(k)]
    lines = [f"{lab} = {p}" for lab, p in zip(labels, stats["vectors"])]
    width = max([len(key) for key in stats["layers"]] + [5])
    lines.append("")
    lines.append("L2 norm".ljust(width) + "".join(f"{lab:>14}" for lab in labels))
    for key, norms in stats["layers"].items():
        lines.append(key.ljust(width) + "".join(f"{n:14.6g}" for n in norms))
    lines.append("total".ljust(width) + "".join(f"{n:14.6g}" for n in stats["total"]))
    if k > 1:
        lines.append("")
        lines.append("cosine".ljust(width) + "".join(f"{lab:>14}" for lab in labels))
        for lab, row in zip(labels, stats["cosine"]):
            lines.append(lab.ljust(width) + "".join("n/a".rjust(14) if c is None
                                                     else f"{c:14.6f}" for c in row))
    return "\n".join(lines)


def _accumulate_dots(vecs: list, maps: list[dict[str, str]]):
    """Pairwise dot products and per-layer squared norms, one fp32 tensor per vector at a time."""
    first, k = vecs[0], len(vecs)
    dots = [[0.0] * k for _ in range(k)]
    layers: "OrderedDict[str, list[float]]" = OrderedDict()
    for name in first.names():
        numel = math.prod(first.shape(name))
        tensors = []
        for v, mapping in zip(vecs, maps):
            buf = np.empty(numel, dtype=np.float32)
            v.add_into(mapping[name], buf, copy=True)
            tensors.append(buf)
        sq = layers.setdefault(layer_key(name), [0.0] * k)
        for i in range(k):
            for j in range(i, k):
                d = chunked_dot(tensors[i], tensors[j])
                if not math.isfinite(d):  # NaN/Inf values, or a norm beyond fp64
                    bad = i if not math.isfinite(chunked_dot(tensors[i], tensors[i])) else j
                    raise PrefvecError(f"vector {vecs[bad].path}: parameter {maps[bad][name]}: "
                                       "holds NaN/Inf values (a corrupt or diverged vector)")
                dots[i][j] += d
                if i == j:
                    sq[i] += d
                else:
                    dots[j][i] += d
    return dots, layers
