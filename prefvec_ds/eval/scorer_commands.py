"""`prefvec scorers check|train-refusal|knowledge`: the learned scorers on real data.

- check: trains the reward model on HH-RLHF and on PKU-SafeRLHF safety pairs, the cost model on
  PKU-SafeRLHF (pair + safety-sign terms), and reports their held-out accuracies; then the
  refusal detector against the keyword baseline on XSTest's human labels. Data: ../shared/data
  layout (see --data); everything it trains lands under --out.
- train-refusal: fits the refusal classifier on XSTest (+ optional labelled jsonl) into a folder
  that `{kind: refusal, path: ...}` reads.
- pku-pairs: the PKU-SafeRLHF realign file ({prompt, response: [safer, worse]}) as a
  {prompt, chosen, rejected} jsonl that `source: jsonl` reads (recipes/scorers/cost-pku.yaml).
- knowledge: lm-eval accuracy of a HF folder (optionally with vectors applied in place).
- judge: the LLM judge (prefvec_ds.eval.judge) on a jsonl of {prompt, answer} or
  {prompt, answers: [...]} rows (the eval stage's answers.jsonl), scores and counters as JSON.
- convert-safe-rlhf: a safe-rlhf score model (beaver-7b reward / cost, `LlamaForScore`) as a HF
  `LlamaForSequenceClassification` folder that {kind: reward_model|cost_model} reads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefvec_ds import PrefvecError

HH_FILE = "hh-rlhf/helpful-base-test.jsonl.gz"
PKU_PAIRS_FILE = "pku_saferlhf/xinykou_pku_seferlhf_realign_dpo_5k.json"
PKU_LABELLED_FILE = "pku_saferlhf/align_anything_preference_train.json"
XSTEST_FILE = "xstest/xstest_v2_completions_gpt4_gpteval.csv"
PKU_JSONL = "data/pku_safer_pairs.jsonl"  # under --out: the realign pairs as source: jsonl
CHECKS = ("rm-hh", "rm-pku", "cost-pku", "refusal")


def add_parsers(sub) -> None:
    group = sub.add_parser("scorers", help="reward/cost models, refusal detector, knowledge "
                                           "retention: checks on real data")
    cmds = group.add_subparsers(dest="scorers_command", required=True, metavar="COMMAND")
    p = cmds.add_parser("check", help="train and report RM / cost / refusal accuracies")
    p.add_argument("--data", default="../shared/data", help="folder with hh-rlhf/, "
                   "pku_saferlhf/, xstest/ (default ../shared/data)")
    p.add_argument("--out", default="runs/scorer-check", help="where models and summary go")
    p.add_argument("--only", default=",".join(CHECKS), help=f"subset of {','.join(CHECKS)}")
    p.add_argument("--steps", type=int, default=0, help="training steps (0 = the default)")
    p.add_argument("--backbone", default="minilm", help="encoder of the models")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_check)

    p = cmds.add_parser("train-refusal", help="fit the refusal classifier")
    p.add_argument("--xstest", required=True, help=f"XSTest labelled completions ({XSTEST_FILE})")
    p.add_argument("--extra", help="jsonl of {response, refused} rows to train on as well")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_train_refusal)

    p = cmds.add_parser("pku-pairs", help="PKU-SafeRLHF realign pairs -> {prompt, chosen, "
                                          "rejected} jsonl (source: jsonl)")
    p.add_argument("source", help=f"realign JSON ({PKU_PAIRS_FILE} under the data folder)")
    p.add_argument("--out", required=True, help="jsonl to write")
    p.set_defaults(func=run_pku_pairs)

    p = cmds.add_parser("knowledge", help="knowledge retention with lm-eval "
                                          "(paper: CommonsenseQA)")
    p.add_argument("model", help="HF model folder (base or merged)")
    p.add_argument("--tasks", default="commonsense_qa", help="comma-separated lm-eval tasks")
    p.add_argument("--include-path", default="", help="folder of custom task YAMLs")
    p.add_argument("--local-csqa", help="a CommonsenseQA jsonl on disk (no hub): becomes task "
                                        "csqa_local")
    p.add_argument("--embedded-task", action="store_true",
                   help="add task embedded_knowledge (the embedded world's facts, cloze)")
    p.add_argument("--vector", action="append", default=[], metavar="DIR=ETA",
                   help="apply a preference vector in place first (repeatable)")
    p.add_argument("--limit", type=int, default=0, help="questions per task (0 = all)")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chat-template", action="store_true", help="apply the chat template")
    p.add_argument("--out", help="write the results as JSON here")
    p.set_defaults(func=run_knowledge)

    _add_judge_parsers(cmds)


def _add_judge_parsers(cmds) -> None:
    """judge and convert-safe-rlhf (the paper's judges)."""
    p = cmds.add_parser("judge", help="score {prompt, answer} rows with an LLM judge on an "
                                      "OpenAI-compatible server")
    p.add_argument("rows", help="jsonl of {prompt, answer} or {prompt, answers: [...]} rows")
    p.add_argument("--base-url", required=True, help="API root, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True, help="model name the server serves")
    p.add_argument("--api-key-env", default="", help="NAME of the variable holding the key")
    p.add_argument("--max-concurrency", type=int, default=8)
    p.add_argument("--cache-dir", default="", help="default ~/.cache/prefvec-ds/judge; off")
    p.add_argument("--out", help="write scores, means and counters as JSON here")
    p.set_defaults(func=run_judge)

    p = cmds.add_parser("convert-safe-rlhf", help="safe-rlhf score model (LlamaForScore) -> "
                                                  "HF LlamaForSequenceClassification folder")
    p.add_argument("source", help="folder of the safe-rlhf model (config.json + safetensors "
                                  "or pytorch_model*.bin)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--max-shard-size", default="5GB", help="shard budget (default 5GB)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_convert_safe_rlhf)


def _rm_config(kind: str, name: str, out: Path, data: dict, backbone: str, steps: int,
               **options):
    from prefvec_ds.train.rm import RMConfig, RMTrainConfig  # noqa: PLC0415

    train = RMTrainConfig(max_steps=steps) if steps else RMTrainConfig()
    return RMConfig(kind=kind, backbone=backbone, out_dir=str(out / name), data=data,
                    train=train, **options)


def check_configs(data: Path, out: Path, backbone: str = "minilm", steps: int = 0) -> dict:
    """check name -> RMConfig. recipes/scorers/rm-hh.yaml and cost-pku.yaml are the same runs as
    files (data ../shared/data, out runs; a unit test keeps them equal)."""
    from prefvec_ds.config.schema import PreferenceConfig  # noqa: PLC0415

    hh = PreferenceConfig(source="hh_rlhf", path=str(data / HH_FILE), eval_fraction=0.1)
    pku = PreferenceConfig(source="jsonl", path=str(out / PKU_JSONL), eval_fraction=0.1)
    # Safety labels exist only in the 32-row original-schema file: half of its prompts train
    # the sign term (repeated 30x: ~10% of the training pairs instead of 0.3%), the other half
    # measure it.
    signs = PreferenceConfig(source="pku_saferlhf", path=str(data / PKU_LABELLED_FILE),
                             order_by="safer_response_id", eval_fraction=0.5)
    return {
        "rm-hh": _rm_config("reward", "rm-hh", out, {"hh_helpful_base": hh}, backbone, steps),
        "rm-pku": _rm_config("reward", "rm-pku", out, {"pku_safer_pairs": pku}, backbone, steps),
        "cost-pku": _rm_config("cost", "cost-pku", out, {"pku_safer_pairs": pku,
                                                         "pku_labelled": signs},
                               backbone, steps, repeat={"pku_labelled": 30}),
    }


def write_pku_pairs_jsonl(src: Path, target: Path) -> int:
    """The realign file ({prompt, response: [safer, worse]}) as {prompt, chosen, rejected} rows
    in `target` (written atomically); returns the number of pairs."""
    from prefvec_ds.atomic import write_text_atomic  # noqa: PLC0415
    from prefvec_ds.data.sources import read_rows  # noqa: PLC0415

    lines = []
    for i, row in enumerate(read_rows(str(src))):
        pair = row.get("response") if isinstance(row, dict) else None
        if not (isinstance(pair, list) and len(pair) == 2 and "prompt" in row):
            raise PrefvecError(f"{src}:{i}: expected {{prompt, response: [safer, worse]}}")
        lines.append(json.dumps({"prompt": row["prompt"], "chosen": pair[0],
                                 "rejected": pair[1]}) + "\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, "".join(lines))
    return len(lines)


def _transfer_accuracy(model_dir: Path, pairs) -> dict:
    """Pair accuracy of a saved reward model on pairs it never saw (ties count half)."""
    from prefvec_ds.models.preference_model import ScoreModel  # noqa: PLC0415

    model = ScoreModel(model_dir)
    prompts = [p.prompt for p in pairs]
    chosen = model(prompts, [p.chosen for p in pairs])
    rejected = model(prompts, [p.rejected for p in pairs])
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected))
    return {"pair_accuracy": wins / len(pairs), "n_pairs": len(pairs)}


def check_models(args, data: Path, out: Path, only: set[str]) -> dict:
    """Train the requested models; name -> {source: held-out metrics}. The HH reward model is
    also scored on the 32 PKU rows ordered by helpfulness (better_response_id), never trained on.
    """
    from prefvec_ds.data.sources import pku_pairs, read_rows  # noqa: PLC0415
    from prefvec_ds.train.rm import train_preference_model  # noqa: PLC0415

    configs = check_configs(data, out, args.backbone, args.steps)
    if only & {"rm-pku", "cost-pku"}:
        write_pku_pairs_jsonl(data / PKU_PAIRS_FILE, out / PKU_JSONL)
    summary = {name: train_preference_model(cfg, args.overwrite)["after"]
               for name, cfg in configs.items() if name in only}
    if "rm-hh" in summary:
        labelled = str(data / PKU_LABELLED_FILE)
        better = pku_pairs(read_rows(labelled), "better_response_id", labelled)
        summary["rm-hh"]["pku_better_transfer"] = _transfer_accuracy(
            Path(configs["rm-hh"].out_dir), better)
    return summary


def check_refusal(xstest: Path, out: Path, backbone: str, overwrite: bool) -> dict:
    """Keyword baseline on every row; classifier out-of-fold (never scored on a row it was
    fitted on): 5-fold stratified over rows (3 fold seeds) and leave-one-topic-out."""
    from prefvec_ds.eval import refusal as R  # noqa: PLC0415

    rows = R.read_xstest(xstest)
    labels = [r["refused"] for r in rows]
    texts = [r["completion"] for r in rows]
    encoder = R.SentenceEncoder(backbone)
    x = R.refusal_features(encoder, texts)
    result = {"human_refusal_rate": sum(labels) / len(labels),
              "keyword": R.binary_metrics([R.keyword_refusal(t) for t in texts], labels)}
    for seed in range(3):
        pred = R.cross_validate(x, labels, R.stratified_folds(labels, 5, seed))
        result[f"classifier_5fold_seed{seed}"] = R.binary_metrics(pred, labels)
    topics = [R.xstest_group(r["type"]) for r in rows]
    result["classifier_leave_topic_out"] = R.binary_metrics(R.cross_validate(x, labels, topics),
                                                            labels)
    from prefvec_ds.ckpt.writer import atomic_output_dir  # noqa: PLC0415

    with atomic_output_dir(out / "refusal", overwrite) as tmp:
        R.RefusalClassifier.train(texts, labels, backbone, encoder=encoder).save(tmp)
    return result


def _print_summary(summary: dict) -> None:
    from prefvec_ds.train.rm import describe  # noqa: PLC0415

    print("\n== scorer check ==")
    for check in ("rm-hh", "rm-pku", "cost-pku"):
        for name, res in summary.get(check, {}).items():
            text = describe(res) if "mean_margin" in res else \
                f"pair acc {res['pair_accuracy']:.3f} (n={res['n_pairs']}, never trained on)"
            print(f"{check:9s} {name:20s} {text}")
    if "refusal" in summary:
        ref = summary["refusal"]
        print(f"refusal   XSTest human refusal rate {ref['human_refusal_rate']:.3f}")
        for name, m in ref.items():
            if isinstance(m, dict):
                print(f"refusal   {name:28s} acc {m['accuracy']:.3f} prec {m['precision']:.3f} "
                      f"rec {m['recall']:.3f} rate {m['refusal_rate']:.3f} (n={m['n']})")


def run_check(args: argparse.Namespace) -> int:
    from prefvec_ds.atomic import write_json_atomic  # noqa: PLC0415

    data, out = Path(args.data), Path(args.out)
    only = set(filter(None, args.only.split(",")))
    if only - set(CHECKS):
        raise PrefvecError(f"--only: unknown check(s) {sorted(only - set(CHECKS))}; expected "
                           f"some of {', '.join(CHECKS)}")
    needed = {"rm-hh": [HH_FILE, PKU_LABELLED_FILE], "rm-pku": [PKU_PAIRS_FILE],
              "cost-pku": [PKU_PAIRS_FILE, PKU_LABELLED_FILE], "refusal": [XSTEST_FILE]}
    missing = sorted({f for c in only for f in needed[c] if not (data / f).is_file()})
    if missing:  # before any training: the data sets are not part of the repository
        raise PrefvecError(
            f"--data {data}: missing {', '.join(missing)}. The check needs the public data sets "
            f"laid out as in ../shared/data (HH-RLHF helpful-base test, the PKU-SafeRLHF files, "
            f"XSTest's labelled completions); pass --data FOLDER, or --only a subset of "
            f"{','.join(CHECKS)} whose files you have")
    taken = [str(out / c) for c in only if (out / c).exists()]
    if taken and not args.overwrite:  # fail before minutes of training, not between models
        raise PrefvecError(f"output folder(s) {', '.join(sorted(taken))} already exist (pass "
                           "--overwrite to replace them)")
    summary = check_models(args, data, out, only)
    if "refusal" in only:
        summary["refusal"] = check_refusal(data / XSTEST_FILE, out, args.backbone,
                                           args.overwrite)
    write_json_atomic(out / "summary.json", summary)
    _print_summary(summary)
    print(f"wrote {out / 'summary.json'}")
    return 0


def run_pku_pairs(args: argparse.Namespace) -> int:
    if not Path(args.source).is_file():
        raise PrefvecError(f"PKU realign file {args.source} does not exist")
    n = write_pku_pairs_jsonl(Path(args.source), Path(args.out))
    print(f"wrote {args.out} ({n} pairs, chosen = the safer response)")
    return 0


def run_train_refusal(args: argparse.Namespace) -> int:
    from prefvec_ds.data.sources import read_rows  # noqa: PLC0415
    from prefvec_ds.eval import refusal as R  # noqa: PLC0415

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise PrefvecError(f"output folder {out} already exists (pass --overwrite)")
    rows = R.read_xstest(args.xstest)
    texts, labels = [r["completion"] for r in rows], [r["refused"] for r in rows]
    for i, row in enumerate(read_rows(args.extra) if args.extra else []):
        if not {"response", "refused"} <= set(row):
            raise PrefvecError(f"{args.extra}:{i}: expected keys response and refused")
        texts.append(row["response"])
        labels.append(bool(row["refused"]))
    from prefvec_ds.ckpt.writer import atomic_output_dir  # noqa: PLC0415

    with atomic_output_dir(out, args.overwrite) as tmp:
        R.RefusalClassifier.train(texts, labels, args.backbone).save(tmp)
    print(f"wrote {out} ({len(texts)} responses, {sum(labels)} refusals)")
    return 0


def _parse_vectors(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        path, sep, eta = item.rpartition("=")
        try:
            out[path] = float(eta)
        except ValueError:
            sep = ""
        if not sep or not path:
            raise PrefvecError(f"--vector {item!r}: expected DIR=ETA such as vecs/helpful=0.5")
    return out


def run_knowledge(args: argparse.Namespace) -> int:
    import tempfile  # noqa: PLC0415

    from prefvec_ds.eval import knowledge as K  # noqa: PLC0415

    tasks = [t for t in args.tasks.split(",") if t]
    include = args.include_path
    with tempfile.TemporaryDirectory(prefix="prefvec-tasks-") as tmp:
        if args.local_csqa or args.embedded_task:
            if include:
                raise PrefvecError("--include-path cannot be combined with --local-csqa or "
                                   "--embedded-task (put your YAMLs beside theirs instead)")
            include = tmp
            if args.local_csqa:
                from prefvec_ds.data.sources import read_rows  # noqa: PLC0415

                K.write_local_task(tmp, "csqa_local", read_rows(args.local_csqa), "letters")
                tasks = [t for t in tasks if t != "commonsense_qa"] + ["csqa_local"]
            if args.embedded_task:
                K.write_local_task(tmp, "embedded_knowledge", K.embedded_knowledge_rows(), "cloze")
                tasks = [t for t in tasks if t != "commonsense_qa"] + ["embedded_knowledge"]
        spec = K.KnowledgeSpec(tasks=tasks, include_path=include, num_fewshot=args.num_fewshot,
                               limit=args.limit, batch_size=args.batch_size,
                               apply_chat_template=args.chat_template)
        results = K.evaluate_knowledge(*_knowledge_model(args), spec)
    for task, metrics in results.items():
        print(f"{task}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    if args.out:
        from prefvec_ds.atomic import write_json_atomic  # noqa: PLC0415

        write_json_atomic(Path(args.out), {"model": args.model, "vectors": args.vector,
                                           "results": results})
    return 0


def _knowledge_model(args) -> tuple:
    """(the folder, None), or (the loaded base with --vector amounts applied in place, its
    tokenizer)."""
    if not args.vector:
        return args.model, None
    from prefvec_ds.ckpt.apply import apply_vectors  # noqa: PLC0415
    from prefvec_ds.eval.generate import load_policy  # noqa: PLC0415

    model, tokenizer = load_policy(args.model)
    apply_vectors(model, _parse_vectors(args.vector))
    return model, tokenizer



def run_judge(args: argparse.Namespace) -> int:
    from prefvec_ds.eval.judge import judge_rows_file  # noqa: PLC0415

    result = judge_rows_file(args.rows, base_url=args.base_url, model=args.model,
                             api_key_env=args.api_key_env, max_concurrency=args.max_concurrency,
                             cache_dir=args.cache_dir)
    for axis in ("judge_helpful", "judge_harmless"):
        value, n = result["means"][axis], result["means"][f"n_{axis}"]
        shown = "none scored" if value is None else f"{value:.3f}"
        print(f"{axis}: {shown} (n={n} of {len(result['scores'][axis])})")
    if args.out:
        from prefvec_ds.atomic import write_json_atomic  # noqa: PLC0415

        write_json_atomic(Path(args.out), result)
    return 0

def run_convert_safe_rlhf(args: argparse.Namespace) -> int:
    from prefvec_ds.ckpt.writer import parse_size  # noqa: PLC0415
    from prefvec_ds.models.safe_rlhf import convert_safe_rlhf  # noqa: PLC0415

    report = convert_safe_rlhf(Path(args.source), Path(args.out), parse_size(args.max_shard_size),
                               args.overwrite)
    print(f"wrote {args.out}: LlamaForSequenceClassification, {report['tensors']} tensors "
          f"({report['score_type']} model; score_head -> score)")
    return 0
