"""Read DeepSpeed ZeRO-3 checkpoints one parameter at a time, straight from the rank files.

Layout (see docs/ckpt.md and the DeepSpeed sources): rank r's optimizer file holds one fp32 flat
tensor per sub-group; a parameter of numel n occupies p = ceil(n / W) elements of it at offset o
(the sum of p over the sub-group's earlier parameters, no alignment), and rank r's slice is full
elements [r*p, min((r+1)*p, n)). The W*p - n padding elements are uninitialised: never read.

A parameter is described as W segments (file, byte offset, element range) and read chunk by chunk
(segments.py / stream.py), so memory is a few chunks. The pickles are only unpickled (safely,
without torch: safe_load.py) to learn where the flat tensors' bytes are; nothing imports torch,
deepspeed or torch.distributed.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

from prefvec_ds import PrefvecError
from prefvec_ds.ckpt.paths import check_name, contained
from prefvec_ds.ckpt.safe_load import StoredTensor, load_pickle_file
from prefvec_ds.ckpt.segments import Segment, SegmentSource

_ZERO2_FILE = re.compile(r"^mp_rank_\d+_model_states\.pt$")
_RANK_FILE = re.compile(r"^(bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt$")


@dataclass(frozen=True)
class ParamSlot:
    """Where one trainable parameter lives in every rank's flat partition."""
    name: str
    shape: tuple[int, ...]
    numel: int
    group: int    # sub-group index (fp32_flat_groups[group])
    offset: int   # element offset inside that sub-group's flat tensor
    part: int     # p = ceil(numel / W): elements per rank, padding included

    def rank_range(self, rank: int) -> tuple[int, int]:
        """(start in the full tensor, valid count) of this rank's slice; count 0 = only padding."""
        start = rank * self.part
        return start, max(0, min(self.part, self.numel - start))


@dataclass
class Zero3Layout:
    """Names, shapes and flat positions of a ZeRO-3 checkpoint, from its model-states files."""
    world: int
    groups: list[list[ParamSlot]]
    frozen: dict[str, tuple[int, ...]]
    shared: dict[str, str]          # alias -> owner (tied weights are stored once)
    buffers: list[str]

    @functools.cached_property
    def slots(self) -> dict[str, ParamSlot]:
        return {s.name: s for g in self.groups for s in g}

    def same_flat_layout(self, other: "Zero3Layout") -> bool:
        """True when flat partitions line up element for element (the fast path applies)."""
        return self.world == other.world and self.groups == other.groups


def resolve_tag_dir(path: Path) -> Path:
    """A checkpoint folder with `latest`, or the tag folder itself, -> the tag folder."""
    path = Path(path)
    if (path / "latest").is_file():
        contained(path / "latest", path)
        try:
            tag = (path / "latest").read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise PrefvecError(f"file {path / 'latest'}: expected the name of a tag folder "
                               f"({err})") from None
        tag_dir = check_name(tag, path / "latest", path, "tag")
        if not tag_dir.is_dir():
            raise PrefvecError(f"file {path / 'latest'}: names tag {tag!r}, but {path / tag} "
                               "does not exist")
        return tag_dir
    if any(_RANK_FILE.match(p.name) for p in path.glob("*_states.pt")):
        return path
    raise PrefvecError(f"folder {path}: expected a DeepSpeed checkpoint (a `latest` file or "
                       "zero_pp_rank_*_model_states.pt files)")


def tag_folders(path: Path) -> list[str]:
    """Subfolders of `path` that hold DeepSpeed rank files (tags: global_step100, ...)."""
    try:
        subs = [p for p in Path(path).iterdir() if p.is_dir()]
    except OSError:
        return []
    return sorted(p.name for p in subs
                  if any(_RANK_FILE.match(f.name) for f in p.glob("*_states.pt")))


def is_zero3_tag(tag_dir: Path) -> bool:
    """A ZeRO-3 tag folder has one model-states file per rank (zero_pp_rank_*_model_states)."""
    return any((m := _RANK_FILE.match(p.name)) and m.group(4) == "model"
               for p in Path(tag_dir).glob("*_model_states.pt"))


def is_deepspeed_folder(path: Path) -> bool:
    """A DeepSpeed checkpoint folder (a `latest` file, or rank files): any ZeRO stage; the
    stage is told apart in the tag folder (is_zero3_tag, zero12.is_zero12_tag)."""
    path = Path(path)
    return path.is_dir() and ((path / "latest").is_file() or any(
        _RANK_FILE.match(p.name) for p in path.glob("*_states.pt")))


