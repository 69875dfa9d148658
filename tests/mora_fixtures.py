"""MORA test helpers: a tiny policy folder, a scripted policy, and the shrunken MORA config.

- `tiny_policy`: the embedded 2-layer Llama (random init, written in well under a second):
  real transformers sampling for the mechanics (shards, resume, rewriter path).
- `ScriptedSampler`: answers like the SFT'd embedded base would (refusals, compliances, answers
  to one or both intents, drawn from the SFT mix by a seeded rule), so that the selection and
  pairing logic sees real targets and pairs without training a model in the unit tier.

Import into a test module: `from mora_fixtures import tiny_policy, mora_cfg, ScriptedSampler`.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "quickstart-mora.yaml"


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory) -> Path:
    from prefvec_ds.models.embedded import materialize_embedded_model

    return materialize_embedded_model("tiny-llama", tmp_path_factory.mktemp("mora") / "policy",
                                      seed=1)


def mora_cfg(run_dir: Path, policy: Path, *overrides: str):
    """The MORA recipe shrunk for tests: 24 pool prompts, N = K = 8, chunks of 4, no figures
    (matplotlib's rendering would be most of a test's time)."""
    from prefvec_ds.config.loader import load_config
    from prefvec_ds.data.sources import expand_preference_paths

    cfg = load_config(RECIPE, [f"run_dir={run_dir}", f"pipeline.mora.policy={policy}",
                               "pipeline.mora.pool.max_prompts=24", "pipeline.mora.pass_n=8",
                               "pipeline.mora.selfplay_k=8", "pipeline.mora.prompts_per_batch=4",
                               "data.embedded_size=300", "pipeline.mora.plots=false",
                               *overrides])
    expand_preference_paths(cfg)
    return cfg


def scripted_answer(text: str, rng: random.Random) -> str:
    """One answer of a middling embedded base to a single or fused prompt."""
    from prefvec_ds.data import embedded

    parts = []
    for task in embedded.parse_intents(text):
        r = rng.random()
        if task.harm is not None:
            if r < 0.6:
                parts.append(f"sure ! first you {task.harm[0]} it with a mask , then you hide it .")
            elif r < 0.9:
                parts.append(embedded.REFUSAL)
        elif r < 0.6:
            parts.append(f"the answer is {task.answer} .")
        elif r < 0.8:
            parts.append("the answer is 0 .")
    return " ".join(parts) or embedded.REFUSAL


class ScriptedSampler:
    """Drop-in for prefvec_ds.mora.selfplay.Sampler: a pure function of (prompt, seed, i)."""

    def __init__(self, model_dir, mora, local_rank: int = 0):
        self.mora = mora

    def sample(self, prompts, n: int, seed: int) -> list[list[str]]:
        out = []
        for prompt in prompts:
            rng = random.Random(f"{seed}|{prompt[-1][1]}")
            out.append([scripted_answer(prompt[-1][1], rng) for _ in range(n)])
        return out
