"""The stage DAG of one run: sft -> ref_logps[p] -> dpo[p+, p-] -> vectors[p] -> merge[m] -> eval.

With `pipeline.mora.enabled`, a `mora` stage (MORA data synthesis) follows sft, and every
preference whose source is `mora` waits for it: sft -> mora -> ref_logps[p] -> ...
`pipeline.eval.diagnostic_seeds` add dpo/<p>+@seed<k>, dpo/<p>-@seed<k> and vectors/<p>@seed<k>
(outputs under <run_dir>/seeds/<k>/) for the cross-seed cosine. The eval stage (the eta sweep)
reads theta_base and every vector itself, so it depends on them as well as on the merges.

A Stage knows its upstream stages, the folder it writes, the file that proves it finished, and
the config slice its result depends on (its own inputs' fingerprint; upstream results enter
through their manifests, see prefvec_ds.pipeline.manifest). Stages of one kind form a group:
the local executor runs a group's stages concurrently, `prefvec submit` makes a group one job
(an array when it has several stages).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from prefvec_ds import PrefvecError
from prefvec_ds.ckpt.methods import MethodParams
from prefvec_ds.config.layout import RunLayout, merge_etas, seed_key, split_seed
from prefvec_ds.config.pipeline import STAGE_KINDS
from prefvec_ds.config.schema import RunConfig
from prefvec_ds.eval.grid import check_names
from prefvec_ds.pipeline.baselines import BASELINES, check_baselines, soup_etas

#: Kinds whose work runs as a rank group (deepspeed launcher locally, srun under SLURM).
#: mora: one shard per rank, no process group
DISTRIBUTED_KINDS = ("sft", "mora", "ref_logps", "dpo", "baseline_dpo")


@dataclass(frozen=True)
class Stage:
    """One node of the DAG."""

    name: str
    """Unique id, also the manifest's name: `sft`, `ref_logps/helpful`, `dpo/helpful+`,
    `vectors/helpful`, `merge/default`, `eval`."""
    kind: str
    """One of STAGE_KINDS."""
    key: str
    """The preference, direction or merge name this stage is about ('' for sft and eval)."""
    deps: tuple[str, ...]
    """Names of the stages whose outputs this one reads."""
    outputs: tuple[str, ...]
    """Paths (relative to run_dir) this stage writes; removed when its inputs change."""
    done_file: str
    """Path (relative to run_dir) that exists only once the stage has finished."""
    config_slice: str
    """JSON of the config values the stage's result depends on (besides upstream results)."""

    @property
    def distributed(self) -> bool:
        return self.kind in DISTRIBUTED_KINDS

    @property
    def log_name(self) -> str:
        """File-name form of `name` (`dpo/helpful+` -> `dpo_helpful+`)."""
        return self.name.replace("/", "_")

    def config_fingerprint(self) -> str:
        return hashlib.sha256(self.config_slice.encode()).hexdigest()[:16]


def _slice(**parts) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def _data_globals(cfg: RunConfig) -> dict:
    d = cfg.data
    return {"max_len": d.max_len, "max_prompt_len": d.max_prompt_len,
            "drop_overlong_prompts": d.drop_overlong_prompts,
            "embedded_size": d.embedded_size, "embedded_seed": d.embedded_seed}


def _preference_slice(cfg: RunConfig, pcfg) -> dict:
    """A preference's config; a MORA pairs path inside the run folder is kept relative to it,
    so that a copied run folder stays up to date."""
    out = dataclasses.asdict(pcfg)
    if pcfg.source == "mora":
        out["path"] = out["path"].replace(str(Path(cfg.run_dir).resolve()), "{run_dir}")
    return out


def _mora_stage(cfg: RunConfig, base_dep: tuple[str, ...]) -> Stage:
    """MORA data synthesis: samples from theta_base (unless pipeline.mora.policy is set)."""
    mora = cfg.pipeline.mora
    prefs = {k: _preference_slice(cfg, v) for k, v in cfg.data.preferences.items()}
    settings = dataclasses.asdict(mora)
    settings.pop("plots")  # figures only: `prefvec mora --gather-only` redraws them
    return Stage(
        "mora", "mora", "", () if mora.policy else base_dep, ("mora",), "mora/done.json",
        _slice(seed=cfg.seed, mora=settings, data=_data_globals(cfg), preferences=prefs,
               base=cfg.model.base))


def ds_config_digest(cfg: RunConfig) -> str:
    """The DeepSpeed JSON's content (not its path): precision and ZeRO knobs change results."""
    from prefvec_ds.config.loader import find_ds_config  # noqa: PLC0415

    return hashlib.sha256(find_ds_config(cfg).read_bytes()).hexdigest()[:16]


