"""The `pipeline.eval` section (the eta sweep, its scorers and decoding, vector diagnostics) and
GenerationSpec, the decoding settings that eval and MORA share (prefvec_ds.eval.generate).

The eval stage (and `prefvec sweep`) loads theta_base once in fp32, and for every grid point
applies sum_p eta_p * phi_p in place, answers the held-out prompts, scores the answers, measures
the log-prob preference margin of held-out pairs, and removes the vectors again. Preference names
are checked against `data.preferences` when the DAG is built (`prefvec_ds.eval.grid`). Nothing
here imports torch.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from prefvec_ds.ckpt.methods import MERGE_METHODS
from prefvec_ds.config.checks import check, check_choice
from prefvec_ds.config.choices import PromptSource, ScorerKind
from prefvec_ds.config.tune import TuneConfig

GRIDS = ("auto", "product", "pairs", "axes")
BACKENDS = ("auto", "transformers", "vllm")
VllmDtype = Literal["auto", "bf16", "fp16", "fp32"]


@dataclass
class VllmOptions:
    """How a vLLM engine is started (generation.backend auto|vllm on a GPU). vLLM's own
    defaults are unsafe here: 0.9 of the GPU (its start-up check fails while our fp32 base or
    a scorer holds memory), max_model_len 131072 for Llama-3.1 (16 GiB of KV cache for one
    sequence), and the folder's dtype whatever the run asked for."""

    gpu_memory_utilization: float = 0.6
    """Share of the GPU's memory vLLM may take (weights + KV cache). vLLM refuses to start when
    less than this share is free: it is checked after the sweep's own model is freed, but a
    reward/cost scorer stays resident (a few GB), so the default leaves room for it."""
    max_model_len: int = 0
    """Context length vLLM reserves per sequence; 0 = the longest prompt of the call (our own
    tokenization) + max_new_tokens."""
    enforce_eager: bool = False
    """Skip CUDA-graph capture (saves ~1 GB and ~30 s of start-up per engine; slower decode)."""
    dtype: VllmDtype = "auto"
    """Weights dtype in vLLM: auto (eval: the folder's torch_dtype; MORA: pipeline.mora.dtype),
    bf16, fp16 or fp32."""

    def __post_init__(self):
        where = "vllm"  # pipeline.eval.generation.vllm or pipeline.mora.vllm
        check(0 < self.gpu_memory_utilization <= 1, f"{where}.gpu_memory_utilization",
              "in (0, 1]", self.gpu_memory_utilization)
        check(isinstance(self.max_model_len, int) and self.max_model_len >= 0,
              f"{where}.max_model_len", "an integer >= 0 (0 = prompts + max_new_tokens)",
              self.max_model_len)
        check(isinstance(self.enforce_eager, bool), f"{where}.enforce_eager", "true or false",
              self.enforce_eager)
        choices = typing.get_args(VllmDtype)
        check(self.dtype in choices, f"{where}.dtype", " | ".join(choices), self.dtype)


@dataclass
class GenerationSpec:
    """How answers are decoded."""

    max_new_tokens: int = 32
    """Budget of new tokens per answer."""
    do_sample: bool = False
    """False: greedy (deterministic); True: temperature / top-p sampling."""
    temperature: float = 1.0
    """Sampling temperature (ignored when greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass (ignored when greedy)."""
    num_samples: int = 1
    """Answers per prompt (Pass@N in MORA); > 1 needs do_sample."""
    batch_size: int = 32
    """Prompts per generate call (times num_samples sequences)."""
    seed: int = 0
    """Sampling seed; batch b uses seed + b."""
    backend: str = "auto"
    """auto (vLLM when installed and a GPU is present, else transformers), transformers, vllm."""
    vllm: VllmOptions = field(default_factory=VllmOptions)
    """Engine settings when vLLM generates (memory share, context length, eager, dtype)."""

    def __post_init__(self):
        if isinstance(self.vllm, dict):
            self.vllm = VllmOptions(**self.vllm)
        check(self.max_new_tokens >= 1, "generation.max_new_tokens", ">= 1", self.max_new_tokens)
        check(self.temperature > 0, "generation.temperature", "> 0", self.temperature)
        check(0 < self.top_p <= 1, "generation.top_p", "in (0, 1]", self.top_p)
        check(self.num_samples >= 1, "generation.num_samples", ">= 1", self.num_samples)
        check(self.num_samples == 1 or self.do_sample, "generation.num_samples",
              "1 when do_sample is false (greedy answers are all the same)", self.num_samples)
        check(self.batch_size >= 1, "generation.batch_size", ">= 1", self.batch_size)
        check(self.backend in BACKENDS, "generation.backend", " | ".join(BACKENDS), self.backend)


