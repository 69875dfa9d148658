"""Apply and remove preference vectors in place on a loaded HF model, for fast eta sweeps.

    from prefvec_ds.ckpt import apply_vectors, remove_vectors
    apply_vectors(model, {"vecs/helpful": 0.5, "vecs/harmless": 1.0})   # theta += sum eta*phi
    ...generate / evaluate...
    remove_vectors(model, {"vecs/helpful": 0.5, "vecs/harmless": 1.0})  # theta -= sum eta*phi

Streaming: one vector tensor at a time is read (fp32 parameters receive it in place with no
temporary at all). Keys may be vector folders, `PLUS,MINUS` checkpoint pairs, or opened sources.
Removal subtracts the same amounts: exact up to fp32 rounding (~1e-7 relative) for fp32 models;
for bf16/fp16 models each apply/remove rounds to the model dtype (~4e-3 relative for bf16), so for
long sweeps on a low-precision model reload the base, or sweep on an fp32 copy.
"""

from __future__ import annotations

from typing import Mapping

from prefvec_ds import PrefvecError
from prefvec_ds.ckpt import crc
from prefvec_ds.ckpt.segments import FDS
from prefvec_ds.ckpt.sources import alias_groups, match_names, open_vector_arg


def _open(vec):
    return open_vector_arg(str(vec)) if isinstance(vec, (str, bytes)) or hasattr(vec, "__fspath__") \
        else vec


class _ModelNames:
    """The model's own parameters as a name source (for alias-aware name matching)."""

    def __init__(self, model):
        self.path = type(model).__name__
        self.params = dict(model.named_parameters())  # tied weights appear once here
        self.aliases: dict[str, str] = {}

    def names(self) -> list[str]:
        return list(self.params)


def apply_vectors(model, vectors: Mapping[object, float], sign: float = 1.0) -> None:
    """theta += sign * sum_i eta_i * phi_i, parameter by parameter, under no_grad.

    Every vector is opened and checked (names, shapes) before any parameter is changed, so a
    bad vector leaves the model untouched.
    """
    target = _ModelNames(model)
    plans = []
    for vec_arg, eta in vectors.items():
        vec = _open(vec_arg)
        mapping = match_names(target.names(), vec, alias_groups(vec), f"model {target.path}",
                              "vector")
        for name, param in target.params.items():
            vname = mapping[name]
            if tuple(vec.shape(vname)) != tuple(param.shape):
                raise PrefvecError(f"vector {vec.path}: parameter {vname}: shape "
                                   f"{list(vec.shape(vname))}, model has {list(param.shape)}")
        plans.append((vec, mapping, sign * float(eta)))
    crc.TRACKER.clear()
    try:
        _apply_plans(target, plans)
        # rank-file records (PLUS,MINUS pairs) are verified as read, joined here: a corrupt
        # checkpoint is an error (the model is then changed: reload it)
        crc.TRACKER.verify()
    finally:
        FDS.close()


def _apply_plans(target: _ModelNames, plans: list) -> None:
    import torch

    with torch.no_grad():
        for vec, mapping, alpha in plans:
            if alpha == 0.0:
                continue
            for name, param in target.params.items():
                vname = mapping[name]
                if param.dtype == torch.float32 and param.is_contiguous() and param.device.type == "cpu":
                    vec.add_into(vname, param.data.view(-1).numpy(), alpha=alpha)  # shared memory
                else:  # low precision or on GPU: accumulate in fp32, round once
                    buf = param.data.reshape(-1).to("cpu", torch.float32, copy=True)
                    vec.add_into(vname, buf.numpy(), alpha=alpha)
                    param.data.copy_(buf.view(param.shape))


def remove_vectors(model, vectors: Mapping[object, float]) -> None:
    """Undo apply_vectors(model, vectors): subtract the same eta * phi."""
    apply_vectors(model, vectors, sign=-1.0)