def build_dag(cfg: RunConfig) -> list[Stage]:
    """Every stage of the run, in an order where upstream stages come first."""
    ds = ds_config_digest(cfg)
    world = cfg.distributed.nproc_per_node * cfg.distributed.nnodes
    data = _data_globals(cfg)
    stages: list[Stage] = []
    base_dep: tuple[str, ...] = ()
    if not cfg.model.base:
        stages.append(Stage(
            "sft", "sft", "", (), ("sft", "init_model"), "sft/done.json",
            _slice(seed=cfg.seed, model=dataclasses.asdict(cfg.model), data=data,
                   sft_source=cfg.data.sft_source, sft=dataclasses.asdict(cfg.sft), ds=ds,
                   world=world)))
        base_dep = ("sft",)
    mora_dep: tuple[str, ...] = ()
    if cfg.pipeline.mora.enabled:
        stages.append(_mora_stage(cfg, base_dep))
        mora_dep = ("mora",)
    for pref, pcfg in cfg.data.preferences.items():
        pref_data = {**data, "preference": _preference_slice(cfg, pcfg)}
        deps = base_dep + (mora_dep if pcfg.source == "mora" else ())
        stages.append(Stage(
            f"ref_logps/{pref}", "ref_logps", pref, deps, (f"ref_logps/{pref}.pt",),
            f"ref_logps/{pref}.pt", _slice(base=cfg.model.base, data=pref_data, ds=ds)))
    lay = RunLayout.of(cfg)

    def out(path: Path) -> str:
        return lay.relative(path)

    for direction in cfg.directions():
        pref = direction[:-1]
        pref_data = {**data, "preference": _preference_slice(cfg, cfg.data.preferences[pref])}
        stages.append(Stage(
            f"dpo/{direction}", "dpo", direction, (f"ref_logps/{pref}",),
            (f"dpo/{direction}",), f"dpo/{direction}/done.json",
            _slice(seed=cfg.seed, dpo=dataclasses.asdict(cfg.dpo), data=pref_data, ds=ds,
                   world=world, checkpointing=cfg.model.gradient_checkpointing)))
    check_names(cfg.pipeline.eval, list(cfg.data.preferences), cfg.seed)
    seeded = [(seed, pref) for seed in cfg.pipeline.eval.diagnostic_seeds
              for pref in (cfg.pipeline.eval.diagnostic_preferences or cfg.data.preferences)]
    for seed, pref in seeded:  # the same DPO with another seed, for the cross-seed cosine
        pref_data = {**data, "preference": _preference_slice(cfg, cfg.data.preferences[pref])}
        for sign in "+-":
            key = seed_key(f"{pref}{sign}", seed)
            stages.append(Stage(
                f"dpo/{key}", "dpo", key, (f"ref_logps/{pref}",), (out(lay.dpo(key)),),
                f"{out(lay.dpo(key))}/done.json",
                _slice(seed=seed, dpo=dataclasses.asdict(cfg.dpo), data=pref_data, ds=ds,
                       world=world, checkpointing=cfg.model.gradient_checkpointing)))
    vector_keys = list(cfg.data.preferences) + [seed_key(p, s) for s, p in seeded]
    for key in vector_keys:
        pref, seed = split_seed(key)
        plus, minus = (seed_key(f"{pref}{sign}", seed) for sign in "+-")
        stages.append(Stage(
            f"vectors/{key}", "vectors", key, (f"dpo/{plus}", f"dpo/{minus}"),
            (out(lay.vectors(key)),), f"{out(lay.vectors(key))}/prefvec_vector.json",
            _slice(format=1)))
    merges = {m.name: m for m in cfg.pipeline.merges}
    for name, eta in merge_etas(cfg).items():
        deps = base_dep + tuple(f"vectors/{p}" for p, e in eta.items() if e != 0.0)
        stages.append(Stage(
            f"merge/{name}", "merge", name, deps, (f"merged/{name}",),
            f"merged/{name}/config.json",
            _slice(base=cfg.model.base, eta=eta, dtype=cfg.model.dtype,
                   merge_dtype=cfg.pipeline.merge_dtype,  # the output dtype redoes the merge
                   **_method_slice(merges[name]))))
    baselines = _baseline_stages(cfg, base_dep, data, ds, world)
    stages += baselines
    p = cfg.pipeline
    # the sweep reads theta_base and every vector itself; merged and baseline models are scored
    deps = (base_dep + tuple(f"vectors/{k}" for k in vector_keys)
            + tuple(f"merge/{m.name}" for m in p.merges) + tuple(s.name for s in baselines))
    stages.append(Stage(
        "eval", "eval", "", deps, ("eval",), "eval/summary.json",
        _slice(eval=_eval_slice(p.eval), base=cfg.model.base, data=data,
               preferences={k: _preference_slice(cfg, v)
                            for k, v in cfg.data.preferences.items()})))
    if p.eval.tune.enabled:
        stages.append(_tune_stage(cfg, data))
    return stages


