"""The DPO-form baselines of pipeline.baselines (dpo_joint, dpo_safe_first, bfpo), trained
like a DPO direction: same theta_base, same pairs, the reference log-probs of the preference
each pair comes from, same loop; the model is exported to <run_dir>/baselines/<name>/model for
the eval stage to score next to the Preference Vectors merges.
"""

from __future__ import annotations

import dataclasses

import torch

from prefvec_ds import PrefvecError
from prefvec_ds.ckpt.writer import DTYPES_BY_NAME
from prefvec_ds.config.layout import RunLayout
from prefvec_ds.config.loader import resolve_ds_config
from prefvec_ds.config.schema import RunConfig
from prefvec_ds.data.baselines import BASELINE_DATA, Selected
from prefvec_ds.data.pairs import is_held_out
from prefvec_ds.data.tokenize import require_safety_labels
from prefvec_ds.distributed import group
from prefvec_ds.train.dpo import fit_pairs, fit_summary
from prefvec_ds.train.losses import LOSSES
from prefvec_ds.train.ref_logps import ref_table, tokenized_preference
from prefvec_ds.train.sft import export_model
from prefvec_ds.train.stage import base_model_dir, load_tokenizer, mark_done, write_json_atomic

#: The loss each DPO-form baseline trains with (None: dpo.loss_type, DPO's sigmoid by default).
BASELINE_LOSS = {"dpo_joint": None, "dpo_safe_first": None, "bfpo": "bfpo"}
#: Rules that read per-response safety labels of the helpful pairs.
NEEDS_SAFETY = {"dpo_safe_first"}


def baseline_loss(name: str, dpo_loss: str) -> str:
    """The loss the baseline trains with: its own, else dpo.loss_type."""
    return BASELINE_LOSS[name] or dpo_loss


def reads_safety_labels(name: str, dpo_loss: str) -> bool:
    """Whether training baseline `name` reads the helpful pairs' safety labels (its rule or
    its loss); the driver checks the data with it before any launch, the ranks again."""
    return name in NEEDS_SAFETY or LOSSES[baseline_loss(name, dpo_loss)].needs_safety


def _reference(rows: list[Selected], tables: dict[str, dict]) -> torch.Tensor:
    """[N, 4] reference rows aligned with `rows`: the source set's table, columns swapped for
    a flipped pair (as the - direction of a preference does)."""
    ref = []
    for row in rows:
        c, r, nc, nr = tables[row.role][row.pair.key]
        ref.append((c, r, nc, nr) if row.sign == 1 else (r, c, nr, nc))
    return torch.tensor(ref, dtype=torch.float64).reshape(-1, 4)


def train_baseline(cfg: RunConfig, name: str) -> dict:
    """Train the baseline `name` and export its model; every rank must call it."""
    if name not in BASELINE_DATA:
        raise PrefvecError(f"baseline {name!r}: not a trained baseline (expected one of "
                           f"{', '.join(BASELINE_DATA)})")
    loss = baseline_loss(name, cfg.dpo.loss_type)
    cfg = dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, loss_type=loss))
    roles = cfg.pipeline.baseline_roles
    lay = RunLayout.of(cfg)
    folder = lay.baseline(name)
    base = base_model_dir(cfg)
    tokenizer = load_tokenizer(base)
    ds = resolve_ds_config(cfg, cfg.dpo, group.world_size())
    sets, tables = {}, {}
    for role, pref in roles.items():
        sets[role] = tokenized_preference(cfg, pref, tokenizer)
        tables[role] = ref_table(cfg, pref, base, tokenizer, sets[role], ds)  # the stage's table
    if reads_safety_labels(name, cfg.dpo.loss_type):
        require_safety_labels(sets["helpful"], f"data.preferences.{roles['helpful']}",
                              f"pipeline.baselines {name}")
    rows = BASELINE_DATA[name](sets["helpful"], sets["harmless"])
    frac = {role: cfg.data.preferences[pref].eval_fraction for role, pref in roles.items()}
    train = [r for r in rows if not is_held_out(r.pair.key, frac[r.role])]
    held = [r for r in rows if is_held_out(r.pair.key, frac[r.role])]
    if not train:
        raise PrefvecError(f"baseline {name}: no training pairs selected from "
                           f"{', '.join(roles.values())}")
    engine, history, schedule = fit_pairs(
        cfg, folder, base, tokenizer, ds, [r.pair for r in train], _reference(train, tables),
        [r.pair for r in held], _reference(held, tables), f"baseline {name}")
    export_model(engine, base, lay.baseline_model(name), DTYPES_BY_NAME[cfg.model.dtype])
    result = {"baseline": name, "loss_type": loss,
              "selected": {role: sum(r.role == role for r in rows) for role in roles},
              "flipped": sum(r.sign == -1 for r in rows),
              **fit_summary(history, schedule, train, held)}
    if group.rank() == 0:
        write_json_atomic(folder / "eval.json", result)
        mark_done(folder, **result)
    return result
