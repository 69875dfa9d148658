"""The run configuration: one dataclass per component, a docstring under every field.

Every check lives in `__post_init__` so a config is valid the moment it exists; errors name the
parameter by its dotted path (e.g. `dpo.beta`) and say what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from prefvec_ds import PrefvecError
from prefvec_ds.config.checks import check as _check
from prefvec_ds.config.checks import check_choice
from prefvec_ds.config.choices import LossType, PreferenceSource
from prefvec_ds.config.pipeline import PipelineConfig


@dataclass
class ModelConfig:
    path: str = "embedded:tiny-llama"
    """Initial model of the SFT stage: a Hugging Face folder, or `embedded:tiny-llama` for the
    built-in 2-layer Llama and word-level tokenizer (no download)."""
    base: str = ""
    """theta_base (reference model and DPO start): a HF folder; empty = the SFT stage's output
    `<run_dir>/sft/model`. Set it to skip SFT and align an existing instruct model."""
    dtype: str = "fp32"
    """Weights dtype when exported (fp32 | bf16 | fp16); training precision is set by ds_config."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (saves memory on 3B-8B models)."""

    def __post_init__(self):
        _check(self.dtype in ("fp32", "bf16", "fp16"), "model.dtype", "fp32|bf16|fp16", self.dtype)


@dataclass
class PreferenceConfig:
    source: PreferenceSource = "embedded"
    """Where pairs come from: embedded | pku_saferlhf | hh_rlhf | jsonl | mora (pairs written by
    the MORA stage; `path: "{run_dir}/mora/pairs.jsonl"` or a `mixed/<name>.jsonl`). The names:
    prefvec_ds.config.choices.PreferenceSource; the readers: prefvec_ds.data.sources."""
    path: str = ""
    """Local json/jsonl/jsonl.gz/parquet file, or a `datasets` hub name (pku_saferlhf, hh_rlhf)."""
    order_by: str = "better_response_id"
    """pku_saferlhf (and embedded): the `*_response_id` column that orders a pair:
    better_response_id (helpfulness), safer_response_id (harmlessness), or another such column
    (the embedded data also has concise_response_id)."""
    split: str = "train"
    """Split name when `path` is a hub data set."""
    max_pairs: int = 0
    """Use at most this many pairs (0 = all), taken in file order before the eval split."""
    eval_fraction: float = 0.1
    """Fraction of pairs held out (deterministically, by a hash of the pair) for eval metrics."""
    also: list = field(default_factory=list)
    """More pairs of this preference from other files or sources, each a mapping {source, path,
    max_pairs, order_by, split} (e.g. harmlessness from PKU-derived safety pairs and HH-RLHF
    harmless). The parts are interleaved pair by pair (this one first), so `max_pairs` above
    keeps a share of each; `eval_fraction` above applies to all (a part's own is ignored)."""

    def __post_init__(self):
        check_choice(self.source, PreferenceSource, "data.preferences.<name>.source", sep="|")
        _check(isinstance(self.also, list) and all(isinstance(a, (dict, PreferenceConfig))
                                                   for a in self.also),
               "data.preferences.<name>.also", "a list of {source, path, ...} mappings",
               self.also)
        parts = []
        for part in self.also:
            if isinstance(part, dict):
                known = [f.name for f in fields(PreferenceConfig)]
                unknown = sorted(set(part) - set(known))
                _check(not unknown, "data.preferences.<name>.also[]",
                       f"keys among {', '.join(known)}", ", ".join(unknown))
                part = PreferenceConfig(**part)
            _check(not part.also, "data.preferences.<name>.also[].also", "absent (one level)",
                   part.also)
            parts.append(part)
        self.also = parts
        _check(self.order_by.endswith("_response_id"), "data.preferences.<name>.order_by",
               "a *_response_id column such as better_response_id", self.order_by)
        _check(self.source == "embedded" or bool(self.path), "data.preferences.<name>.path",
               f"a file or data set name for source {self.source}", self.path)
        _check(0.0 <= self.eval_fraction < 1.0, "data.preferences.<name>.eval_fraction",
               "a number in [0, 1)", self.eval_fraction)
        _check(self.max_pairs >= 0, "data.preferences.<name>.max_pairs", ">= 0", self.max_pairs)


def _default_preferences() -> dict[str, PreferenceConfig]:
    return {"helpful": PreferenceConfig(order_by="better_response_id"),
            "harmless": PreferenceConfig(order_by="safer_response_id")}


