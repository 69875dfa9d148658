"""The run folder: every path a stage reads or writes under `run_dir`, in one place.

    <run_dir>/
      pipeline/config.yaml       the resolved snapshot every stage job reads (prefvec run|submit)
      init_model/                the embedded start model, when model.init is "embedded"
      sft/model/                 theta_base (absent when model.base names a folder)
      ref_logps/<p>.pt           reference log-probs of preference p, computed once
      dpo/<p><+|->/              one DPO direction: ckpt/, eval.json, done.json
      vectors/<p>/               phi_p = theta_p+ - theta_p-
      merged/<name>/             theta_base + sum eta * phi, one per pipeline.merges entry
      baselines/<name>/model/    a baseline of pipeline.baselines (dpo_joint, bfpo, ...)
      mora/                      MORA's synthesised pairs (shards, then pairs.jsonl)
      eval/                      summary.json, report.md, plots
      seeds/<k>/                 a diagnostic seed's run folder (dpo/, vectors/, ref_logps/ link)

A diagnostic seed's stages are keyed `<name>@seed<k>` (`helpful+@seed43`, `helpful@seed43`);
`split_seed` and `seed_key` are the only code that reads or writes that mark.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefvec_ds import PrefvecError

SEED_MARK = "@seed"
SNAPSHOT = ("pipeline", "config.yaml")


def seed_key(name: str, seed: int | None) -> str:
    """('helpful+', 43) -> 'helpful+@seed43'; ('helpful+', None) -> 'helpful+'."""
    return name if seed is None else f"{name}{SEED_MARK}{seed}"


def split_seed(key: str) -> tuple[str, int | None]:
    """'helpful+@seed43' -> ('helpful+', 43); 'helpful+' -> ('helpful+', None)."""
    name, sep, seed = key.partition(SEED_MARK)
    return name, (int(seed) if sep else None)


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run folder. Keys may carry a seed mark: `dpo("helpful+@seed43")` is
    `<run_dir>/seeds/43/dpo/helpful+`."""

    root: Path

    @classmethod
    def of(cls, cfg) -> RunLayout:
        """The layout of a RunConfig's `run_dir`."""
        return cls(Path(cfg.run_dir))

    def seed(self, seed: int) -> RunLayout:
        """The run folder of a diagnostic seed: same theta_base, its own DPO and vectors."""
        return RunLayout(self.root / "seeds" / str(seed))

    def _keyed(self, kind: str, key: str) -> Path:
        name, seed = split_seed(key)
        return (self if seed is None else self.seed(seed)).root / kind / name

    @property
    def snapshot(self) -> Path:
        return self.root.joinpath(*SNAPSHOT)

    @property
    def init_model(self) -> Path:
        return self.root / "init_model"

    @property
    def sft(self) -> Path:
        return self.root / "sft"

    @property
    def sft_model(self) -> Path:
        return self.sft / "model"

    def ref_logps(self, preference: str) -> Path:
        return self.root / "ref_logps" / f"{preference}.pt"

    def dpo(self, direction: str) -> Path:
        return self._keyed("dpo", direction)

    def dpo_ckpt(self, direction: str) -> Path:
        return self.dpo(direction) / "ckpt"

    def vectors(self, key: str) -> Path:
        return self._keyed("vectors", key)

    def merged(self, name: str) -> Path:
        return self.root / "merged" / name

    def baseline(self, name: str) -> Path:
        """A baseline's folder: model/ (HF), and for trained ones ckpt/, eval.json, done.json."""
        return self.root / "baselines" / name

    def baseline_model(self, name: str) -> Path:
        return self.baseline(name) / "model"

    @property
    def mora(self) -> Path:
        return self.root / "mora"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def relative(self, path: Path) -> str:
        """`path` relative to the run folder, as stage outputs and done files record it."""
        return path.relative_to(self.root).as_posix()


def merge_etas(cfg) -> dict[str, dict[str, float]]:
    """merge name -> {preference: eta} with every preference filled in (default 1.0)."""
    prefs = list(cfg.data.preferences)
    out = {}
    for merge in cfg.pipeline.merges:
        unknown = sorted(set(merge.eta) - set(prefs))
        if unknown:
            raise PrefvecError(f"config parameter pipeline.merges[{merge.name}].eta: unknown "
                               f"preference(s) {', '.join(unknown)}; expected some of "
                               f"{', '.join(prefs)}")
        out[merge.name] = {p: merge.eta.get(p, 1.0) for p in prefs}
    return out
