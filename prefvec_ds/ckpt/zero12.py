"""Read DeepSpeed ZeRO-1/2 checkpoints one parameter at a time, straight from the rank files.

Layout (DeepSpeed 0.19 `runtime/zero/stage_1_and_2.py`, read back by `utils/zero_to_fp32.py`,
`_zero2_merge_trainable_params`; see docs/ckpt.md):
- one `mp_rank_00_model_states.pt` (the full 16-bit module, `param_shapes`: one OrderedDict
  name -> shape per optimizer param group, in flat order, `shared_params`, buffers, and for
  stage 2 `frozen_param_shapes`/`frozen_param_fragments` holding the frozen params in full);
- per data-parallel rank r, `[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt` with
  `optimizer_state_dict.single_partition_of_fp32_groups`: one flat fp32 tensor per param group.

A group's full fp32 vector is the concatenation of the ranks' partitions (the last rank's is
shorter: DeepSpeed strips the group padding before saving). Parameters lie in it back to back
in `param_shapes` order, each followed by its `param_alignment_paddings` entry (zeros unless
zero_optimization.parameter_alignment is on). Unlike ZeRO-3, a parameter is not cut per rank:
it is one contiguous range, which may straddle rank files. So each parameter becomes the
segments where that range meets each rank's partition (segments.py), and is streamed chunk by
chunk like a ZeRO-3 parameter: never a gathered group, never a full state dict.
Nothing here imports torch, deepspeed or torch.distributed.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

from prefvec_ds import PrefvecError
from prefvec_ds.ckpt.paths import contained
from prefvec_ds.ckpt.safe_load import StoredTensor, load_pickle_file
from prefvec_ds.ckpt.segments import Segment
from prefvec_ds.ckpt.zero3 import DeepSpeedSource, rank_files, resolve_tag_dir

_MODEL_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_FP32_KEY = "single_partition_of_fp32_groups"


@dataclass(frozen=True)
class GroupSlot:
    """Where one trainable parameter lives: a contiguous range of its group's full vector."""
    name: str
    shape: tuple[int, ...]
    numel: int
    group: int    # optimizer param group (single_partition_of_fp32_groups[group])
    offset: int   # element offset in the group's full (rank-concatenated) vector


@dataclass
class Zero12Layout:
    """Names, shapes and flat positions of a ZeRO-1/2 checkpoint; `parts[g][r]`: the element
    count of rank r's partition of group g (their concatenation is the group's full vector)."""
    stage: int
    world: int
    groups: list[list[GroupSlot]]
    parts: list[list[int]]
    frozen: dict[str, tuple[int, ...]]
    shared: dict[str, str]          # alias -> owner (tied weights are stored once)
    buffers: list[str]

    @functools.cached_property
    def slots(self) -> dict[str, GroupSlot]:
        return {s.name: s for g in self.groups for s in g}

    def same_flat_layout(self, other) -> bool:
        """True when both checkpoints cut every parameter at the same rank boundaries."""
        return (isinstance(other, Zero12Layout) and self.world == other.world
                and self.groups == other.groups and self.parts == other.parts)


def is_zero12_tag(tag_dir: Path) -> bool:
    """A ZeRO-1/2 tag folder: one `mp_rank_*_model_states.pt`, no per-rank model states."""
    return any(_MODEL_FILE.match(p.name) for p in Path(tag_dir).glob("mp_rank_*_model_states.pt"))


def _model_file(tag_dir: Path) -> Path:
    found = sorted(p for p in tag_dir.glob("mp_rank_*_model_states.pt")
                   if _MODEL_FILE.match(p.name))
    if [p.name for p in found] != ["mp_rank_00_model_states.pt"]:
        raise PrefvecError(f"folder {tag_dir}: expected exactly mp_rank_00_model_states.pt, found "
                           f"{[p.name for p in found]}; only mp_rank_00 (no tensor/pipeline "
                           "parallelism) is supported")
    return contained(found[0], tag_dir)


def _stage_of(path: Path, states: dict, osd: dict) -> int:
    """zero_stage from the optimizer state; else ds_config's zero_optimization.stage (DeepSpeed's
    BF16_Optimizer, used for bf16 + stage 1 with fp32 gradient accumulation, saves none)."""
    stage = osd.get("zero_stage")
    if stage is None:
        cfg = states.get("ds_config") if isinstance(states.get("ds_config"), dict) else {}
        stage = (cfg.get("zero_optimization") or {}).get("stage")
    if stage is None or int(stage) not in (1, 2):
        raise PrefvecError(f"file {path}: parameter zero_stage: expected 1 or 2 (a ZeRO-1/2 "
                           f"optimizer-states file), found {stage}")
    return int(stage)