def rank_files(tag_dir: Path, kind: str, world: int = 0) -> list[Path]:
    """Rank files of one kind, in rank order (natural: rank 10 after rank 2), none missing."""
    found: dict[int, Path] = {}
    for p in tag_dir.iterdir():
        m = _RANK_FILE.match(p.name)
        if m and m.group(4) == kind:
            if m.group(3) != "00":
                raise PrefvecError(f"file {p}: model-parallel rank {m.group(3)}; only mp_rank_00 "
                                   "(no tensor/pipeline parallelism) is supported")
            found[int(m.group(2))] = contained(p, tag_dir)
    if not found:
        if kind == "model" and any(_ZERO2_FILE.match(p.name) for p in tag_dir.iterdir()):
            raise PrefvecError(f"folder {tag_dir}: ZeRO stage 1/2 checkpoint (mp_rank_*_model_"
                               "states.pt without zero_pp_rank_* files), not a ZeRO-3 layout "
                               "(zero12.Zero12Checkpoint reads it)")
        raise PrefvecError(f"folder {tag_dir}: no zero_pp_rank_*_{kind}_states.pt files")
    missing = [r for r in range(max(max(found) + 1, world)) if r not in found]
    if missing:
        raise PrefvecError(f"folder {tag_dir}: missing {kind}-states file of rank {missing[0]} "
                           f"(found ranks {sorted(found)})")
    return [found[r] for r in sorted(found)]


