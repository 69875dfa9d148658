"""Intent fusion: a single-reward prompt becomes a multi-intent prompt.

- `structured` (the embedded world): the prompt is fused with a fresh intent of each missing
  dimension: a benign question when helpfulness is never reached, a harmful request when
  harmlessness is not. "how can i rob a store ?" -> "how can i rob a store ? and what is 2 plus
  3 ?", whose best answer refuses the first intent and answers the second.
- `hf`: any HF causal LM (SmolLM2-135M-Instruct here, a large instruct model on a cluster)
  prompted with a template; its first non-empty line is the rewrite.

A rewriter returns one rewrite (or None when it produced nothing usable) per target, in order;
the record keeps the original next to it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Sequence

from prefvec_ds.config.choices import RewriterKind
from prefvec_ds.config.mora import RewriterConfig
from prefvec_ds.data import embedded
from prefvec_ds.data.pairs import Messages, user_prompt

Target = tuple[int, Messages, list[str]]
"""(pool id, prompt, dimensions its answers never reach)"""

#: intents the structured rewriter can add, by the dimension they open up
ADDS = {"helpful": False, "harmless": True}  # dimension -> harmful intent?


class StructuredRewriter:
    """The embedded world's rewriter: fuse with generated intents (seeded per pool id)."""

    def __init__(self, cfg: RewriterConfig):
        self.cfg = cfg

    def rewrite(self, targets: Sequence[Target], seed: int) -> list[str | None]:
        return [self._one(pid, prompt[-1][1], missing, seed) for pid, prompt, missing in targets]

    def _one(self, pid: int, text: str, missing: list[str], seed: int) -> str | None:
        rng = random.Random(seed * 1_000_033 + pid)
        added = [(embedded.random_intent(ADDS[d], rng), ADDS[d]) for d in missing if d in ADDS]
        if not added:
            return None  # e.g. a truthfulness-only gap: no structured intent for it
        own = any(t.harm is not None for t in embedded.parse_intents(text))
        parts = [(text, own), *added]
        order = self.cfg.order
        if order == "random":
            order = rng.choice(("harmful_first", "benign_first"))
        parts.sort(key=lambda p: p[1] != (order == "harmful_first"))  # stable
        return embedded.fuse(*(p for p, _ in parts))


def _first_line(text: str) -> str | None:
    for line in text.splitlines():
        line = line.strip().strip('"').strip()
        for prefix in ("Rewritten request:", "Request:", "Rewritten:"):
            if line.lower().startswith(prefix.lower()):
                line = line[len(prefix):].strip().strip('"').strip()
        if line:
            return line
    return None


class HFRewriter:
    """Any HF causal LM with `cfg.template` as the user message (greedy unless temperature)."""

    def __init__(self, cfg: RewriterConfig, policy_dir: Path):
        from prefvec_ds.eval.generate import load_policy  # noqa: PLC0415

        self.cfg = cfg
        self.model, self.tok = load_policy(cfg.model or policy_dir, cfg.dtype)

    def request(self, text: str, missing: list[str]) -> Messages:
        # replace, not str.format: user prompts may contain braces
        body = self.cfg.template.replace("{missing}", " and ".join(missing) or "helpful")
        return user_prompt(body.replace("{prompt}", text))

    def rewrite(self, targets: Sequence[Target], seed: int) -> list[str | None]:
        from prefvec_ds.eval.generate import GenerationSpec, generate  # noqa: PLC0415

        if not targets:
            return []
        sampled = self.cfg.temperature > 0
        spec = GenerationSpec(max_new_tokens=self.cfg.max_new_tokens, do_sample=sampled,
                              temperature=self.cfg.temperature if sampled else 1.0,
                              batch_size=len(targets), seed=seed, backend="transformers")
        requests = [self.request(prompt[-1][1], missing) for _, prompt, missing in targets]
        return [_first_line(out[0]) for out in generate(self.model, self.tok, requests, spec)]


#: rewriter.kind -> constructor (cfg, policy folder); the keys are
#: prefvec_ds.config.choices.RewriterKind (tests/unit/test_choices.py checks both agree).
REWRITERS: dict[RewriterKind, Callable[[RewriterConfig, Path], object]] = {
    "structured": lambda cfg, policy_dir: StructuredRewriter(cfg),
    "hf": HFRewriter,
}


def build_rewriter(cfg: RewriterConfig, policy_dir: Path):
    return REWRITERS[cfg.kind](cfg, policy_dir)


def rewritten_prompt(original: Messages, text: str) -> Messages:
    """The original conversation with its last user turn replaced by the rewrite."""
    return (*original[:-1], ("user", text))