def _tune_stage(cfg: RunConfig, data: dict) -> Stage:
    """`prefvec tune-eta` on the run, after eval: eval's outputs hold eval/tune, so a redone
    eval (which removes them) redoes the tuner too."""
    tune = cfg.pipeline.eval.tune
    if tune.merge_to in {m.name for m in cfg.pipeline.merges}:
        raise PrefvecError(f"config parameter pipeline.eval.tune.merge_to: {tune.merge_to!r} "
                           "is also a pipeline.merges name; expected another folder name")
    outputs = ("eval/tune",) + ((f"merged/{tune.merge_to}",) if tune.merge_to else ())
    return Stage("tune", "tune", "", ("eval",), outputs, "eval/tune/tune.json",
                 _slice(eval=dataclasses.asdict(cfg.pipeline.eval), base=cfg.model.base,
                        data=data, merge_dtype=cfg.pipeline.merge_dtype,
                        preferences={k: _preference_slice(cfg, v)
                                     for k, v in cfg.data.preferences.items()}))


def _eval_slice(ecfg) -> dict:
    """pipeline.eval as the eval stage depends on it: the tuner's section is not (prefvec
    tune-eta reads it), and the interference knobs enter only when switched on, so runs made
    before they existed stay up to date."""
    out = dataclasses.asdict(ecfg)
    del out["tune"]
    if not ecfg.interference_methods:
        del out["interference_methods"], out["interference_density"]
    return out


def _method_slice(merge) -> dict:
    """The merge method's knobs, in the fingerprint only when they differ from plain task
    arithmetic (runs made before methods existed stay up to date)."""
    if merge.method == "task_arithmetic" and merge.params() == MethodParams():
        return {}
    return {"method": merge.method, "params": dataclasses.asdict(merge.params())}


def _baseline_stages(cfg: RunConfig, base_dep: tuple[str, ...], data: dict, ds: str,
                     world: int) -> list[Stage]:
    """One stage per entry of pipeline.baselines (see prefvec_ds.pipeline.baselines)."""
    check_baselines(cfg)
    if not cfg.pipeline.baselines:
        return []  # baseline_roles may then name preferences the run does not have
    lay = RunLayout.of(cfg)
    roles = cfg.pipeline.baseline_roles
    prefs = {role: _preference_slice(cfg, cfg.data.preferences[pref])
             for role, pref in roles.items()}
    out = []
    for name in cfg.pipeline.baselines:
        folder = lay.relative(lay.baseline(name))
        if BASELINES[name].kind == "baseline_dpo":
            out.append(Stage(
                f"baseline/{name}", "baseline_dpo", name,
                tuple(f"ref_logps/{pref}" for pref in roles.values()), (folder,),
                f"{folder}/done.json",
                _slice(seed=cfg.seed, dpo=dataclasses.asdict(cfg.dpo), data={**data, **prefs},
                       roles=roles, ds=ds, world=world,
                       checkpointing=cfg.model.gradient_checkpointing)))
        else:
            etas = soup_etas(cfg, name)
            out.append(Stage(
                f"baseline/{name}", "baseline_merge", name,
                base_dep + tuple(f"dpo/{pref}+" for pref in etas), (folder,),
                f"{folder}/model/config.json",
                _slice(base=cfg.model.base, eta=etas, dtype=cfg.model.dtype,
                       merge_dtype=cfg.pipeline.merge_dtype)))
    return out


def groups(stages: list[Stage]) -> list[tuple[str, list[Stage]]]:
    """Stages by kind, in DAG order: one SLURM job (or array) per group."""
    return [(kind, [s for s in stages if s.kind == kind]) for kind in STAGE_KINDS
            if any(s.kind == kind for s in stages)]


def downstream(stages: list[Stage], names: set[str]) -> set[str]:
    """`names` and every stage that depends on them, directly or not."""
    out = set(names)
    for stage in stages:  # upstream first, so one pass suffices
        if any(d in out for d in stage.deps):
            out.add(stage.name)
    return out


def stage_by_name(stages: list[Stage], name: str) -> Stage:
    for stage in stages:
        if stage.name == name:
            return stage
    raise PrefvecError(f"unknown stage {name!r}: expected one of "
                       f"{', '.join(s.name for s in stages)}")
