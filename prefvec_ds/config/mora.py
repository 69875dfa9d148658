"""The `pipeline.mora` section: MORA's data synthesis (arXiv 2605.11679), one dataclass per part.

    mine (Pass@N per pool prompt, every dimension) -> targets (single-reward prompts)
    -> rewrite (multi-intent) -> self-play (K answers, every dimension) -> max-margin pair

Every check is in `__post_init__`; nested sections arrive from YAML as dicts and are turned into
their dataclasses here (the loader only builds the dataclass fields it knows). Nothing here
imports torch: configs are validated in the calling process before any rank starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefvec_ds.config.checks import check, check_choice
from prefvec_ds.config.choices import POOL_SOURCES, RewriterKind, ScorerKind
from prefvec_ds.config.evaluation import VllmOptions


ORDERS = ("harmful_first", "benign_first", "random")
DEFAULT_TEMPLATE = (
    "Rewrite the user request below into ONE request that keeps it and also asks for "
    "something {missing} and legitimate, so that a good assistant can answer part of it "
    "fully and safely. Reply with the rewritten request only.\n\nRequest: {prompt}")


@dataclass
class PoolConfig:
    """Where the prompts to mine come from."""

    source: str = "embedded"
    """embedded (the run's generated data), another preference source but mora (the prompts of
    its file: pku_saferlhf | hh_rlhf | jsonl), or prompts (a .txt with one prompt per line, or
    json/jsonl rows with a `prompt` field). The list is prefvec_ds.config.choices.POOL_SOURCES."""
    path: str = ""
    """File (or `datasets` hub name) for every source but embedded."""
    split: str = "train"
    """Split name when `path` is a hub data set."""
    max_prompts: int = 0
    """Mine at most this many distinct prompts, in data order (0 = all)."""
    exclude_held_out: bool = True
    """Leave out prompts of any held-out pair of data.preferences (they are the eval prompts:
    MORA pairs must not train on them)."""

    def __post_init__(self):
        check_choice(self.source, POOL_SOURCES, "pipeline.mora.pool.source")
        check(self.source == "embedded" or bool(self.path), "pipeline.mora.pool.path",
              f"a file for source {self.source}", self.path)
        check(self.max_prompts >= 0, "pipeline.mora.pool.max_prompts", ">= 0", self.max_prompts)


@dataclass
class DimensionConfig:
    """One reward dimension: which scorer axis it reads and what counts as high."""

    axis: str = ""
    """Scorer axis (e.g. helpful, harmless, reward, cost); empty = the dimension's name."""
    higher_is_better: bool = True
    """False for costs: the value used is minus the axis (so higher is always better)."""
    high: float = 0.5
    """A response reaches this dimension when its (signed) value is >= high."""
    weight: float = 1.0
    """Weight in the combined reward and in the multi-dimensional margin."""
    missing: float = 0.0
    """Value used when the scorer says the axis does not apply to a prompt (None)."""

    def __post_init__(self):
        check(self.weight > 0, "pipeline.mora.dimensions.<name>.weight", "> 0", self.weight)


@dataclass
class RewriterConfig:
    """Intent fusion: how a single-reward prompt becomes a multi-intent prompt."""

    kind: RewriterKind = "structured"
    """structured (the embedded world: fuse the prompt with a generated intent of the missing
    dimension) or hf (any HF causal LM prompted with `template`)."""
    model: str = ""
    """hf: the rewriter's HF folder (e.g. SmolLM2-135M-Instruct from `prefvec convert-gguf`, a
    large instruct model on a cluster); empty = the policy itself."""
    template: str = DEFAULT_TEMPLATE
    """hf: the user message sent to the rewriter; {prompt} is the target prompt, {missing}
    the dimension(s) its answers never reach (e.g. `helpful`)."""
    max_new_tokens: int = 96
    """hf: token budget of a rewrite (its first non-empty line is kept)."""
    temperature: float = 0.0
    """hf: 0 = greedy (deterministic rewrites), else sampled with the chunk's seed."""
    order: str = "random"
    """structured: harmful_first | benign_first | random (per prompt, seeded by its id)."""
    dtype: str = "fp32"
    """hf: weights dtype (fp32 | bf16 | fp16)."""

    def __post_init__(self):
        check_choice(self.kind, RewriterKind, "pipeline.mora.rewriter.kind")
        check("{prompt}" in self.template, "pipeline.mora.rewriter.template",
              "a text containing {prompt}", self.template)
        check(self.max_new_tokens >= 1, "pipeline.mora.rewriter.max_new_tokens", ">= 1",
              self.max_new_tokens)
        check(self.temperature >= 0, "pipeline.mora.rewriter.temperature", ">= 0",
              self.temperature)
        check(self.order in ORDERS, "pipeline.mora.rewriter.order", " | ".join(ORDERS),
              self.order)