@dataclass
class DataConfig:
    max_len: int = 512
    """Maximum tokens of prompt + response; longer examples lose prompt tokens from the left."""
    max_prompt_len: int = 256
    """Prompt tokens always kept when an example is too long (the response gets the rest)."""
    drop_overlong_prompts: bool = False
    """A prompt longer than max_len is an error (default) or, if true, its pair is dropped."""
    sft_source: str = "embedded"
    """SFT data: `embedded`, `embedded-multi-intent` (the same plus 25% fused harmful + benign
    prompts, for MORA), or a json/jsonl/parquet file of {prompt, response}, {messages} or
    Alpaca {instruction, input, output} rows."""
    embedded_size: int = 2000
    """Number of generated preference rows of the embedded data set."""
    embedded_seed: int = 0
    """Seed of the embedded data generator (the data set is a pure function of it)."""
    preferences: dict[str, PreferenceConfig] = field(default_factory=_default_preferences)
    """Preference name -> source; each preference p trains directions p+ and p-."""
    root: str = ""
    """Folder of the public data sets (HH-RLHF, PKU-SafeRLHF, AlpacaEval, XSTest, ...): a
    `{data_root}` in any data path (data.preferences, data.sft_source,
    pipeline.eval.prompt_sets) is replaced by it, so `data.root=/scratch/data` moves a recipe to
    another machine. Empty with a `{data_root}` path is an error naming this parameter."""

    def __post_init__(self):
        _check(self.max_len >= 16, "data.max_len", ">= 16", self.max_len)
        _check(0 < self.max_prompt_len < self.max_len, "data.max_prompt_len",
               f"in (0, data.max_len={self.max_len})", self.max_prompt_len)
        _check(len(self.preferences) > 0, "data.preferences", "at least one preference", {})
        for name in self.preferences:
            _check(name.replace("_", "").isalnum(), "data.preferences",
                   "names of letters, digits and _", name)


@dataclass
class OptimConfig:
    """Fields shared by the SFT and DPO stages."""

    epochs: float = 1.0
    """Passes over the training data (fractions allowed)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = epochs decide)."""
    lr: float = 2e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    warmup_ratio: float = 0.03
    """Fraction of the steps with linear warmup before the cosine decay."""
    scheduler: str = "cosine"
    """Learning-rate schedule after warmup: cosine | linear | constant."""
    micro_batch_size: int = 4
    """Examples per rank per forward (a DPO example is a pair: 2 sequences)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    save_every: int = 0
    """Save a ZeRO-3 checkpoint every N steps (0 = only at the end)."""
    log_every: int = 10
    """Write TensorBoard scalars every N steps."""
    keep_checkpoints: int = 2
    """Complete ZeRO-3 checkpoint tags kept in <stage>/ckpt (the newest N; 0 = keep all). An
    8B tag is ~96 GB (12 B/param), and ~6 saves per direction filled ~2.6 TB for the 8B recipe.
    The tag a run resumed from and the one `latest` names are never deleted."""

    def _validate(self, stage: str):
        _check(self.epochs > 0, f"{stage}.epochs", "> 0", self.epochs)
        _check(self.lr > 0, f"{stage}.lr", "> 0", self.lr)
        _check(0 <= self.warmup_ratio < 1, f"{stage}.warmup_ratio", "in [0, 1)",
               self.warmup_ratio)
        _check(self.scheduler in ("cosine", "linear", "constant"), f"{stage}.scheduler",
               "cosine|linear|constant", self.scheduler)
        for name in ("micro_batch_size", "grad_accum", "log_every"):
            _check(getattr(self, name) >= 1, f"{stage}.{name}", ">= 1", getattr(self, name))
        _check(self.save_every >= 0 and self.max_steps >= 0, f"{stage}.save_every/max_steps",
               ">= 0", (self.save_every, self.max_steps))
        _check(isinstance(self.keep_checkpoints, int) and self.keep_checkpoints >= 0,
               f"{stage}.keep_checkpoints", "an integer >= 0 (0 = keep all)",
               self.keep_checkpoints)


@dataclass
class SFTConfig(OptimConfig):
    """Supervised fine-tuning that makes theta_base (paper: 3 epochs, lr 2e-5, cosine)."""

    def __post_init__(self):
        self._validate("sft")


@dataclass
class DPOConfig(OptimConfig):
    """DPO per preference direction (paper: 2 epochs, lr 1e-6, wd 0.05, beta 0.1)."""

    beta: float = 0.1
    """Strength of the KL anchor to theta_base; the implicit reward is beta * log-ratio."""
    loss_type: LossType = "sigmoid"
    """sigmoid (DPO) | ipo | hinge | bfpo (prefvec_ds.train.losses.LOSSES)."""
    label_smoothing: float = 0.0
    """Conservative DPO: probability that a label is flipped (sigmoid loss only)."""
    bfpo_b1: float = 3.0
    """BFPO's b1 (> 1; b3 = 1/(b1 - 1)): how far a safe chosen response is pushed up
    (loss_type bfpo only; the paper's and wx-zhang/bfpo's default 3)."""
    bfpo_alpha: float = 0.5
    """BFPO's alpha: the shift of every target (loss_type bfpo only; default 0.5)."""
    eval_every: int = 0
    """Evaluate held-out pairs every N steps (0 = at start and end only)."""
    share_prompt: bool = True
    """Run each pair as one sequence prompt+chosen+rejected, the rejected response masked from
    the chosen one, so the shared prompt is computed once (same log-probs; ~35% fewer tokens
    on HH-RLHF). Needs sdpa or eager attention; with flash-attention kernels, or false, chosen
    and rejected are two rows of the batch (the usual layout)."""

    def __post_init__(self):
        self._validate("dpo")
        _check(isinstance(self.share_prompt, bool), "dpo.share_prompt", "true or false",
               self.share_prompt)
        _check(self.beta > 0, "dpo.beta", "> 0", self.beta)
        check_choice(self.loss_type, LossType, "dpo.loss_type", sep="|")
        _check(0 <= self.label_smoothing < 0.5, "dpo.label_smoothing", "in [0, 0.5)",
               self.label_smoothing)
        _check(self.bfpo_b1 > 1, "dpo.bfpo_b1", "> 1", self.bfpo_b1)


