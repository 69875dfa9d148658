"""The `pipeline` section of the run config: merges to build, the eval stage, SLURM resources.

Stages are sft -> ref_logps -> dpo -> vectors -> merge -> eval (see prefvec_ds.pipeline.dag).
`merges` says which eta settings become merged models; `slurm` says what each stage asks of a
cluster. The defaults run the quickstart; an 8-GPU cluster recipe sets partition, gpus_per_node,
times and signal_seconds (see docs/pipeline.md).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Literal

from prefvec_ds import PrefvecError
from prefvec_ds.ckpt.methods import MERGE_METHODS, MergeMethodName, MethodParams, check_params
from prefvec_ds.config.checks import check as _check
from prefvec_ds.config.choices import BaselineKind, StageKind, names
from prefvec_ds.config.evaluation import EvalConfig
from prefvec_ds.config.mora import MoraConfig

#: Stage kinds in DAG order; `slurm.time` has one limit per kind.
STAGE_KINDS = names(StageKind)
DEFAULT_TIMES: dict[StageKind, str] = {
    "sft": "04:00:00", "mora": "04:00:00", "ref_logps": "01:00:00", "dpo": "06:00:00",
    "baseline_dpo": "06:00:00", "vectors": "01:00:00", "merge": "01:00:00",
    "baseline_merge": "01:00:00", "eval": "02:00:00", "tune": "02:00:00"}
BASELINE_KINDS = names(BaselineKind)
#: The roles the baselines read: which preference is helpfulness, which harmlessness.
BASELINE_ROLES = ("helpful", "harmless")
_TIME = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$")


@dataclass
class MergeConfig:
    """One merged model: theta_base + sum over preferences of eta_p * phi_p."""

    name: str = "default"
    """Folder name under <run_dir>/merged/ (letters, digits, _ . -)."""
    eta: dict[str, float] = field(default_factory=dict)
    """Preference -> eta. A preference left out gets 1.0 (the paper's default); 0 leaves its
    vector out; negative values invert the behaviour."""
    method: MergeMethodName = "task_arithmetic"
    """How the vectors combine (docs/merge-methods.md): task_arithmetic (base + sum eta * phi,
    the paper's), ties, dare, dare_ties; the same kernels as `prefvec merge --method`."""
    density: float = 1.0
    """ties/dare: fraction of each vector's elements kept (by magnitude, or at random)."""
    normalize: bool | None = None
    """Divide by the summed weights that contributed to each element; None: the method's
    default (true for ties, as mergekit)."""
    lam: float = 1.0
    """Scale of the combined delta added to theta_base."""
    seed: int = 0
    """dare/dare_ties: seed of the random drop (reproducible per tensor)."""

    def __post_init__(self):
        _check(bool(re.fullmatch(r"[A-Za-z0-9_.\-]+", self.name)), "pipeline.merges[].name",
               "letters, digits, _ . -", self.name)
        _check(isinstance(self.eta, dict), f"pipeline.merges[{self.name}].eta",
               "a mapping preference -> number", self.eta)
        for pref, value in self.eta.items():
            _check(isinstance(value, (int, float)) and not isinstance(value, bool),
                   f"pipeline.merges[{self.name}].eta.{pref}", "a number", value)
        self.eta = {k: float(v) for k, v in self.eta.items()}
        try:
            check_params(self.method, self.params())
        except ValueError as err:
            raise PrefvecError(f"config parameter pipeline.merges[{self.name}]: {err}") from None

    def params(self) -> MethodParams:
        """The method's knobs as the merge kernels take them."""
        normalize = (MERGE_METHODS[self.method].normalize_default
                     if self.normalize is None and self.method in MERGE_METHODS
                     else bool(self.normalize))
        return MethodParams(density=float(self.density), normalize=normalize,
                            lam=float(self.lam), seed=int(self.seed))


@dataclass
class SlurmConfig:
    """What `prefvec submit` asks of the cluster; one sbatch per stage, from one template."""

    partition: str = ""
    """`--partition`; empty: the cluster default."""
    account: str = ""
    """`--account`; empty: the user's default."""
    qos: str = ""
    """`--qos`; empty: the default."""
    gpus_per_node: int = 0
    """GPUs per node for the training stages (`--gpus-per-node`; 8 on an 8xH100 node). Every
    rank sees all of its node's GPUs and picks one by LOCAL_RANK. 0: CPU-only jobs."""
    cpus_per_task: int = 1
    """`--cpus-per-task` of each rank (data loading, CPU offload threads)."""
    mem: str = ""
    """`--mem` per node (e.g. `0` for all of it, `480G`); empty: the cluster default."""
    time: dict[str, str] = field(default_factory=dict)
    """Time limit per stage kind (sft, ref_logps, dpo, vectors, merge, eval), SLURM syntax;
    kinds left out keep the defaults in DEFAULT_TIMES. A DPO job that hits its limit
    checkpoints on USR1 and is requeued, so a short limit costs restarts, not progress."""
    signal_seconds: int = 300
    """USR1 this many seconds before the time limit (`--signal=B:USR1@N`): the trainer saves a
    ZeRO-3 checkpoint and the job requeues. Allow one checkpoint save plus ~60 s (SLURM checks
    limits every 30 s): 8B ZeRO-3 saves take 1-3 min on shared storage."""
    array_parallelism: int = 0
    """At most this many array tasks at once (`--array=0-3%N`); 0: no limit."""
    srun_args: list[str] = field(default_factory=list)
    """Extra `srun` options for the ranks, e.g. `--mpi=pmix` or `--cpu-bind=none`."""
    extra_sbatch: list[str] = field(default_factory=list)
    """More `#SBATCH` options verbatim for every job, e.g. `--constraint=h100`."""
    training_sbatch: list[str] = field(default_factory=list)
    """More `#SBATCH` options for the multi-rank stages only (sft, ref_logps, dpo, mora), e.g.
    `--exclusive`: the eval job uses one GPU and vectors/merge none, and should not hold a
    whole node."""
    cpu_partition: str = ""
    """`--partition` of the jobs that use no GPU (vectors, merge): GPU partitions often refuse
    or waste them. Empty: `partition`."""

    def __post_init__(self):
        unknown = sorted(set(self.time) - set(STAGE_KINDS))
        _check(not unknown, "pipeline.slurm.time", f"keys among {', '.join(STAGE_KINDS)}", unknown)
        for kind, limit in self.time.items():
            # YAML reads an unquoted 4:00:00 as the integer 14400 (base 60): demand quotes.
            _check(isinstance(limit, str), f"pipeline.slurm.time.{kind}",
                   'a quoted string such as "04:00:00"', limit)
        self.time = {**DEFAULT_TIMES, **self.time}
        for kind, limit in self.time.items():
            _check(bool(_TIME.match(limit)), f"pipeline.slurm.time.{kind}",
                   "MM, HH:MM:SS or D-HH:MM:SS", limit)
        _check(self.gpus_per_node >= 0, "pipeline.slurm.gpus_per_node", ">= 0", self.gpus_per_node)
        _check(self.cpus_per_task >= 1, "pipeline.slurm.cpus_per_task", ">= 1", self.cpus_per_task)
        _check(self.signal_seconds >= 0, "pipeline.slurm.signal_seconds", ">= 0",
               self.signal_seconds)
        _check(self.array_parallelism >= 0, "pipeline.slurm.array_parallelism", ">= 0",
               self.array_parallelism)
        for name in ("srun_args", "extra_sbatch"):
            value = getattr(self, name)
            _check(isinstance(value, list) and all(isinstance(v, str) for v in value),
                   f"pipeline.slurm.{name}", "a list of strings", value)


def _default_merges() -> list[MergeConfig]:
    return [MergeConfig()]


MergeDtype = Literal["fp32", "bf16", "fp16", "base"]


@dataclass
class PipelineConfig:
    """The whole DAG: which merged models to build and how to evaluate them."""

    merges: list[MergeConfig] = field(default_factory=_default_merges)
    """Merged models to build, each {name, eta}; default: one `default` with every eta = 1."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """The eval stage: eta sweep grid, scorers, decoding, margins, vector diagnostics (seeds,
    STI); see prefvec_ds/config/evaluation.py."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """Resources and preemption settings for `prefvec submit`."""
    mora: MoraConfig = field(default_factory=MoraConfig)
    """MORA data synthesis (`prefvec mora`; a `mora` stage after SFT when `enabled`)."""
    merge_dtype: MergeDtype = "fp32"
    """dtype of the merged models the merge stages write: fp32 | bf16 | fp16 | base (the base
    folder's dtype). fp32 by default: DPO moves weights by about the bf16 spacing, and a bf16
    output rounds away much of eta * phi (measured by benchmarks/bf16_merge.py, figures in
    docs/bf16_merge.md), while the sweep's in-place points are fp32."""

    baselines: list[BaselineKind] = field(default_factory=list)
    """Systems to put next to Preference Vectors, trained or merged in this run from the same
    theta_base, data, reference log-probs and eval: dpo_joint (one DPO on the union of the
    helpful and harmless pairs), dpo_safe_first (the helpful pair when both responses are safe,
    else the harmless pair), bfpo (DPO with BFPO's loss on the helpful pairs and per-response
    safety labels), dpo_soup (the average of the helpful+ and harmless+ models), positive_only
    (theta_base + sum eta * (theta_p+ - theta_base), eta of the first merge). Each becomes a
    model under <run_dir>/baselines/<name>/model, scored by the eval stage. Default: none."""
    baseline_roles: dict[str, str] = field(
        default_factory=lambda: {"helpful": "helpful", "harmless": "harmless"})
    """Which preference of data.preferences plays helpfulness and which harmlessness for the
    baselines (keys helpful and harmless)."""

    def __post_init__(self):
        _check(isinstance(self.baselines, list) and all(b in BASELINE_KINDS
                                                         for b in self.baselines),
               "pipeline.baselines", f"a list of {' | '.join(BASELINE_KINDS)}", self.baselines)
        _check(len(set(self.baselines)) == len(self.baselines), "pipeline.baselines",
               "distinct names", self.baselines)
        _check(isinstance(self.baseline_roles, dict)
               and sorted(self.baseline_roles) == sorted(BASELINE_ROLES),
               "pipeline.baseline_roles", "a mapping with the keys helpful and harmless",
               self.baseline_roles)
        _check(isinstance(self.merges, list) and len(self.merges) > 0, "pipeline.merges",
               "a non-empty list of {name, eta}", self.merges)
        merges = []
        for i, merge in enumerate(self.merges):
            if isinstance(merge, dict):
                keys = {f.name for f in dataclasses.fields(MergeConfig)}
                unknown = sorted(set(merge) - keys)
                _check(not unknown, f"pipeline.merges[{i}]",
                       f"keys among {', '.join(sorted(keys))}", unknown)
                merge = MergeConfig(**merge)
            _check(isinstance(merge, MergeConfig), f"pipeline.merges[{i}]", "{name, eta}", merge)
            merges.append(merge)
        choices = typing.get_args(MergeDtype)
        _check(self.merge_dtype in choices, "pipeline.merge_dtype", " | ".join(choices),
               self.merge_dtype)
        names = [m.name for m in merges]
        _check(len(set(names)) == len(names), "pipeline.merges", "distinct names", names)
        self.merges = merges
        if isinstance(self.eval, dict):
            self.eval = EvalConfig(**self.eval)
