"""Element types by their safetensors codes ("F32", "BF16", ...), and fp32 <-> bf16/fp16 in numpy.

The `prefvec vector|merge` path runs without torch (its import alone took 2.9 s of a 10 s merge
here), so tensors are numpy arrays and dtypes are safetensors codes. numpy has no bfloat16: bf16
values travel as their uint16 bit patterns. Widening is exact (the 16 bits become the top half of
an fp32); narrowing rounds to nearest, ties to even, bit for bit what torch's `.to(bfloat16)` does
for finite values and infinities (NaN never gets here: results with NaN/Inf are refused first).
"""

from __future__ import annotations

import numpy as np

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "BOOL": 1}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
CODE_BY_NAME = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
NAME_BY_CODE = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}
# numpy type holding each code's bytes (bf16: its bit pattern)
NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
         "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
         "BOOL": np.bool_}
TORCH_NAME = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool"}
_CODE_BY_TORCH = {f"torch.{v}": k for k, v in TORCH_NAME.items()}
_CODE_BY_NUMPY = {np.dtype(v).str: k for k, v in NUMPY.items() if k != "BF16"}


def code_of(dtype) -> str:
    """A safetensors code from a code, a torch dtype (matched by name: no torch import) or a
    numpy dtype."""
    if isinstance(dtype, str) and dtype in ITEMSIZE:
        return dtype
    code = _CODE_BY_TORCH.get(str(dtype))
    if code is None:
        try:
            code = _CODE_BY_NUMPY.get(np.dtype(dtype).str)
        except TypeError:
            code = None
    if code is None:
        raise ValueError(f"dtype {dtype}: not one of {', '.join(ITEMSIZE)}")
    return code


def widen_into(raw: np.ndarray, code: str, out: np.ndarray) -> None:
    """out (fp32) = the values whose bytes are `raw` (uint8) in `code`."""
    values = raw.view(NUMPY[code])
    if code == "BF16":
        np.left_shift(values, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(out, values, casting="unsafe")


def narrow_into(src: np.ndarray, code: str, out: np.ndarray) -> None:
    """out (uint8, len(src) * itemsize bytes) = src (fp32) in `code`. Clobbers src for BF16."""
    if code == "BF16":
        bits = src.view(np.uint32)
        dst = out.view(np.uint16)
        # round to nearest even: add 0x7FFF plus the lowest kept bit, keep the top 16 bits
        np.right_shift(bits, 16, out=dst, casting="unsafe")
        np.bitwise_and(dst, 1, out=dst)
        np.add(bits, dst, out=bits, casting="unsafe")
        np.add(bits, 0x7FFF, out=bits)
        np.right_shift(bits, 16, out=dst, casting="unsafe")
    else:
        with np.errstate(over="ignore"):  # overflow gives inf, as torch's cast does
            np.copyto(out.view(NUMPY[code]), src, casting="unsafe")


def to_torch(array: np.ndarray, code: str):
    """A torch tensor of dtype `code` sharing `array`'s memory (bf16 from its bit patterns)."""
    import torch

    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if code == "BF16" else t
