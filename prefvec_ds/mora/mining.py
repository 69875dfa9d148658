"""Target mining: the prompt pool, Pass@N reach per dimension, single-reward prompts.

A prompt is a *target* (single-reward) when none of its N sampled answers is high on two or
more dimensions at once while some answer is high on one: whatever the policy says, the prompt
caps the combined reward. On the embedded world these are the harmful prompts (a refusal is
harmless but never helpful); with reward and cost models they also include prompts where
compliance is helpful and refusal harmless but nothing is both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefvec_ds import PrefvecError
from prefvec_ds.config.schema import PreferenceConfig, RunConfig
from prefvec_ds.data import embedded
from prefvec_ds.data.pairs import Messages, is_held_out, user_prompt
from prefvec_ds.mora.scoring import DimensionTable, Vector

CATEGORIES = ("helpful", "safety", "all")
"""helpful = a pool prompt with only benign intents, safety = one with a harmful intent (the
embedded world knows; other pools take a `category` column, else `all`)."""


@dataclass(frozen=True)
class PoolPrompt:
    id: int
    """Position in the pool: the key of every record, shard and random stream."""
    prompt: Messages
    category: str


def _embedded_category(text: str) -> str:
    tasks = embedded.parse_intents(text)
    if not tasks:
        return "all"
    return "safety" if any(t.harm is not None for t in tasks) else "helpful"


def _prompt_rows(path: str) -> list[tuple[str, str]]:
    from prefvec_ds.data.sources import read_rows  # noqa: PLC0415

    p = Path(path)
    if p.suffix == ".txt":
        if not p.is_file():
            raise PrefvecError(f"config parameter pipeline.mora.pool.path: {p} does not exist")
        return [(line.strip(), "") for line in p.read_text(encoding="utf-8").splitlines()
                if line.strip()]
    out = []
    for i, row in enumerate(read_rows(path)):
        if "prompt" not in row:
            raise PrefvecError(f"{path}:{i}: missing column prompt; the row has "
                               f"{', '.join(sorted(row))}")
        out.append((row["prompt"], str(row.get("category", ""))))
    return out


def held_out_prompts(cfg: RunConfig) -> set[Messages]:
    """Prompts of held-out pairs (the eval prompts) of every base data set: the non-MORA
    preferences and the sources MORA pairs are mixed into. One pair is held out by a hash of
    its key under a fraction, so the largest fraction configured covers every split."""
    from prefvec_ds.data.sources import load_preference  # noqa: PLC0415

    prefs = cfg.data.preferences
    fraction = max(p.eval_fraction for p in prefs.values())
    bases = [(n, p) for n, p in prefs.items() if p.source != "mora"]
    bases += [(f"mix_into.{n}", PreferenceConfig(**src))
              for n, srcs in cfg.pipeline.mora.mix_into.items() for src in srcs]
    out: set[Messages] = set()
    for name, pref in bases:
        out |= {p.prompt for p in load_preference(name, pref, cfg.data)
                if is_held_out(p.key(), max(fraction, pref.eval_fraction))}
    return out


def load_pool(cfg: RunConfig) -> list[PoolPrompt]:
    """The distinct prompts to mine, in data order, each with its category."""
    from prefvec_ds.data.sources import load_preference  # noqa: PLC0415

    pool = cfg.pipeline.mora.pool
    if pool.source == "embedded":
        rows = embedded.preference_rows(cfg.data.embedded_size, cfg.data.embedded_seed)
        items = [(user_prompt(r["prompt"]), _embedded_category(r["prompt"])) for r in rows]
    elif pool.source == "prompts":
        items = [(user_prompt(t), c or _embedded_category(t)) for t, c in _prompt_rows(pool.path)]
    else:
        pref = PreferenceConfig(source=pool.source, path=pool.path, split=pool.split)
        items = [(p.prompt, _embedded_category(p.prompt[-1][1]))
                 for p in load_preference("mora-pool", pref, cfg.data)]
    skip = held_out_prompts(cfg) if pool.exclude_held_out else set()
    seen: set[Messages] = set()
    kept: list[tuple[Messages, str]] = []
    for prompt, category in items:
        if prompt not in seen and prompt not in skip:
            seen.add(prompt)
            kept.append((prompt, category if category in CATEGORIES else "all"))
    if pool.max_prompts:
        kept = kept[:pool.max_prompts]
    if not kept:
        raise PrefvecError(f"config parameter pipeline.mora.pool: no prompts left from source "
                           f"{pool.source} {pool.path}".rstrip())
    return [PoolPrompt(i, p, c) for i, (p, c) in enumerate(kept)]


def classify(vectors: list[Vector], table: DimensionTable) -> dict:
    """Reach of one prompt's answers: per-dimension max, how many dimensions one answer
    reaches at once, whether the prompt is a single-reward target, and what it misses."""
    dims = list(table.dims)
    reach = {d: max(v[d] for v in vectors) for d in dims}
    joint = max(len(table.reached(v)) for v in vectors)
    missing = [d for d in dims if reach[d] < table.dims[d].high]
    if joint == 1 and not missing:
        # every dimension is reached, but never two by one answer (the conflict): ask for the
        # dimensions other than the one reached most often
        counts = {d: sum(v[d] >= table.dims[d].high for v in vectors) for d in dims}
        top = max(dims, key=lambda d: counts[d])
        missing = [d for d in dims if d != top]
    return {"reach": reach, "joint": joint,
            "kind": "none" if joint == 0 else "single" if joint == 1 else "multi",
            "target": joint == 1, "missing": missing if joint == 1 else []}


def pass_at(combined: list[float], ns: list[int]) -> dict[str, float]:
    """Max combined reward over the first n answers, for each n (answers are i.i.d. samples,
    so a prefix is a Pass@n draw)."""
    return {str(n): max(combined[:n]) for n in ns if n <= len(combined)}