def _group_slots(shapes: dict, g: int, paddings) -> tuple[list[GroupSlot], int]:
    """Slots of param group g and the elements they span (alignment paddings included)."""
    offset, slots = 0, []
    for i, (name, shape) in enumerate(shapes.items()):
        shape = tuple(int(d) for d in shape)
        slots.append(GroupSlot(name, shape, math.prod(shape), g, offset))
        offset += math.prod(shape) + (int(paddings[i]) if paddings is not None else 0)
    return slots, offset


def _check_paddings(path: Path, paddings, shapes: list) -> None:
    if paddings is None:
        return  # DeepSpeed before param_alignment_paddings: parameters are back to back
    if not isinstance(paddings, list) or len(paddings) != len(shapes) or any(
            not isinstance(p, list) or len(p) != len(s)
            or not all(isinstance(x, int) and x >= 0 for x in p)
            for p, s in zip(paddings, shapes)):
        raise PrefvecError(f"file {path}: parameter param_alignment_paddings: expected one list "
                           f"per param group with one count >= 0 per parameter of param_shapes "
                           f"({[len(s) for s in shapes]})")


def _align(n: int, to: int) -> int:
    return to * -(-n // to)


class Zero12Checkpoint(DeepSpeedSource):
    """One ZeRO-1/2 checkpoint: layout and the byte offsets of every rank's fp32 partitions."""

    kind = "zero12"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tag_dir = resolve_tag_dir(self.path)
        self.model_file = _model_file(self.tag_dir)
        self.optim_files = rank_files(self.tag_dir, "optim")
        self._model_states = load_pickle_file(self.model_file, "ZeRO-1/2 model states")
        states = self._model_states
        shapes = states.get("param_shapes")
        if not isinstance(shapes, list) or not all(isinstance(g, dict) for g in shapes) \
                or "buffer_names" not in states:
            raise PrefvecError(f"file {self.model_file}: parameter param_shapes: expected a list "
                               "of param groups (name -> shape): not a DeepSpeed ZeRO-1/2 "
                               "model-states file")
        # Validate every rank file now (ms each: only the pickle is read), so a bad file fails
        # before any output is written; the Adam moments are only located, never read.
        self._flat = [self._load_optim(r) for r in range(len(self.optim_files))]
        self.layout = self._build_layout()
        self._order = [s.name for g in self.layout.groups for s in g] + list(self.layout.frozen)

    def _load_optim(self, rank: int) -> tuple[int, list, object]:
        path = self.optim_files[rank]
        states = load_pickle_file(path, "ZeRO-1/2 optimizer states")
        osd = states.get("optimizer_state_dict")
        if not isinstance(osd, dict) or _FP32_KEY not in osd:
            raise PrefvecError(f"file {path}: parameter optimizer_state_dict.{_FP32_KEY} "
                               "missing: not a DeepSpeed ZeRO-1/2 optimizer-states file")
        stage, world = _stage_of(path, states, osd), len(self.optim_files)
        counts = osd.get("partition_count")
        if any(c != world for c in (counts if isinstance(counts, list) else [counts])):
            raise PrefvecError(f"file {path}: parameter partition_count: expected {world} for "
                               f"every param group (rank files found), found {counts} (expert/"
                               "MoE groups with their own data parallelism are not supported)")
        flat = osd[_FP32_KEY]
        shapes = self._model_states["param_shapes"]
        if not isinstance(flat, list) or len(flat) != len(shapes):
            raise PrefvecError(f"file {path}: parameter {_FP32_KEY}: expected {len(shapes)} "
                               f"param groups (param_shapes of {self.model_file.name})")
        for g, tensor in enumerate(flat):
            if not isinstance(tensor, StoredTensor) or tensor.dim() != 1 \
                    or tensor.dtype != "F32" or not tensor.is_contiguous():
                raise PrefvecError(f"file {path}: parameter {_FP32_KEY}[{g}]: expected a 1-D "
                                   f"contiguous fp32 tensor (master weights), found {tensor!r}")
        paddings = osd.get("param_alignment_paddings")
        _check_paddings(path, paddings, shapes)
        return stage, list(flat), paddings

    def _build_layout(self) -> Zero12Layout:
        stage, _, paddings = self._flat[0]
        for rank, (st, _, pads) in enumerate(self._flat[1:], 1):
            if st != stage or pads != paddings:
                raise PrefvecError(f"file {self.optim_files[rank]}: parameter zero_stage/param_"
                                   "alignment_paddings differ from rank 0's (rank files from "
                                   "different runs mixed in one folder?)")
        world, groups, parts = len(self._flat), [], []
        for g, shapes in enumerate(self._model_states["param_shapes"]):
            slots, span = _group_slots(shapes, g, paddings[g] if paddings else None)
            counts = [flat[g].numel() for _, flat, _ in self._flat]
            # DeepSpeed pads each group to a multiple of 2 x world (and strips some of it), so
            # like zero_to_fp32 the totals must agree after that rounding: anything else is a
            # partition from another run or model, or a truncated one.
            end = slots[-1].offset + slots[-1].numel if slots else 0
            if sum(counts) < end or _align(sum(counts), 2 * world) != _align(span, 2 * world):
                raise PrefvecError(f"file {self.optim_files[-1]}: parameter {_FP32_KEY}[{g}]: "
                                   f"the {world} rank partitions hold {sum(counts)} elements "
                                   f"({counts}), but param_shapes of {self.model_file.name} "
                                   f"needs {span} (partition from another run or model?)")
            groups.append(slots)
            parts.append(counts)
        states = self._model_states
        return Zero12Layout(stage, world, groups, parts, self._frozen_tensors(),
                            dict(states.get("shared_params") or {}),
                            list(states.get("buffer_names") or []))

    def _frozen_tensors(self) -> dict[str, tuple[int, ...]]:
        """Frozen params, in full in the model file: stage 2 lists them in frozen_param_shapes
        (tensors in frozen_param_fragments); stage 1 saves neither, so they are the `module`
        entries that are no trainable param, buffer or tied alias."""
        states = self._model_states
        module = states.get("module") or {}
        shapes = states.get("frozen_param_shapes")
        if shapes:
            self._frozen_src = dict(states.get("frozen_param_fragments") or {})
            return {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        known = {n for g in states["param_shapes"] for n in g}
        known |= set(states.get("buffer_names") or []) | set(states.get("shared_params") or {})
        self._frozen_src = {k: v for k, v in module.items() if k not in known}
        return {k: tuple(v.shape) for k, v in self._frozen_src.items()
                if isinstance(v, StoredTensor)}

    # -- the tensor-source interface shared with Zero3Checkpoint and SafetensorsFolder -------
    def segments(self, name: str) -> list[Segment]:
        """The pieces of `name`'s range [offset, offset + numel) in each rank's partition of its
        group (a parameter may straddle two or more rank files); padding is never included."""
        name = self.layout.shared.get(name, name)
        slot = self.layout.slots.get(name)
        if slot is None:
            return self._frozen_segments(name)
        segs, begin = [], 0   # begin: where rank r's partition starts in the group's vector
        lo, hi = slot.offset, slot.offset + slot.numel
        for rank, count in enumerate(self.layout.parts[slot.group]):
            a, b = max(lo, begin), min(hi, begin + count)
            if a < b:
                flat = self._flat[rank][1][slot.group]
                segs.append(Segment(a - lo, b - a, "F32", flat.file,
                                    flat.offset + (a - begin) * 4, flat.record))
            begin += count
        return segs

    def _frozen_segments(self, name: str) -> list[Segment]:
        """A frozen param: one full tensor (model dtype) in the model-states file."""
        if name not in self.layout.frozen:
            raise KeyError(name)
        frag = self._frozen_src.get(name)
        numel = math.prod(self.layout.frozen[name])
        if not isinstance(frag, StoredTensor) or not frag.is_contiguous() \
                or not frag.is_floating_point() or frag.numel() != numel:
            raise PrefvecError(f"file {self.model_file}: frozen parameter {name}: expected a "
                               f"contiguous float tensor of {numel} elements, found {frag!r}")
        return [Segment(0, numel, frag.dtype, frag.file, frag.offset, frag.record)]

    def buffers(self) -> dict[str, StoredTensor]:
        """Persistent buffers (full tensors in the model-states file)."""
        module = self._model_states.get("module") or {}
        return {k: module[k] for k in self.layout.buffers if k in module}

    def __repr__(self) -> str:
        return (f"ZeRO-{self.layout.stage} checkpoint {self.tag_dir} (W={self.layout.world}, "
                f"{len(self.layout.groups)} param groups)")
