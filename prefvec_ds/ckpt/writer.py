"""Streaming writer of Hugging Face sharded safetensors.

The shard plan (which tensor goes in which file, at which offset) is made up front from names,
shapes and dtypes alone, so each shard's header is written first and every tensor's bytes are
appended the moment they are computed, whole (`write`) or chunk by chunk (`append`): memory stays
at one chunk or tensor, never a shard or a state dict. No torch import: dtypes are safetensors
codes (torch dtypes are accepted and mapped by name), data is anything with the buffer protocol
or a torch tensor. Output goes into a temporary folder beside the target and is renamed into
place at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prefvec_ds import PrefvecError
from prefvec_ds.atomic import remove_dead_temporaries, temporary_beside
from prefvec_ds.ckpt.dtypes import CODE_BY_NAME, ITEMSIZE, TORCH_NAME, code_of
from prefvec_ds.ckpt.directio import open_output


def __getattr__(name: str):
    """DTYPES_BY_NAME ({"fp32": torch.float32, ...}) for torch users, imported on first use."""
    if name == "DTYPES_BY_NAME":
        import torch

        return {k: getattr(torch, TORCH_NAME[v]) for k, v in CODE_BY_NAME.items()}
    raise AttributeError(name)


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 bytes (K/M/G/T, decimal as in HF's max_shard_size); ints pass."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().removesuffix("B")
    mult = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    try:
        if s and s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        return int(s)
    except ValueError:
        raise PrefvecError(f"max shard size {text!r}: expected a size such as 500MB or 5GB")


@dataclass
class TensorSpec:
    """One planned tensor; dtype: a safetensors code ("F32", "BF16") or a torch dtype."""
    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self):
        self.dtype = code_of(self.dtype)
        self.shape = tuple(int(d) for d in self.shape)

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * ITEMSIZE[self.dtype]


@dataclass
class _Shard:
    filename: str
    specs: list[TensorSpec] = field(default_factory=list)


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[_Shard]:
    """Greedy, in order: a new shard when the next tensor would pass the budget."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    n = len(shards)
    if n == 1:
        return [_Shard("model.safetensors", shards[0])]
    return [_Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", s) for i, s in enumerate(shards)]


class ShardedSafetensorsWriter:
    """Writes tensors into planned shards, strictly in plan order, one tensor in memory at a time.

    >>> with ShardedSafetensorsWriter(folder, specs, max_shard_bytes) as w:
    ...     for spec in specs: w.write(spec.name, compute(spec))
    """

    def __init__(self, folder: Path, specs: list[TensorSpec], max_shard_bytes: int,
                 metadata: dict[str, str] | None = None, durable: bool = True,
                 direct: bool = False):
        """durable: start write-back of each piece as soon as it is written and fdatasync each
        shard on close, so the final rename publishes data that is on disk (and dirty pages
        never pile up: 1.5 GB of them would otherwise all be flushed at the end).
        direct: write with O_DIRECT where the file system allows it (directio.py: far less CPU
        than copying into the page cache; always durable)."""
        self.folder = Path(folder)
        self.durable = durable
        self.direct = direct
        self.shards = plan_shards(specs, max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [(i, s) for i, sh in enumerate(self.shards) for s in sh.specs]
        self._next = 0
        self._done_bytes = 0  # of the tensor being appended
        self._fh = None
        self._shard_idx = -1

    def __enter__(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        return self

    def _close_shard(self, complete: bool = True) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            fh.close(complete)

    def _open_shard(self, idx: int) -> None:
        self._close_shard()
        shard = self.shards[idx]
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for spec in shard.specs:
            header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
        self._fh = open_output(self.folder / shard.filename, self.direct, self.durable)
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._shard_idx = idx

    def append(self, name: str, data) -> None:
        """Append the next bytes of tensor `name` (the next planned one, or the one being
        appended); the writer moves on once all its bytes are in."""
        if self._next >= len(self._order):
            raise RuntimeError(f"tensor {name!r} is not in the shard plan")
        idx, spec = self._order[self._next]
        view = memoryview(data).cast("B")
        if name != spec.name or self._done_bytes + len(view) > spec.nbytes:
            raise RuntimeError(f"expected {spec.nbytes - self._done_bytes} more bytes of "
                               f"{spec.name} next, got {len(view)} of {name}")
        if idx != self._shard_idx:
            self._open_shard(idx)
        if len(view):
            self._fh.write(view)
        self._done_bytes += len(view)
        if self._done_bytes == spec.nbytes:
            self._next += 1
            self._done_bytes = 0

    def write(self, name: str, tensor) -> None:
        """Write a whole tensor: a numpy array (dtype as planned; bf16 as uint16 bits) or a
        torch tensor (its own buffer is handed to write(): no bytes copy)."""
        if self._next >= len(self._order) or self._done_bytes:
            raise RuntimeError(f"tensor {name!r} is not next in the shard plan")
        spec = self._order[self._next][1]
        if isinstance(tensor, np.ndarray):
            array = np.ascontiguousarray(tensor)
            bits16 = array.dtype in (np.uint16, np.int16)  # bf16 travels as its bit patterns
            code = "BF16" if spec.dtype == "BF16" and bits16 else code_of(array.dtype)
        else:  # torch: bf16 has no numpy dtype, so its bytes go through a same-size int view
            import torch

            code = code_of(tensor.dtype)
            t = tensor.detach().contiguous().cpu()
            array = (t.view(torch.int16) if code == "BF16" else t).numpy()
        if name != spec.name or tuple(tensor.shape) != spec.shape or code != spec.dtype:
            raise RuntimeError(f"expected {spec.name} {spec.shape} {spec.dtype} next, got "
                               f"{name} {tuple(tensor.shape)} {code}")
        self.append(name, array.reshape(-1))

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._close_shard(complete=False)
            return False
        self._close_shard()
        if self._next != len(self._order):
            raise RuntimeError(f"only {self._next} of {len(self._order)} planned tensors written")
        if len(self.shards) > 1:
            total = sum(s.nbytes for sh in self.shards for s in sh.specs)
            index = {"metadata": {"total_size": total},
                     "weight_map": {s.name: sh.filename for sh in self.shards for s in sh.specs}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return False


OUTPUT_MARKER = ".prefvec-output"
"""Written into every output folder: --overwrite replaces only folders that hold it (a user's
own folder given as --out by mistake is refused, never deleted)."""


def _is_prefvec_output(folder: Path) -> bool:
    if (folder / OUTPUT_MARKER).is_file():
        return True
    try:  # vectors written before the marker existed
        manifest = json.loads((folder / "prefvec_vector.json").read_text())
        return isinstance(manifest, dict) and manifest.get("format") == "prefvec-vector"
    except (OSError, ValueError):
        return not any(folder.iterdir())  # an empty folder holds nothing to lose


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def check_output_target(target: Path, inputs=(), overwrite: bool = False,
                        param: str = "output folder") -> None:
    """Every reason to refuse `target` as an output folder, checked before anything is written.

    inputs: (role, path) pairs the command reads; the output may not be, be inside, or contain
    any of them (with --overwrite the inputs would be deleted, or an input would change while it
    is read)."""
    target = Path(target)
    if target.name in ("", ".", ".."):
        raise PrefvecError(f"{param} {target}: names an existing folder by '.' or '..'; expected "
                           "the path of a new folder, e.g. out/merged")
    if target.is_symlink():
        raise PrefvecError(f"{param} {target}: is a symbolic link (to {os.readlink(target)}); "
                           "expected a folder path, not a link")
    real = _real(target)
    for role, path in inputs:
        if path is None or not Path(path).exists():
            continue
        other = _real(Path(path))
        if real == other:
            how = "is"
        elif other in real.parents:
            how = "is inside"
        elif real in other.parents:
            how = "contains"
        else:
            continue
        raise PrefvecError(f"{param} {target}: {how} the input {role} {path}; the output must be "
                           "a separate folder (nothing was written)")
    for parent in [real.parent, *real.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise PrefvecError(f"{param} {target}: {parent} is a file, expected a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PrefvecError(f"{param} {target}: cannot write in {parent} (permission "
                                   "denied or read-only file system)")
            break
    if target.exists():
        if not overwrite:
            raise PrefvecError(f"{param} {target} already exists (pass --overwrite to replace it)")
        if not target.is_dir():
            raise PrefvecError(f"{param} {target}: exists and is a file, not an output folder; "
                               "refusing to replace it")
        if not _is_prefvec_output(target):
            raise PrefvecError(f"{param} {target}: exists and was not written by prefvec (no "
                               f"{OUTPUT_MARKER} marker); refusing to replace it with --overwrite: "
                               "remove it yourself or choose another folder")


@contextlib.contextmanager
def atomic_output_dir(target: Path, overwrite: bool = False, inputs=(),
                      param: str = "output folder"):
    """Yield a temporary sibling folder; rename it to `target` only if the block succeeds.

    The target is checked first (check_output_target): never an input, never a folder prefvec
    did not write. A failure, Ctrl-C or SIGTERM (atomic.signals_raise) removes the temporary
    folder, so no half-written output is left; temporaries of dead runs into the same place
    (kill -9) are removed first. The folder gets the OUTPUT_MARKER file.
    """
    target = Path(target)
    check_output_target(target, inputs, overwrite, param)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PrefvecError(f"{param} {target}: cannot create {target.parent} "
                           f"({err.strerror or err})") from None
    remove_dead_temporaries(target)
    tmp = temporary_beside(target)
    try:
        tmp.mkdir()
        (tmp / OUTPUT_MARKER).write_text("written by prefvec; --overwrite may replace this "
                                         "folder\n")
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PrefvecError(f"{param} {target}: cannot write in {target.parent} "
                           f"({err.strerror or err})") from None
    try:
        yield tmp
        _publish(tmp, target, param)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, target: Path, param: str) -> None:
    """Rename the finished temporary folder to `target` (replacing an older output)."""
    try:
        if target.exists() or target.is_symlink():
            old = temporary_beside(target, "old")
            target.rename(old)
            try:
                tmp.rename(target)
            except BaseException:
                old.rename(target)  # put the previous output back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except OSError as err:
        raise PrefvecError(f"{param} {target}: could not move the finished output into place "
                           f"({err.strerror or err})") from None
