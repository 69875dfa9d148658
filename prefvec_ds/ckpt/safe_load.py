"""Safe, torch-free reading of DeepSpeed checkpoint pickles (torch's zip format).

DeepSpeed's `*_states.pt` files are pickles. Unpickling runs whatever callables the file names, so a
checkpoint from someone else could run commands. Our unpickler resolves every global through an
allow-list: containers, torch's tensor-rebuild functions (replaced by our own, which only record
where a tensor's bytes are), storage types, and inert stand-ins for the DeepSpeed classes the
optimizer file pickles (`ZeroStageEnum`, `LossScaler`/`DynamicLossScaler`, `fragment_address`).
Anything else is refused with an error naming the file and the global; nothing named by the file
is ever imported.

No tensor data is read here. A torch zip file stores each storage uncompressed as the entry
`<archive>/data/<key>`, so a tensor becomes a `StoredTensor`: file, byte offset, dtype, shape.
Readers then fetch exactly the bytes they need with positioned reads (segments.py): in a
374M-parameter optim file the Adam moments are 1.5 GB of 2.24 GB and are never touched, and
neither torch (2.9 s to import here) nor an mmap (pages would count in our RSS) is needed.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import enum
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from prefvec_ds import PrefvecError
from prefvec_ds.ckpt.dtypes import ITEMSIZE, NUMPY


class ZeroStageEnum(int, enum.Enum):
    """Stand-in for deepspeed.runtime.zero.config.ZeroStageEnum (pickled as REDUCE(cls, (3,)))."""
    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


class _LossScalerStandIn:
    """Inert stand-in for DeepSpeed objects pickled as NEWOBJ + BUILD(dict of numbers): loss
    scalers, and fragment addresses (ZeRO-1/2 `param_slice_mappings`)."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("loss scaler state is not a dict")
        self.__dict__.update({k: v for k, v in state.items() if isinstance(v, (int, float, bool))})


class LossScaler(_LossScalerStandIn):
    """Stand-in for deepspeed.runtime.fp16.loss_scaler.LossScaler."""


class DynamicLossScaler(_LossScalerStandIn):
    """Stand-in for deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler."""


class FragmentAddress(_LossScalerStandIn):
    """Stand-in for deepspeed.utils.tensor_fragment.fragment_address (numel, start): ZeRO-1/2
    optimizer files map each parameter to its slice of the rank's partition with it."""