@dataclass
class PromptSetConfig:
    """A named set of eval prompts (pipeline.eval.prompt_sets.<name>): every scorer's axes are
    also reported per set, as `<axis>@<name>` (e.g. refusal@advbench, refusal@xstest)."""

    source: PromptSource = "prompts"
    """alpaca_eval (helpful instructions), advbench, harmbench, beavertails (harmful requests),
    xstest (safe prompts that look unsafe, and unsafe ones), prompts (a .txt with one prompt per
    line, or json/jsonl rows with a `prompt` field). Readers: prefvec_ds.data.prompts."""
    path: str = ""
    """The set's file (`{data_root}/...` is filled from data.root)."""
    subset: str = ""
    """Rows to keep: xstest `safe` | `unsafe` (its label column), harmbench a
    FunctionalCategory (default `standard`: no context string), beavertails a category,
    alpaca_eval a `dataset` value; empty: every row."""
    max_prompts: int = 100
    """At most this many prompts, picked by a hash of their text (stable across runs and spread
    over a file sorted by category); 0: all."""
    axes: list[str] = field(default_factory=list)
    """The scorer axes reported for this set (e.g. [refusal] for harmful requests); empty:
    every axis."""

    def __post_init__(self):
        where = "pipeline.eval.prompt_sets.<name>"
        check_choice(self.source, PromptSource, f"{where}.source")
        check(bool(self.path), f"{where}.path", "a file", self.path)
        check(isinstance(self.max_prompts, int) and self.max_prompts >= 0,
              f"{where}.max_prompts", "an integer >= 0 (0 = all)", self.max_prompts)
        check(isinstance(self.axes, list) and all(isinstance(a, str) for a in self.axes),
              f"{where}.axes", "a list of scorer axis names", self.axes)


def _default_etas() -> list[float]:
    return [-1.0, -0.5, 0.0, 0.5, 1.0]


def _default_scorers() -> list:
    return ["rules"]