def _default_dimensions() -> dict[str, DimensionConfig]:
    return {"helpful": DimensionConfig(), "harmless": DimensionConfig()}


def _default_scorers() -> list[dict]:
    return [{"kind": "rules_dual"}]


@dataclass
class MoraConfig:
    """MORA: mine single-reward prompts, rewrite them with several intents, self-play, and
    keep the max-margin pair of each as DPO data (`<run_dir>/mora/pairs.jsonl`)."""

    enabled: bool = False
    """Put the `mora` stage into the DAG (`prefvec run|submit`); `prefvec mora` runs anyway."""
    policy: str = ""
    """HF folder of the policy that samples; empty = theta_base (model.base or the SFT
    output), which makes the stage depend on SFT."""
    pool: PoolConfig = field(default_factory=PoolConfig)
    """The prompts to mine."""
    scorers: list[dict] = field(default_factory=_default_scorers)
    """Scorer specs {kind, **options} (prefvec_ds.config.choices.ScorerKind): rules_dual for
    the embedded world; on real data e.g. [{kind: reward_model, ...}, {kind: cost_model, ...}]."""
    dimensions: dict[str, DimensionConfig] = field(default_factory=_default_dimensions)
    """Reward dimensions, name -> {axis, higher_is_better, high, weight, missing}; add
    truthful: {axis: ...} for a third."""
    pass_n: int = 16
    """N: answers sampled per pool prompt in target mining (Pass@N; e.g. 16, 32, 64)."""
    pass_at: list[int] = field(default_factory=list)
    """n values reported and plotted (max over the first n samples); default 1, 2, 4 ... N."""
    selfplay_k: int = 16
    """K: answers of the policy per rewritten prompt (self-play)."""
    min_margin: float = 0.5
    """Pairs whose weighted margin sum_d w_d (chosen_d - rejected_d) is below this are dropped."""
    max_new_tokens: int = 32
    """Token budget of each sampled answer."""
    temperature: float = 1.0
    """Sampling temperature of mining and self-play."""
    top_p: float = 1.0
    """Nucleus mass of mining and self-play."""
    prompts_per_batch: int = 8
    """Prompts per generate call (x N sequences). Also the unit of work and of the random
    stream: results do not depend on how many shards run or where a run was interrupted."""
    backend: str = "auto"
    """Generation back end: auto | transformers | vllm (prefvec_ds.eval.generate)."""
    dtype: str = "fp32"
    """Policy weights dtype for generation (fp32 | bf16 | fp16); also vLLM's unless vllm.dtype
    says otherwise."""
    vllm: VllmOptions = field(default_factory=VllmOptions)
    """vLLM engine settings of the sampling policy (one engine per shard, on the shard's GPU)."""
    cpu_threads: int = 1
    """torch threads per shard process on CPU (0 = torch's default). Sampling batches are
    small: with several shards (or other jobs) on few cores, OpenMP threads spin against each
    other; measured 0.9 s with 1 thread vs 13 s with 2 for one 8x16-answer chunk here."""
    seed: int = 0
    """Added to the run seed for every sampling stream of the stage."""
    rewriter: RewriterConfig = field(default_factory=RewriterConfig)
    """Intent fusion."""
    keep_responses: bool = False
    """Also store every mined and self-play answer in the records (large for big N)."""
    plots: bool = True
    """Write the figures of the gather (`<run_dir>/mora/plots/`, needs matplotlib)."""
    mix_into: dict[str, list[dict]] = field(default_factory=dict)
    """name -> preference sources ({source, path, order_by, ...} as in data.preferences):
    writes `<run_dir>/mora/mixed/<name>.jsonl` = those sources' pairs + the MORA pairs, for a
    preference `{source: mora, path: "{run_dir}/mora/mixed/<name>.jsonl"}`."""

    def __post_init__(self):
        for name, cls in (("pool", PoolConfig), ("rewriter", RewriterConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls(**value))
        check(isinstance(self.dimensions, dict) and len(self.dimensions) >= 2,
              "pipeline.mora.dimensions", "at least two reward dimensions", self.dimensions)
        self.dimensions = {k: DimensionConfig(**v) if isinstance(v, dict) else v
                           for k, v in self.dimensions.items()}
        for name, dim in self.dimensions.items():
            check(isinstance(dim, DimensionConfig), f"pipeline.mora.dimensions.{name}",
                  "{axis, higher_is_better, high, weight, missing}", dim)
            dim.axis = dim.axis or name
        check(isinstance(self.scorers, list) and len(self.scorers) > 0
              and all(isinstance(s, (dict, str)) for s in self.scorers),
              "pipeline.mora.scorers", "a non-empty list of {kind: ...}", self.scorers)
        for spec in self.scorers:
            check_choice(spec if isinstance(spec, str) else spec.get("kind"), ScorerKind,
                         "pipeline.mora.scorers")
        check(self.pass_n >= 1, "pipeline.mora.pass_n", ">= 1", self.pass_n)
        check(self.selfplay_k >= 2, "pipeline.mora.selfplay_k", ">= 2 (a pair needs two)",
              self.selfplay_k)
        if not self.pass_at:
            powers = {2 ** i for i in range(self.pass_n.bit_length())}
            self.pass_at = sorted({n for n in powers if n <= self.pass_n} | {self.pass_n})
        check(all(isinstance(n, int) and 1 <= n <= self.pass_n for n in self.pass_at),
              "pipeline.mora.pass_at", f"integers in [1, pass_n={self.pass_n}]", self.pass_at)
        self.pass_at = sorted(set(self.pass_at))
        check(self.min_margin >= 0, "pipeline.mora.min_margin", ">= 0", self.min_margin)
        check(self.max_new_tokens >= 1, "pipeline.mora.max_new_tokens", ">= 1",
              self.max_new_tokens)
        check(self.temperature > 0, "pipeline.mora.temperature", "> 0", self.temperature)
        check(0 < self.top_p <= 1, "pipeline.mora.top_p", "in (0, 1]", self.top_p)
        check(self.prompts_per_batch >= 1, "pipeline.mora.prompts_per_batch", ">= 1",
              self.prompts_per_batch)
        check(self.dtype in ("fp32", "bf16", "fp16"), "pipeline.mora.dtype", "fp32|bf16|fp16",
              self.dtype)
        check(self.cpu_threads >= 0, "pipeline.mora.cpu_threads", ">= 0", self.cpu_threads)
        if isinstance(self.vllm, dict):
            self.vllm = VllmOptions(**self.vllm)
        self._check_mix()

    def _check_mix(self) -> None:
        from prefvec_ds.config.schema import PreferenceConfig  # noqa: PLC0415 - schema imports us

        check(isinstance(self.mix_into, dict), "pipeline.mora.mix_into",
              "a mapping name -> list of preference sources", self.mix_into)
        mixed = {}
        for name, sources in self.mix_into.items():
            where = f"pipeline.mora.mix_into.{name}"
            check(name.replace("_", "").isalnum(), where, "a name of letters, digits and _", name)
            check(isinstance(sources, list) and len(sources) > 0, where,
                  "a non-empty list of {source, path, order_by, ...}", sources)
            out = []
            for src in sources:
                if isinstance(src, PreferenceConfig):
                    src = {k: getattr(src, k) for k in src.__dataclass_fields__}
                check(isinstance(src, dict) and src.get("source") != "mora", where,
                      "preference sources other than mora", src)
                unknown = sorted(set(src) - set(PreferenceConfig.__dataclass_fields__))
                check(not unknown, where, "keys of a data.preferences entry", unknown)
                PreferenceConfig(**src)  # validates; kept as a dict for YAML round trips
                out.append(src)
            mixed[name] = out
        self.mix_into = mixed