# The DeepSpeed globals a ZeRO checkpoint may name, mapped to our inert stand-ins.
DEEPSPEED_STAND_INS = [
    (ZeroStageEnum, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
    (LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (DynamicLossScaler, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
]


@dataclasses.dataclass(frozen=True)
class ZipRecord:
    """One stored (uncompressed) zip entry: its data bytes [start, start + size) of `file` and
    the CRC-32 the zip writer recorded for them. Readers verify the CRC of every record they
    read (stream.py), so finite garbage in a rank file is an error, not a wrong vector."""
    file: Path
    name: str
    start: int
    size: int
    crc: int


class StoredTensor:
    """Where a pickled tensor's elements are: `file` at byte `offset`, `dtype` a safetensors code;
    `record`: the zip entry holding them (for the CRC check).

    Only the location is kept; `numpy()` reads the values (a fresh array, bf16 as uint16 bits).
    """

    __slots__ = ("file", "dtype", "shape", "stride", "offset", "record")

    def __init__(self, file: Path, dtype: str, shape: tuple, stride: tuple, offset: int,
                 record: ZipRecord | None = None):
        self.file, self.dtype, self.offset = file, dtype, offset
        self.shape, self.stride = shape, stride
        self.record = record

    def __setstate__(self, state):  # a BUILD opcode must not rewrite where the bytes are
        raise pickle.UnpicklingError("BUILD on a tensor is not allowed")

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def dim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel() * ITEMSIZE[self.dtype]

    def is_floating_point(self) -> bool:
        return self.dtype in ("F64", "F32", "F16", "BF16")

    def is_contiguous(self) -> bool:
        expect = 1
        for d, s in zip(reversed(self.shape), reversed(self.stride)):
            if d != 1 and s != expect:
                return False
            expect *= d
        return True

    def numpy(self) -> np.ndarray:
        """The values, read from the file (contiguous tensors only)."""
        if not self.is_contiguous():
            raise PrefvecError(f"file {self.file}: a non-contiguous tensor cannot be read")
        out = np.empty(self.numel(), dtype=NUMPY[self.dtype])
        with open(self.file, "rb", buffering=0) as fh:
            fh.seek(self.offset)
            if fh.readinto(memoryview(out).cast("B")) != self.nbytes:
                raise PrefvecError(f"file {self.file}: truncated tensor data")
        return out.reshape(self.shape)

    def __repr__(self) -> str:
        return f"StoredTensor({self.dtype}, {list(self.shape)}, {self.file.name}@{self.offset})"


class _Storage:
    __slots__ = ("file", "dtype", "offset", "numel", "record")

    def __init__(self, file, dtype, offset, numel, record=None):
        self.file, self.dtype, self.offset, self.numel = file, dtype, offset, numel
        self.record = record


class _TypeToken:
    """What `torch.Tensor` / `torch.nn.Parameter` resolve to: a name, never a class."""

    def __init__(self, name: str):
        self.name = name


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor without a storage")
    size, stride = tuple(int(d) for d in size), tuple(int(s) for s in stride)
    if any(d < 0 for d in size) or any(s < 0 for s in stride) or len(size) != len(stride):
        raise pickle.UnpicklingError(f"bad tensor geometry {size} / {stride}")
    last = storage_offset + sum((d - 1) * s for d, s in zip(size, stride)) if all(size) else -1
    if storage_offset < 0 or last >= storage.numel:
        raise pickle.UnpicklingError(f"tensor {size} at {storage_offset} beyond its storage "
                                     f"({storage.numel} elements)")
    return StoredTensor(storage.file, storage.dtype, size, stride,
                        storage.offset + storage_offset * ITEMSIZE[storage.dtype], storage.record)


def _rebuild_parameter(data, *_ignored):
    return data


def _rebuild_from_type(func, new_type, args, _state):
    if func not in (_rebuild_tensor, _rebuild_parameter) or not isinstance(new_type, _TypeToken):
        raise pickle.UnpicklingError("unsupported tensor subclass rebuild")
    return func(*args)


def _text_encode(text, encoding="utf-8"):
    """`_codecs.encode`, as protocol-2 pickles use it for bytes: text codecs only."""
    if codecs.lookup(encoding).name not in ("latin-1", "iso8859-1", "utf-8"):
        raise pickle.UnpicklingError(f"codec {encoding} is not allowed")
    return text.encode(encoding)


_STORAGES = {"DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16",
             "BFloat16Storage": "BF16", "LongStorage": "I64", "IntStorage": "I32",
             "ShortStorage": "I16", "CharStorage": "I8", "ByteStorage": "U8", "BoolStorage": "BOOL",
             "UntypedStorage": "U8"}
_TORCH_DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                 "uint8", "bool")
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _text_encode,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): _TypeToken("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TypeToken("torch.nn.Parameter"),
    ("torch", "Size"): tuple,
    ("torch", "device"): lambda *args: f"device{args}",
    **{("torch", name): code for name, code in _STORAGES.items()},
    **{("torch.storage", "UntypedStorage"): "U8"},
    **{("torch", name): f"torch.{name}" for name in _TORCH_DTYPES},
    **{tuple(qual.rsplit(".", 1)): cls for cls, qual in DEEPSPEED_STAND_INS},
}


class _Refused(pickle.UnpicklingError):
    def __init__(self, qualname: str):
        super().__init__(qualname)
        self.qualname = qualname


class _ZipStorages:
    """Byte offsets of the uncompressed `data/<key>` entries of a torch zip file."""

    def __init__(self, path: Path, fh, zf: zipfile.ZipFile, prefix: str):
        self.path, self.fh, self.zf, self.prefix = path, fh, zf, prefix
        self.size = os.fstat(fh.fileno()).st_size
        self.cache: dict[str, _Storage] = {}

    def storage(self, key: str, dtype: str, numel: int) -> _Storage:
        if key in self.cache:
            return self.cache[key]
        info = self.zf.getinfo(f"{self.prefix}/data/{key}")
        if info.compress_type != zipfile.ZIP_STORED:
            raise pickle.UnpicklingError(f"storage {key} is compressed")
        self.fh.seek(info.header_offset)
        local = self.fh.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise pickle.UnpicklingError(f"storage {key}: bad local zip header")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        offset = info.header_offset + 30 + name_len + extra_len
        if numel * ITEMSIZE[dtype] > info.file_size or offset + info.file_size > self.size:
            raise pickle.UnpicklingError(f"storage {key}: {numel} elements do not fit its "
                                         f"{info.file_size} bytes, or the file is cut short")
        record = ZipRecord(self.path, info.filename, offset, info.file_size, info.CRC)
        self.cache[key] = _Storage(self.path, dtype, offset, numel, record)
        return self.cache[key]


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storages: _ZipStorages):
        super().__init__(io.BytesIO(data))
        self.storages = storages

    def find_class(self, module, name):
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and pid[1] in _STORAGES.values()):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, dtype, key, _location, numel = pid
        return self.storages.storage(str(key), dtype, int(numel))


def _archive_prefix(zf: zipfile.ZipFile) -> str:
    pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise zipfile.BadZipFile("no <archive>/data.pkl record (not a torch checkpoint)")
    prefix = pickles[0].split("/", 1)[0]
    byteorder = f"{prefix}/byteorder"
    if byteorder in zf.namelist() and zf.read(byteorder).strip() not in (b"little", b""):
        raise zipfile.BadZipFile("big-endian checkpoint (saved on a big-endian machine)")
    return prefix


def load_pickle_file(path: Path, what: str) -> dict:
    """Load a torch pickle (zip format) with the allow-list above; tensors as StoredTensor.

    `what` says what the file should be ("ZeRO-3 optimizer states") for error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise PrefvecError(f"file {path}: missing ({what} expected)")
    if not zipfile.is_zipfile(path):
        raise PrefvecError(
            f"file {path}: not a zip-format torch checkpoint ({what} expected); it is truncated, "
            "corrupt, or saved with checkpoint_serialization=false (legacy format)")
    try:
        with open(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
            prefix = _archive_prefix(zf)
            storages = _ZipStorages(path, fh, zf, prefix)
            obj = _Unpickler(zf.read(f"{prefix}/data.pkl"), storages).load()
    except _Refused as err:
        raise PrefvecError(f"file {path}: refused to unpickle ({what} expected): only tensors, "
                           f"containers and known DeepSpeed classes are allowed; global "
                           f"{err.qualname} is not")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, OSError, struct.error, zipfile.BadZipFile) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PrefvecError(f"file {path}: truncated or corrupt ({what} expected): {msg}")
    if not isinstance(obj, dict):
        raise PrefvecError(f"file {path}: expected a dict ({what}), found {type(obj).__name__}")
    return obj
