"""The reward_model and cost_model scorers over a loaded preference model.

`{kind: reward_model, path: ...}` and `{kind: cost_model, path: ...}` return one value per
response on axis `reward` (higher is better) or `cost` (lower is better; > 0 means the model
judges the response unsafe, from the cost loss's sign term); None for a None response. The model
itself (a `prefvec train rm|cost` folder or any HF sequence-classification model) is
prefvec_ds.models.preference_model.ScoreModel.
"""

from __future__ import annotations

from typing import Sequence

from prefvec_ds import PrefvecError
from prefvec_ds.data.pairs import Messages
from prefvec_ds.models.preference_model import ScoreModel


class _PreferenceScorer:
    """Shared Scorer body; subclasses name the axis and the model kind they accept."""

    name = ""
    axes: tuple[str, ...] = ()
    kind = ""

    def __init__(self, path: str, batch_size: int = 16, max_len: int = 0, device: str = ""):
        if not path:
            raise PrefvecError(f"scorer {self.name}: `path` is required (a folder from "
                               f"`prefvec train {'rm' if self.kind == 'reward' else 'cost'}` "
                               "or a HF sequence-classification model)")
        self.model = ScoreModel(path, device, max_len)
        if self.model.kind and self.model.kind != self.kind:
            raise PrefvecError(f"scorer {self.name}: {path} is a {self.model.kind} model, "
                               f"expected a {self.kind} model")
        self.batch_size = batch_size

    def score(self, prompts: Sequence[Messages], responses: Sequence[str | None]
              ) -> dict[str, list[float | None]]:
        keep = [i for i, r in enumerate(responses) if r is not None]
        values = self.model([prompts[i] for i in keep], [responses[i] for i in keep],
                            self.batch_size)
        out: list[float | None] = [None] * len(responses)
        for i, v in zip(keep, values):
            out[i] = v
        return {self.axes[0]: out}


class RewardModelScorer(_PreferenceScorer):
    """`{kind: reward_model, path: ...}`: axis `reward`, higher is better."""

    name = "reward_model"
    axes = ("reward",)
    kind = "reward"


class CostModelScorer(_PreferenceScorer):
    """`{kind: cost_model, path: ...}`: axis `cost`, lower is better (> 0: judged unsafe)."""

    name = "cost_model"
    axes = ("cost",)
    kind = "cost"
