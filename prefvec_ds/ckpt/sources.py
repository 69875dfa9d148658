"""Tensor sources: anything that can describe one named tensor as Terms over byte ranges of files.

Four kinds share one small interface (names(), shape(name), aliases, terms(name, alpha),
add_into(name, out, alpha, copy)): a DeepSpeed checkpoint of ZeRO stage 3 (zero3.Zero3Checkpoint)
or stage 1/2 (zero12.Zero12Checkpoint), told apart by DEEPSPEED_READERS below, a safetensors
folder (an HF model or a saved vector, safetensors_io.SafetensorsFolder), and the lazy difference
of two sources (DiffSource, phi = plus - minus, never materialised as a whole). Name matching
between sources goes through tied-weight alias groups, so `lm_head.weight` tied to
`model.embed_tokens.weight` matches either.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefvec_ds import PrefvecError
from prefvec_ds.ckpt.safetensors_io import SafetensorsFolder
from prefvec_ds.ckpt.segments import SegmentSource, Term
from prefvec_ds.ckpt.zero12 import Zero12Checkpoint, is_zero12_tag
from prefvec_ds.ckpt.zero3 import (Zero3Checkpoint, is_deepspeed_folder, is_zero3_tag,
                                   resolve_tag_dir, tag_folders)

VECTOR_MANIFEST = "prefvec_vector.json"
VECTOR_FORMAT = "prefvec-vector"

# DeepSpeed checkpoint readers, by what the tag folder holds (first match wins): ZeRO-3 saves one
# model-states file per rank (zero_pp_rank_{r}_mp_rank_00_model_states.pt), ZeRO-1/2 a single
# mp_rank_00_model_states.pt beside the per-rank optimizer files. Each reader then checks the
# zero_stage its optimizer files record.
DEEPSPEED_READERS = (
    ("zero3", is_zero3_tag, Zero3Checkpoint),
    ("zero12", is_zero12_tag, Zero12Checkpoint),
)
DEEPSPEED_KINDS = tuple(kind for kind, _, _ in DEEPSPEED_READERS)


def open_deepspeed(path: Path):
    """The reader for a DeepSpeed checkpoint folder (with `latest`) or tag folder."""
    tag_dir = resolve_tag_dir(path)
    for _kind, detect, reader in DEEPSPEED_READERS:
        if detect(tag_dir):
            return reader(path)
    raise PrefvecError(f"folder {tag_dir}: no model-states file (expected zero_pp_rank_*_mp_rank_"
                       "00_model_states.pt for ZeRO-3 or mp_rank_00_model_states.pt for ZeRO-1/2)")


def open_source(path: str | Path, role: str):
    """Open a DeepSpeed checkpoint (ZeRO-1/2/3), a saved vector, or a HF safetensors folder by
    what it holds."""
    path = Path(path)
    if not path.exists():
        raise PrefvecError(f"{role} {path}: no such file or folder")
    if not path.is_dir():
        raise PrefvecError(f"{role} {path}: expected a folder (DeepSpeed checkpoint, HF model or "
                           "prefvec vector)")
    if is_deepspeed_folder(path):
        return open_deepspeed(path)
    tags = tag_folders(path)
    if tags and not any(path.glob("*.safetensors")):
        raise PrefvecError(f"{role} {path}: DeepSpeed checkpoint folder without a `latest` file; "
                           f"tag folders found: {', '.join(tags)} (pass one of them, e.g. "
                           f"{path / tags[-1]}, or write its name into {path / 'latest'})")
    if (path / VECTOR_MANIFEST).is_file():
        return open_vector(path)
    return SafetensorsFolder(path)


def open_vector(path: str | Path) -> SafetensorsFolder:
    """A saved vector: safetensors shards plus a manifest (aliases, provenance, norms)."""
    path = Path(path)
    manifest_path = path / VECTOR_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        raise PrefvecError(f"file {manifest_path}: expected a prefvec vector manifest ({err})")
    if manifest.get("format") != VECTOR_FORMAT:
        raise PrefvecError(f"file {manifest_path}: parameter format: expected {VECTOR_FORMAT!r}")
    folder = SafetensorsFolder(path)
    folder.kind = "vector"
    folder.aliases = dict(manifest.get("aliases") or {})
    folder.meta = manifest
    return folder


def alias_groups(*sources) -> dict[str, set[str]]:
    """name -> every name tied to it (itself included), over all sources' alias maps."""
    groups: dict[str, set[str]] = {}
    for src in sources:
        for alias, owner in getattr(src, "aliases", {}).items():
            merged = groups.get(alias, {alias}) | groups.get(owner, {owner})
            for n in merged:
                groups[n] = merged
    return groups