@dataclass
class DistributedConfig:
    ds_config: str = "ds_configs/zero3_cpu_fp32.json"
    """DeepSpeed JSON owning the ZeRO stage (1, 2 or 3) and precision (relative paths: the config
    file's folder, then the project's ds_configs/). Its batch fields must agree with the run
    config or be absent."""
    nproc_per_node: int = 2
    """Ranks per node for each stage (GPUs per node on a cluster)."""
    nnodes: int = 1
    """Nodes per stage (SLURM)."""
    launcher: str = "deepspeed"
    """How `prefvec train` starts ranks when not already inside a launch: deepspeed | torchrun."""
    max_concurrent_jobs: int = 0
    """Local executor: DPO directions run at once (0 = as many as the devices allow)."""
    timeout_minutes: int = 60
    """Collective timeout of the ranks (DEEPSPEED_TIMEOUT, minutes; DeepSpeed's default is 10):
    an 8B ZeRO-3 save writes ~96 GB before its barrier, and the first hub download of a data
    set happens per rank before the first collective."""

    def __post_init__(self):
        _check(self.nproc_per_node >= 1, "distributed.nproc_per_node", ">= 1",
               self.nproc_per_node)
        _check(self.nnodes >= 1, "distributed.nnodes", ">= 1", self.nnodes)
        _check(self.launcher in ("deepspeed", "torchrun"), "distributed.launcher",
               "deepspeed|torchrun", self.launcher)
        _check(isinstance(self.timeout_minutes, int) and self.timeout_minutes >= 1,
               "distributed.timeout_minutes", "an integer >= 1", self.timeout_minutes)


@dataclass
class RunConfig:
    run_dir: str = "runs/quickstart"
    """Folder of every stage's outputs; the resolved config is written here."""
    seed: int = 42
    """Seed of model init, data order and dropout; the same seed reproduces a run."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to start from."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data sources and tokenization."""
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(epochs=3, lr=2e-5))
    """The SFT stage."""
    dpo: DPOConfig = field(default_factory=lambda: DPOConfig(epochs=2, lr=1e-6,
                                                             weight_decay=0.05))
    """The four (or more) DPO stages."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Launch and DeepSpeed settings."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """The stage DAG (`prefvec run` / `prefvec submit`): merges to build, eval, SLURM resources."""
    source_path: str = ""
    """Set by the loader: the YAML this config came from (for relative paths)."""

    def __post_init__(self):
        fill_data_root(self)

    def directions(self) -> list[str]:
        """Every trainable direction: p+ and p- for each preference p, in config order."""
        return [f"{p}{s}" for p in self.data.preferences for s in ("+", "-")]

    def parse_direction(self, direction: str) -> tuple[str, int]:
        """'helpful-' -> ('helpful', -1); an unknown direction is a clear error."""
        if direction not in self.directions():
            raise PrefvecError(f"unknown direction {direction!r}: expected one of "
                               f"{', '.join(self.directions())} (from data.preferences)")
        return direction[:-1], (1 if direction.endswith("+") else -1)


DATA_ROOT_MARK = "{data_root}"


def fill_data_root(cfg: RunConfig) -> None:
    """Replace `{data_root}` in every data path by data.root (in place; idempotent)."""
    def fill(path: str, param: str) -> str:
        if DATA_ROOT_MARK not in path:
            return path
        _check(bool(cfg.data.root), "data.root", f"a folder ({param} is {path!r})",
               cfg.data.root)
        return path.replace(DATA_ROOT_MARK, cfg.data.root.rstrip("/"))

    for name, pref in cfg.data.preferences.items():
        pref.path = fill(pref.path, f"data.preferences.{name}.path")
        for part in pref.also:
            part.path = fill(part.path, f"data.preferences.{name}.also[].path")
    cfg.data.sft_source = fill(cfg.data.sft_source, "data.sft_source")
    for name, prompt_set in cfg.pipeline.eval.prompt_sets.items():
        prompt_set.path = fill(prompt_set.path, f"pipeline.eval.prompt_sets.{name}.path")