def _build_layout(path: Path, states: dict, world: int) -> Zero3Layout:
    if "param_shapes" not in states or "buffer_names" not in states:
        raise PrefvecError(f"file {path}: parameter param_shapes missing: not a DeepSpeed ZeRO "
                           "model-states file")
    shapes = states["param_shapes"]
    if isinstance(shapes, dict):  # ZeRO-1/2 store one dict, ZeRO-3 a list of sub-groups
        raise PrefvecError(f"file {path}: parameter param_shapes: expected a list of sub-groups "
                           "(ZeRO stage 3), found a dict (ZeRO stage 1/2 is not supported)")
    groups = []
    for g, group in enumerate(shapes):
        offset, slots = 0, []
        for name, shape in group.items():
            numel = 1
            for d in shape:
                numel *= int(d)
            part = -(-numel // world)
            slots.append(ParamSlot(name, tuple(int(d) for d in shape), numel, g, offset, part))
            offset += part
        groups.append(slots)
    frozen = {k: tuple(int(d) for d in v) for k, v in (states.get("frozen_param_shapes") or {}).items()}
    return Zero3Layout(world, groups, frozen, dict(states.get("shared_params") or {}),
                       list(states.get("buffer_names") or []))


class DeepSpeedSource(SegmentSource):
    """What the ZeRO-3 and ZeRO-1/2 readers share: names in flat order, tied aliases, shapes
    (of params, frozen params and buffers). Subclasses set `layout` (slots, frozen, shared),
    `_order` and `buffers()`."""

    def names(self) -> list[str]:
        """Trainable params in flat (file) order, then frozen params; aliases excluded."""
        return list(self._order)

    @property
    def aliases(self) -> dict[str, str]:
        return dict(self.layout.shared)

    def shape(self, name: str) -> tuple[int, ...]:
        name = self.layout.shared.get(name, name)  # a tied alias has its owner's shape
        slot = self.layout.slots.get(name)
        if slot is None and name not in self.layout.frozen and name in self.buffers():
            return tuple(self.buffers()[name].shape)
        return slot.shape if slot else self.layout.frozen[name]


class Zero3Checkpoint(DeepSpeedSource):
    """One ZeRO-3 checkpoint: layout and the byte offsets of every rank's flat partitions."""

    kind = "zero3"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tag_dir = resolve_tag_dir(self.path)
        self.model_files = rank_files(self.tag_dir, "model")
        self.optim_files = rank_files(self.tag_dir, "optim", len(self.model_files))
        self.model_files = rank_files(self.tag_dir, "model", len(self.optim_files))
        world = len(self.model_files)
        self._model_states = [load_pickle_file(p, "ZeRO-3 model states") for p in self.model_files]
        self.layout = _build_layout(self.model_files[0], self._model_states[0], world)
        for path, states in zip(self.model_files[1:], self._model_states[1:]):
            if states.get("param_shapes") != self._model_states[0]["param_shapes"]:
                raise PrefvecError(f"file {path}: parameter param_shapes differs from rank 0's "
                                   "(rank files from different runs mixed in one folder?)")
        self._flat: list[list | None] = [None] * world
        for rank in range(world):  # validate every rank file now (ms each: only the pickle is
            self._check_optim(rank)  # read), so a bad file fails before any output is written
        self._order = [s.name for g in self.layout.groups for s in g] + list(self.layout.frozen)

    def _check_optim(self, rank: int) -> list:
        if self._flat[rank] is not None:
            return self._flat[rank]
        path = self.optim_files[rank]
        states = load_pickle_file(path, "ZeRO-3 optimizer states")
        osd = states.get("optimizer_state_dict")
        if not isinstance(osd, dict) or "zero_stage" not in osd:
            raise PrefvecError(f"file {path}: parameter optimizer_state_dict.zero_stage missing: "
                               "not a DeepSpeed ZeRO optimizer-states file")
        if int(osd["zero_stage"]) != 3:
            raise PrefvecError(f"file {path}: parameter zero_stage: expected 3, found "
                               f"{int(osd['zero_stage'])} (only ZeRO-3 checkpoints are supported)")
        if osd.get("partition_count") != self.layout.world:
            raise PrefvecError(f"file {path}: parameter partition_count: expected "
                               f"{self.layout.world} (rank files found), found "
                               f"{osd.get('partition_count')}")
        flat = osd.get("fp32_flat_groups")
        if not isinstance(flat, list) or len(flat) != len(self.layout.groups):
            raise PrefvecError(f"file {path}: parameter fp32_flat_groups: expected "
                               f"{len(self.layout.groups)} sub-groups (param_shapes)")
        for g, (tensor, slots) in enumerate(zip(flat, self.layout.groups)):
            need = sum(s.part for s in slots)
            if not isinstance(tensor, StoredTensor) or tensor.dim() != 1 or tensor.numel() < need:
                raise PrefvecError(f"file {path}: parameter fp32_flat_groups[{g}]: expected a "
                                   f"1-D tensor of at least {need} elements, found {tensor!r}")
            if tensor.dtype != "F32" or not tensor.is_contiguous():
                raise PrefvecError(f"file {path}: parameter fp32_flat_groups[{g}]: expected "
                                   f"contiguous fp32 master weights, found {tensor!r}")
        # The Adam moments (optimizer_state_dict.state) are only locations: never read.
        self._flat[rank] = list(flat)
        return self._flat[rank]

    # -- the tensor-source interface shared with SafetensorsFolder --------------------------
    def segments(self, name: str) -> list[Segment]:
        """Where each rank's valid elements of `name` are; padding is never part of a segment."""
        name = self.layout.shared.get(name, name)
        slot = self.layout.slots.get(name)
        if slot is None:
            return self._frozen_segments(name)
        segs = []
        for rank in range(self.layout.world):
            start, count = slot.rank_range(rank)
            if count == 0:
                break  # the remaining ranks hold only padding for this parameter
            flat = self._flat[rank][slot.group]
            segs.append(Segment(start, count, "F32", flat.file, flat.offset + slot.offset * 4,
                                flat.record))
        return segs

    def _frozen_segments(self, name: str) -> list[Segment]:
        """Frozen params: each rank's model-states file holds its fragment (model dtype)."""
        if name not in self.layout.frozen:
            raise KeyError(name)
        numel = math.prod(self.layout.frozen[name])
        segs, pos = [], 0
        for rank, states in enumerate(self._model_states):
            frag = (states.get("frozen_param_fragments") or {}).get(name)
            if frag is None:
                raise PrefvecError(f"file {self.model_files[rank]}: parameter "
                                   f"frozen_param_fragments[{name}] missing")
            if not isinstance(frag, StoredTensor) or not frag.is_contiguous() \
                    or not frag.is_floating_point():
                raise PrefvecError(f"file {self.model_files[rank]}: parameter "
                                   f"frozen_param_fragments[{name}]: expected a float tensor")
            count = min(frag.numel(), numel - pos)
            if count > 0:
                segs.append(Segment(pos, count, frag.dtype, frag.file, frag.offset, frag.record))
                pos += count
        if pos != numel:
            raise PrefvecError(f"folder {self.tag_dir}: frozen parameter {name}: fragments hold "
                               f"{pos} of {numel} elements")
        return segs

    def buffers(self) -> dict[str, StoredTensor]:
        """Persistent buffers (full tensors on every rank; taken from rank 0)."""
        module = self._model_states[0].get("module") or {}
        return {k: module[k] for k in self.layout.buffers if k in module}

    def __repr__(self) -> str:
        return f"ZeRO-3 checkpoint {self.tag_dir} (W={self.layout.world})"