def match_names(wanted: list[str], src, groups: dict[str, set[str]], role: str,
                src_role: str) -> dict[str, str]:
    """Map each wanted name to the name `src` stores it under (directly or via a tied alias)."""
    have = set(src.names())
    mapping = {}
    for name in wanted:
        found = name if name in have else next(
            (n for n in sorted(groups.get(name, ())) if n in have), None)
        if found is None:
            raise PrefvecError(f"{src_role} {src.path}: parameter {name}: missing (present in "
                               f"{role}); are they the same architecture?")
        mapping[name] = found
    return mapping


def check_shapes(mapping: dict[str, str], a, b, a_role: str, b_role: str) -> None:
    for name, other in mapping.items():
        if tuple(a.shape(name)) != tuple(b.shape(other)):
            raise PrefvecError(f"{b_role} {b.path}: parameter {other}: shape "
                               f"{list(b.shape(other))}, expected {list(a.shape(name))} as in "
                               f"{a_role} {a.path} (different architectures?)")


class DiffSource(SegmentSource):
    """phi = plus - minus, built per tensor on demand.

    Fast path: two DeepSpeed checkpoints of one stage with the same flat layout (W, sub-groups or
    param groups, param order) are subtracted at identical flat offsets, rank file by rank file,
    without any name lookup on the minus side. Otherwise each side is read through its own named
    layout (same result).
    """

    kind = "diff"

    def __init__(self, plus, minus):
        self.plus, self.minus = plus, minus
        self.path = f"{plus.path},{minus.path}"
        self.aliases = {**minus.aliases, **plus.aliases}
        groups = alias_groups(plus, minus)
        self.to_minus = match_names(plus.names(), minus, groups, f"plus {plus.path}", "minus")
        extra = set(minus.names()) - set(self.to_minus.values())
        if extra:
            raise PrefvecError(f"minus {minus.path}: parameter {sorted(extra)[0]}: not in plus "
                               f"{plus.path} (different architectures?)")
        check_shapes(self.to_minus, plus, minus, "plus", "minus")
        self.fast = (plus.kind in DEEPSPEED_KINDS and plus.kind == minus.kind
                     and plus.layout.same_flat_layout(minus.layout))

    def names(self) -> list[str]:
        return self.plus.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.plus.shape(name)

    def terms(self, name: str, alpha: float = 1.0) -> list:
        """One term alpha * (plus - minus): phi is formed first, then scaled. With the same flat
        layout both sides have identical rank segments, so each chunk subtracts at identical
        flat offsets, rank file by rank file; otherwise minus is read through its own named
        ranges (same values)."""
        (plus,) = self.plus.terms(name, 1.0)
        (minus,) = self.minus.terms(self.to_minus[name], 1.0)
        if plus.minus is not None or minus.minus is not None:
            raise PrefvecError(f"vector {self.path}: a difference of differences is not supported")
        return [Term(plus.segments, alpha, minus.segments)]

    def __repr__(self) -> str:
        return f"vector {self.path} (fast flat path: {self.fast})"


def open_vector_arg(text: str):
    """`VEC` (a saved vector folder) or `PLUS,MINUS` (two checkpoints, subtracted on the fly)."""
    if "," in text:
        plus, minus = text.split(",", 1)
        return DiffSource(open_source(plus, "plus"), open_source(minus, "minus"))
    src = open_source(text, "vector")
    if src.kind != "vector":
        raise PrefvecError(f"vector {text}: no {VECTOR_MANIFEST} (expected a folder written by "
                           "`prefvec vector`, or PLUS_CKPT,MINUS_CKPT)")
    return src