@dataclass
class EvalConfig:
    """What the eval stage measures and at which eta points."""

    etas: list[float] = field(default_factory=_default_etas)
    """Values that each swept preference's eta takes (the paper: -1, -0.5, 0, 0.5, 1)."""
    grid: str = "auto"
    """Which eta combinations are points: product (every combination over all preferences:
    5^P points), pairs (a 2-D grid per pair of preferences, the others at rest_eta), axes (one
    preference at a time, the others at rest_eta), auto (product for up to two preferences,
    else pairs). A point always includes eta = 0 everywhere (theta_base)."""
    pairs: list[list[str]] = field(default_factory=list)
    """grid=pairs: the pairs of preferences to sweep (empty: every pair)."""
    rest_eta: float = 0.0
    """grid=pairs|axes: eta of the preferences a point does not sweep (0: left out; 1: the
    paper's default merge)."""
    prompts: int = 200
    """Held-out prompts (distinct prompts of the held-out pairs of every preference) answered
    at every point, when prompt_sets is empty."""
    prompt_sets: dict[str, PromptSetConfig] = field(default_factory=dict)
    """Named eval prompt sets (AlpacaEval, AdvBench, HarmBench, BeaverTails, XSTest, a file):
    when given, their prompts are the ones answered (held-out pairs still give the margins),
    and each axis is also reported per set as `<axis>@<set>`."""
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    """Decoding of the answers. Sampled decoding (do_sample, num_samples > 1) measures rates
    that move smoothly with eta; greedy flips whole answers at a threshold. Each batch reseeds
    from (seed, batch), so every point sees the same random draws (common random numbers:
    differences between points are not sampling noise)."""
    scorers: list = field(default_factory=_default_scorers)
    """Scorer specs, each a kind or {kind: ..., options}: rules (the embedded world's helpful,
    harmless = refusal of harmful prompts, over_refusal, verbosity), reward_model, cost_model,
    refusal (names: prefvec_ds.config.choices.ScorerKind; code: prefvec_ds.eval.scorers)."""
    margin_pairs: int = 200
    """Held-out pairs per preference whose log-prob margin log p(chosen) - log p(rejected)
    (and accuracy: the share with a positive margin) is measured at every point; 0: off.
    No generation: cheap and deterministic."""
    headline: list[str] = field(default_factory=list)
    """The two score columns, higher is better, that `prefvec compare` plots against each other
    and ranks the sweep's points by (e.g. [reward@alpaca_eval, refusal@advbench]); empty: the
    helpful and harmless columns when scored, else the first two."""
    samples_in_report: int = 3
    """Answers shown per point in the report (all answers go to eval/answers.jsonl)."""
    cpu_threads: int = 1
    """torch threads of the sweep on CPU (0 = torch's default). Generation batches of small
    models are many tiny matmuls: extra OpenMP threads only synchronise, and spin against the
    other jobs of a busy node (measured on 2 loaded cores: one sweep point's 286 answers in 2.1 s
    with 1 thread, 23 s with 2)."""
    diagnostic_seeds: list[int] = field(default_factory=list)
    """Extra DPO seeds: each adds dpo/<p>+@seed<k>, dpo/<p>-@seed<k> and vectors/<p>@seed<k>
    (under <run_dir>/seeds/<k>/, sharing theta_base and the reference log-probs) for the
    cross-seed cosine of the vectors (paper: 0.998-0.999). Costs two DPO runs per preference
    and seed."""
    diagnostic_preferences: list[str] = field(default_factory=list)
    """Preferences that get the diagnostic seeds (empty: every preference)."""
    sti_rank: int = 8
    """Subspace Task Interference: rank k of each vector's per-matrix SVD (paper: 8)."""
    sti_matrices: int = 32
    """Subspace Task Interference: the number of largest-norm weight matrices (paper: 32)."""
    interference_methods: list[str] = field(default_factory=list)
    """Merge methods (ties, dare, dare_ties) whose effect on interference the report shows next
    to task_arithmetic: the cosines and STI of the vectors as each method keeps them (trimmed or
    dropped, sign-elected), and the scores of a merge per method at the default merge's etas
    (docs/evaluation.md). Empty: off. Needs 2+ preferences."""
    interference_density: float = 0.5
    """Density (share of each vector's elements kept) of those merges (mergekit's usual 0.5)."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """`prefvec tune-eta`: the objective, constraints and search space of the eta tuner; not
    part of the eval stage (its fingerprint leaves it out)."""

    def __post_init__(self):
        check(isinstance(self.etas, list) and len(self.etas) > 0 and all(
            isinstance(e, (int, float)) and not isinstance(e, bool) for e in self.etas),
            "pipeline.eval.etas", "a non-empty list of numbers", self.etas)
        self.etas = sorted({float(e) for e in self.etas})
        check(self.grid in GRIDS, "pipeline.eval.grid", " | ".join(GRIDS), self.grid)
        check(isinstance(self.pairs, list) and all(
            isinstance(p, list) and len(p) == 2 and p[0] != p[1] for p in self.pairs),
            "pipeline.eval.pairs", "a list of [preference, other preference]", self.pairs)
        check(isinstance(self.rest_eta, (int, float)), "pipeline.eval.rest_eta", "a number",
              self.rest_eta)
        self.rest_eta = float(self.rest_eta)
        if isinstance(self.generation, dict):
            self.generation = GenerationSpec(**self.generation)
        check(self.prompts >= 1, "pipeline.eval.prompts", ">= 1", self.prompts)
        check(isinstance(self.prompt_sets, dict), "pipeline.eval.prompt_sets",
              "a mapping of set name -> {source, path, ...}", self.prompt_sets)
        for name, value in list(self.prompt_sets.items()):
            check(isinstance(name, str) and name.replace("_", "").replace("-", "").isalnum(),
                  "pipeline.eval.prompt_sets", "set names of letters, digits, _ and -", name)
            if isinstance(value, dict):
                self.prompt_sets[name] = PromptSetConfig(**value)
        check(isinstance(self.scorers, list) and all(
            isinstance(s, str) or (isinstance(s, dict) and "kind" in s) for s in self.scorers),
            "pipeline.eval.scorers", "a list of scorer kinds or {kind: ...} mappings",
            self.scorers)
        for spec in self.scorers:
            kind = spec if isinstance(spec, str) else spec["kind"]
            check_choice(kind, ScorerKind, "pipeline.eval.scorers")
        check(isinstance(self.headline, list) and len(self.headline) in (0, 2) and all(
            isinstance(c, str) for c in self.headline), "pipeline.eval.headline",
            "two score column names (or none)", self.headline)
        check(self.margin_pairs >= 0, "pipeline.eval.margin_pairs", ">= 0", self.margin_pairs)
        check(self.cpu_threads >= 0, "pipeline.eval.cpu_threads", ">= 0", self.cpu_threads)
        check(self.samples_in_report >= 0, "pipeline.eval.samples_in_report", ">= 0",
              self.samples_in_report)
        check(isinstance(self.diagnostic_seeds, list) and all(
            isinstance(s, int) and not isinstance(s, bool) for s in self.diagnostic_seeds)
            and len(set(self.diagnostic_seeds)) == len(self.diagnostic_seeds),
            "pipeline.eval.diagnostic_seeds", "a list of distinct integers",
            self.diagnostic_seeds)
        check(isinstance(self.diagnostic_preferences, list), "pipeline.eval.diagnostic_preferences",
              "a list of preference names", self.diagnostic_preferences)
        check(self.sti_rank >= 1, "pipeline.eval.sti_rank", ">= 1", self.sti_rank)
        check(self.sti_matrices >= 1, "pipeline.eval.sti_matrices", ">= 1", self.sti_matrices)
        check(isinstance(self.interference_methods, list) and all(
            m in MERGE_METHODS and m != "task_arithmetic" for m in self.interference_methods),
            "pipeline.eval.interference_methods", "a list of ties | dare | dare_ties "
            "(task_arithmetic is always shown)", self.interference_methods)
        check(isinstance(self.interference_density, (int, float))
              and 0 < self.interference_density <= 1, "pipeline.eval.interference_density",
              "a fraction in (0, 1]", self.interference_density)
        if isinstance(self.tune, dict):
            self.tune = TuneConfig(**self.tune)
