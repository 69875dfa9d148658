"""Downstream value of MORA pairs on the embedded default: DPO with MORA pairs vs without.

From theta_base of a finished `prefvec run recipes/quickstart-mora.yaml` (its SFT policy and its
`mora/pairs.jsonl`), four DPO experiments, every one with the quickstart's DPO settings:

    sequential-original     helpful DPO (H), then harmless DPO (S) from its result
    sequential-mora         helpful DPO (H + M), then harmless DPO (S + M) from its result
    simultaneous-original   one DPO on H u S
    simultaneous-mora       one DPO on H u S u M

H / S = the embedded pairs ordered by better / safer_response_id without their held-out pairs,
M = the MORA pairs. Each model (and theta_base) answers greedily the held-out single-intent
prompts and 200 fresh fused prompts; the table gives both dimensions (rules_dual):
helpfulness on benign prompts, harmlessness (refusal) on harmful prompts, both on fused ones.

    python benchmarks/mora_downstream.py --run runs/quickstart-mora --workdir /tmp/mora-down
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def prefvec(*args: str) -> None:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "prefvec_ds.cli", *args], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"prefvec {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(f"  prefvec {args[0]} {args[1] if len(args) > 1 else ''} ({time.time() - t0:.0f} s)",
          flush=True)


def write_sets(run_cfg, pairs_file: Path, folder: Path) -> dict[str, Path]:
    """H, S, M as {prompt, chosen, rejected} jsonl; H and S without their held-out pairs."""
    from prefvec_ds.config.schema import PreferenceConfig
    from prefvec_ds.data.pairs import is_held_out
    from prefvec_ds.data.sources import load_preference

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, order_by in (("H", "better_response_id"), ("S", "safer_response_id")):
        pairs = load_preference(name, PreferenceConfig(order_by=order_by), run_cfg.data)
        rows = [{"prompt": p.prompt[-1][1], "chosen": p.chosen, "rejected": p.rejected}
                for p in pairs if not is_held_out(p.key(), 0.1)]
        out[name] = folder / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    mora = [json.loads(x) for x in pairs_file.read_text().splitlines()]
    out["M"] = folder / "M.jsonl"
    out["M"].write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")})
                                + "\n" for r in mora))
    return out


def concat(sets: dict[str, Path], names: str, folder: Path) -> Path:
    path = folder / f"{names}.jsonl"
    path.write_text("".join(sets[n].read_text() for n in names))
    return path


def dpo(recipe: dict, base: Path, data: Path, folder: Path) -> Path:
    """One DPO run (direction d+) from `base` on `data`; returns the exported HF model."""
    model = folder / "model"
    if (model / "config.json").is_file():
        return model
    cfg = {**recipe, "run_dir": str(folder), "model": {"path": str(base), "base": str(base)},
           "data": {**recipe["data"], "sft_source": "embedded",
                    "preferences": {"d": {"source": "jsonl", "path": str(data),
                                          "eval_fraction": 0.0}}}}
    cfg.pop("pipeline", None)
    path = folder / "config.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    prefvec("train", "dpo", str(path), "--direction", "d+")
    # theta_dpo = base + (theta_dpo - base): the ZeRO-3 checkpoint exported as a HF folder
    prefvec("merge", "--base", str(base), "--vector", f"{folder / 'dpo' / 'd+' / 'ckpt'},{base}=1",
            "--out", str(model), "--overwrite")
    return model


def evaluate(model: Path, prompts: dict[str, list], samples: int) -> dict[str, float]:
    """Mean rules_dual scores per prompt group: greedy answers, and `samples` sampled answers
    per prompt (T = 1, fixed seed: every model sees the same random draws)."""
    from prefvec_ds.eval.generate import GenerationSpec, generate, load_policy
    from prefvec_ds.mora.scoring import DualRuleScorer

    import torch

    torch.set_num_threads(1)
    policy, tok = load_policy(model)
    specs = {"greedy": GenerationSpec(max_new_tokens=40, batch_size=64),
             "sampled": GenerationSpec(max_new_tokens=40, batch_size=16, do_sample=True,
                                       num_samples=samples, seed=1234)}
    out = {}
    for mode, spec in specs.items():
        for group, group_prompts in prompts.items():
            answers = generate(policy, tok, group_prompts, spec)
            flat = [p for p, a in zip(group_prompts, answers) for _ in a]
            scores = DualRuleScorer().score(flat, [x for a in answers for x in a])
            for axis, values in scores.items():
                out[f"{mode}:{group}/{axis}"] = sum(values) / len(values)
    return out


def eval_prompts(run_cfg) -> dict[str, list]:
    """Held-out single-intent prompts (benign, harmful) of H and S, and fresh fused prompts."""
    from prefvec_ds.config.schema import PreferenceConfig
    from prefvec_ds.data import embedded
    from prefvec_ds.data.pairs import is_held_out, user_prompt
    from prefvec_ds.data.sources import load_preference

    seen: dict = {}
    for order_by in ("better_response_id", "safer_response_id"):
        for p in load_preference("eval", PreferenceConfig(order_by=order_by), run_cfg.data):
            if is_held_out(p.key(), 0.1):
                seen.setdefault(p.prompt, None)
    harmful = [p for p in seen if embedded.parse_task(p[-1][1]).harm is not None]
    benign = [p for p in seen if embedded.parse_task(p[-1][1]).harm is None]
    fused = [user_prompt(t) for t in embedded.fused_prompts(200, seed=99)]
    return {"benign": benign, "harmful": harmful, "fused": fused}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", default="runs/quickstart-mora", help="finished quickstart-mora run")
    ap.add_argument("--workdir", default="/tmp/mora-downstream")
    ap.add_argument("--dpo-lr", type=float, default=None, help="override the recipe's dpo.lr")
    ap.add_argument("--samples", type=int, default=4, help="sampled answers per eval prompt")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from prefvec_ds.config.loader import load_config

    run = Path(args.run).resolve()
    run_cfg = load_config(run / "pipeline" / "config.yaml")
    recipe = yaml.safe_load((run / "pipeline" / "config.yaml").read_text())
    if args.dpo_lr:
        recipe["dpo"]["lr"] = args.dpo_lr
    base = run / "sft" / "model"
    work = Path(args.workdir).resolve()
    sets = write_sets(run_cfg, run / "mora" / "pairs.jsonl", work / "data")
    print({k: len(v.read_text().splitlines()) for k, v in sets.items()}, flush=True)
    t0 = time.time()
    models = {"base": base}
    for tag, extra in (("original", ""), ("mora", "M")):
        print(f"sequential-{tag}", flush=True)
        helpful = dpo(recipe, base, concat(sets, "H" + extra, work / "data"),
                      work / f"seq-{tag}-1-helpful")
        models[f"sequential-{tag}"] = dpo(recipe, helpful, concat(sets, "S" + extra,
                                                                  work / "data"),
                                          work / f"seq-{tag}-2-harmless")
        print(f"simultaneous-{tag}", flush=True)
        models[f"simultaneous-{tag}"] = dpo(recipe, base, concat(sets, "HS" + extra,
                                                                 work / "data"),
                                            work / f"sim-{tag}")
    prompts = eval_prompts(run_cfg)
    print(f"eval prompts: {({k: len(v) for k, v in prompts.items()})}; training "
          f"{time.time() - t0:.0f} s", flush=True)
    table = {name: evaluate(path, prompts, args.samples) for name, path in models.items()}
    (work / "results.json").write_text(json.dumps(table, indent=2))
    cols = ["benign/helpful", "harmful/harmless", "fused/helpful", "fused/harmless"]
    for mode in ("greedy", "sampled"):
        print(f"\n{mode} answers" + (f" ({args.samples} per prompt, T=1)" if mode == "sampled"
                                      else ""))
        print(f"{'model':<24}" + "".join(f"{c:>18}" for c in cols))
        for name, row in table.items():
            print(f"{name:<24}" + "".join(f"{row[f'{mode}:{c}']:>18.3f}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
