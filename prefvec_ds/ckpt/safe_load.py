"""Safe, lazy loading of DeepSpeed checkpoint pickles, and page control for memory-mapped tensors.

DeepSpeed's `*_states.pt` files are pickles. Unpickling runs whatever callables the file names, so a
checkpoint from someone else could run commands. We load with torch's `weights_only` unpickler,
which only rebuilds tensors and containers, and allow-list exactly two DeepSpeed classes that the
optimizer file pickles (`ZeroStageEnum`, `LossScaler`/`DynamicLossScaler`). They are recreated here
as inert stand-ins registered under DeepSpeed's own names, so deepspeed is never imported.
Anything else is refused with an error naming the file and the global.

Files are opened with `mmap=True`: in a 374M-parameter optim file the Adam moments are 1.5 GB of
2.24 GB, and with mmap they are never read because nothing touches them. Touched mmap pages would
count in our RSS, so readers locate each tensor's bytes in the file (`mapped_file_offset`) and read
them with preadv in chunks instead (segments.py); the mmap itself is only a fallback.
"""

from __future__ import annotations

import enum
import os
import pickle
import threading
import zipfile
from pathlib import Path

from prefvec_ds import PrefvecError


class ZeroStageEnum(int, enum.Enum):
    """Stand-in for deepspeed.runtime.zero.config.ZeroStageEnum (pickled as REDUCE(cls, (3,)))."""
    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


class _LossScalerStandIn:
    """Inert stand-in for DeepSpeed loss scalers: pickled as NEWOBJ + BUILD(dict of numbers)."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("loss scaler state is not a dict")
        self.__dict__.update({k: v for k, v in state.items() if isinstance(v, (int, float, bool))})


class LossScaler(_LossScalerStandIn):
    """Stand-in for deepspeed.runtime.fp16.loss_scaler.LossScaler."""


class DynamicLossScaler(_LossScalerStandIn):
    """Stand-in for deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler."""


# The DeepSpeed globals a ZeRO checkpoint may name, mapped to our inert stand-ins.
DEEPSPEED_STAND_INS = [
    (ZeroStageEnum, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (DynamicLossScaler, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
]


_LOAD_LOCK = threading.Lock()


def load_pickle_file(path: Path, what: str) -> dict:
    """Load a torch pickle (zip format) lazily via mmap, with the allow-list above.

    `what` says what the file should be ("ZeRO-3 optimizer states") for error messages.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise PrefvecError(f"file {path}: missing ({what} expected)")
    if not zipfile.is_zipfile(path):
        raise PrefvecError(
            f"file {path}: not a zip-format torch checkpoint ({what} expected); it is truncated, "
            "corrupt, or saved with checkpoint_serialization=false (legacy format cannot be mmapped)")
    try:
        # The allow-list context is process-wide state, not per thread: one reader thread leaving
        # it would pull it from under another, so loads are serialised (each takes ~ms: mmap).
        with _LOAD_LOCK, torch.serialization.safe_globals(DEEPSPEED_STAND_INS):
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "global" in line),
                      first[0] if first else "")
        raise PrefvecError(f"file {path}: refused to unpickle ({what} expected): only tensors, "
                           f"containers and known DeepSpeed classes are allowed; {detail.strip()}")
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PrefvecError(f"file {path}: truncated or corrupt ({what} expected): {msg}")
    if not isinstance(obj, dict):
        raise PrefvecError(f"file {path}: expected a dict ({what}), found {type(obj).__name__}")
    return obj


def mapped_file_offset(tensor, path: Path) -> int | None:
    """Byte offset in `path` of an mmap-backed tensor's data (torch.load mmap=True maps the
    whole file), found through /proc/self/maps; None where that is not available. Reading the
    bytes with preadv at this offset avoids page faults and keeps them out of our RSS."""
    if tensor.numel() == 0:
        return None
    addr = tensor.data_ptr()
    real = os.path.realpath(path)
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n") == real:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    if lo <= addr < hi:
                        offset = addr - lo + int(parts[2], 16)
                        return offset if _same_bytes(tensor, real, offset) else None
    except OSError:
        return None
    return None


def _same_bytes(tensor, path: str, offset: int) -> bool:
    """Check the located offset: the first bytes in the file equal the tensor's first bytes."""
    import torch

    n = min(64, tensor.numel() * tensor.element_size())
    head = tensor.reshape(-1).narrow(0, 0, max(1, n // tensor.element_size()))
    want = head.contiguous().view(torch.uint8).numpy().tobytes()[:n]
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(n) == want
