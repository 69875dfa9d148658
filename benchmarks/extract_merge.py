"""Benchmark: conventional gather-then-merge vs `prefvec merge` on real ZeRO-3 checkpoints.

    python benchmarks/extract_merge.py --workdir /tmp/prefvec-bench --also-layers 12  # 374M, W=2
    python benchmarks/extract_merge.py --workdir /tmp/prefvec-bench --layers 12 --only-ours
    python benchmarks/extract_merge.py --workdir /tmp/prefvec-bench --layers 2 --only-ours --zero2

Builds (once, cached in --workdir) a Llama of hidden 1024, 24 layers, vocab 32000 (374M params,
untied), saves it as the HF base, and trains a "plus" and a "minus" copy for one AdamW step with
DeepSpeed ZeRO-3 on 2 CPU ranks (needs ~12 GB RAM while building). Then measures, each step with
its input files evicted from the page cache first (posix_fadvise DONTNEED: cold cache without
root), wall time and peak RSS (GNU time) of:
  (a) conventional: DeepSpeed's zero_to_fp32 on both checkpoints, then mergekit task_arithmetic
      (base + 1*(plus - base) - 1*(minus - base)) from a separate venv (created on first use);
  (b) `prefvec merge --base BASE --vector PLUS,MINUS=1` in one pass;
plus the disk's sequential read/write bandwidth (the faster of page-cache and O_DIRECT I/O) and
the I/O lower bound of (b): bytes read (fp32 partitions + base) / read bandwidth + bytes
written / write bandwidth (one disk: reads and writes share it; the overlapped bound, the larger
of the two terms, is printed too).
Targets from issue 3: (b) >= 4.5x faster than (a), peak RSS <= 1/4 of (a), time <= 1.3x the bound.
With --crc-cost, (b) is also timed without the CRC-32 check of the rank files' records
(PREFVEC_VERIFY_CRC=0), interleaved with runs that have it, and the check's cost is printed.
Both outputs are compared tensor by tensor (max abs difference printed). With --also-layers N,
(b) is measured on a second model size too (built and cached the same way), to check that its
peak RSS does not grow with the model. With --zero2, the same model is also trained and saved
under ZeRO stage 2 (W=2; cached likewise), and the extractor (`prefvec vector PLUS MINUS`) and
(b) are timed on the ZeRO-2 checkpoints next to the ZeRO-3 ones, cold cache each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
DS_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
          "TORCH_EXTENSIONS_DIR": "/root/.cache/prefvec-ds/torch_extensions",
          # glibc returns freed blocks >1 MiB to the OS at once: ~3 GB less peak while building
          "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}


def model_config(layers: int) -> dict:
    return dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512,
                tie_word_embeddings=False)


def ds_config(stage: int = 3) -> dict:
    """ZeRO-3, fp32, settings that kept a 374M CPU run at ~11.5 GB (see the facts note); or
    ZeRO-2 with the same bucket sizes (its fp32 masters: one flat partition per rank)."""
    if stage == 2:
        zero = {"stage": 2, "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7}
    else:
        zero = {"stage": 3, "sub_group_size": 5e7, "reduce_bucket_size": 5e7,
                "stage3_prefetch_bucket_size": 2e7, "stage3_max_live_parameters": 5e7,
                "stage3_max_reuse_distance": 5e7}
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "steps_per_print": 10**6,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True,
                                                      "foreach": False}},
            "zero_optimization": zero}


def _rank_build(out: Path, layers: int, label: str, seed: int, stage: int = 3) -> None:
    """One rank of a build launch: base model (same seed everywhere) -> 1 step -> checkpoint."""
    import torch
    import torch._dynamo  # noqa: F401
    import deepspeed
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**model_config(layers))).float()
    if label == "plus" and dist.get_rank() == 0:
        model.save_pretrained(out / "base")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config(stage))
    gen = torch.Generator().manual_seed(seed * 10 + dist.get_rank())
    ids = torch.randint(0, 32000, (1, 16), generator=gen)
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    engine.save_checkpoint(str(out / label), tag="global_step1")
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(workdir: Path, layers: int, stage: int = 3) -> Path:
    out = workdir / (f"llama_L{layers}" if stage == 3 else f"llama_L{layers}_zero{stage}")
    for label, seed in (("plus", 1), ("minus", 2)):
        if (out / label / "latest").is_file():
            continue
        print(f"building {label} ZeRO-{stage} checkpoint of L={layers} (2 ranks)...", flush=True)
        env = dict(os.environ, **DS_ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                   WORLD_SIZE="2")
        procs = [subprocess.Popen([sys.executable, str(HERE), "--rank-build", str(out), label,
                                   str(layers), str(seed), str(stage)],
                                  env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(2)]
        if any(p.wait() for p in procs):
            raise SystemExit(f"building {label} failed")
    return out


def evict(*paths: Path) -> None:
    """Drop these files from the page cache (clean pages only; no root needed)."""
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fdatasync(fd)  # dirty pages (fresh outputs) cannot be evicted until written
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def warm_host_cache(*paths: Path) -> None:
    """Read every input once. Inside a VM the host's page cache cannot be dropped, so after this
    every measured step (and the bandwidth probe) starts from the same state: evicted from our
    page cache, whatever the host keeps."""
    buf = bytearray(16 << 20)
    for root in paths:
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def disk_bandwidth(workdir: Path, src: Path, repeats: int = 3) -> tuple[float, float]:
    """Median (read, write) bytes/s of the faster of two ways, each way measured `repeats` times:
    through the page cache (16 MiB reads of `src` after evicting it; a 1 GiB buffered write +
    fdatasync) and with O_DIRECT into huge-page buffers (as prefvec does: 16 MiB reads, 8 MiB
    writes). Taking the faster keeps the I/O lower bound honest whichever way the disk is used."""
    sys.path.insert(0, str(HERE.parents[1]))
    from prefvec_ds.ckpt.directio import aligned_buffer

    plain, direct = bytearray(16 << 20), aligned_buffer(16 << 20)
    reads: dict[str, list] = {"page cache": [], "O_DIRECT": []}
    writes: dict[str, list] = {"page cache": [], "O_DIRECT": []}
    target = workdir / "bw.tmp"
    for _ in range(repeats):
        for way, flag, buf in (("page cache", 0, plain), ("O_DIRECT", os.O_DIRECT, direct)):
            evict(src)
            fd = os.open(src, os.O_RDONLY | flag)
            t, n = time.perf_counter(), 0
            while k := os.readv(fd, [buf]):
                n += k
            reads[way].append(n / (time.perf_counter() - t))
            os.close(fd)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag)
            t = time.perf_counter()
            for _ in range(128):
                os.write(fd, memoryview(buf)[:8 << 20])
            os.fdatasync(fd)
            writes[way].append((128 * (8 << 20)) / (time.perf_counter() - t))
            os.close(fd)
            target.unlink()
    for way in reads:
        print(f"disk, {way}: sequential read {statistics.median(reads[way]) / 1e9:.2f} GB/s "
              f"(page cache evicted), write {statistics.median(writes[way]) / 1e9:.2f} GB/s "
              f"(+ fdatasync); medians of {repeats}")
    return (max(statistics.median(v) for v in reads.values()),
            max(statistics.median(v) for v in writes.values()))


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS bytes) of one command, via GNU time."""
    stat = Path(f"/tmp/prefvec-bench-time-{os.getpid()}")
    t = time.perf_counter()
    with open(stat.with_suffix(".log"), "a") as log:  # progress bars and warnings go here
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(stat), *cmd], check=True,
                       env=dict(os.environ, **(env or {})), stdout=log, stderr=log)
    wall = time.perf_counter() - t
    rss = int(stat.read_text().split()[-1]) * 1024
    stat.unlink()
    return wall, rss


def mergekit_venv(workdir: Path) -> Path:
    """A venv with mergekit, reusing the system torch (pinned) so no CUDA wheels are pulled."""
    venv = workdir / "venv-mergekit"
    if not (venv / "bin" / "mergekit-yaml").exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "mergekit",
                        f"torch=={_torch_version()}"], check=True)
    return venv


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def conventional(models: Path, work: Path, venv: Path) -> list[tuple[str, float, float]]:
    steps = []
    for label in ("plus", "minus"):
        out = work / f"{label}_fp32"
        shutil.rmtree(out, ignore_errors=True)
        evict(models / label)
        cmd = [sys.executable, str(models / label / "zero_to_fp32.py"), str(models / label),
               str(out), "--safe_serialization"]
        steps.append((f"zero_to_fp32 {label}", *measure(cmd, DS_ENV)))
        shutil.copy(models / "base" / "config.json", out / "config.json")  # mergekit needs it
    cfg = work / "task_arithmetic.yml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {models / 'base'}\ndtype: float32\n"
                   f"models:\n  - model: {work / 'plus_fp32'}\n    parameters: {{weight: 1.0}}\n"
                   f"  - model: {work / 'minus_fp32'}\n    parameters: {{weight: -1.0}}\n")
    out = work / "merged_mergekit"
    shutil.rmtree(out, ignore_errors=True)
    evict(models / "base", work / "plus_fp32", work / "minus_fp32")
    cmd = [str(venv / "bin" / "mergekit-yaml"), str(cfg), str(out), "--out-shard-size", "5B",
           "--no-copy-tokenizer"]  # the synthetic base has no tokenizer
    steps.append(("mergekit task_arithmetic", *measure(cmd)))
    return steps


def ours(models: Path, work: Path, workers: int, env: dict | None = None
         ) -> tuple[float, float, Path]:
    out = work / "merged_prefvec"
    shutil.rmtree(out, ignore_errors=True)
    evict(models / "base", models / "plus", models / "minus")
    cmd = [sys.executable, "-m", "prefvec_ds.cli", "merge", "--base", str(models / "base"),
           "--vector", f"{models / 'plus'},{models / 'minus'}=1", "--out", str(out),
           "--workers", str(workers)]
    wall, rss = measure(cmd, {"PYTHONPATH": str(HERE.parents[1]), **(env or {})})
    return wall, rss, out


def crc_cost(models: Path, work: Path, workers: int, repeats: int) -> dict:
    """(b) with the CRC-32 check of every record read (the default) and without it
    (PREFVEC_VERIFY_CRC=0), runs interleaved so that load on the machine hits both alike."""
    import resource

    def timed(env=None) -> tuple[float, float]:
        """(wall s, CPU s user+system of the merge): CPU is the steadier figure on a busy
        machine, since the check is pure CPU work."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = ours(models, work, workers, env)[0]
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)

    on, off = [], []
    for _ in range(repeats):
        on.append(timed())
        off.append(timed({"PREFVEC_VERIFY_CRC": "0"}))
    from prefvec_ds.ckpt import crc

    checked = sum(f.stat().st_size for label in ("plus", "minus")
                  for f in checkpoint(models / label).optim_files)
    t_on, t_off = (statistics.median(r[0] for r in runs) for runs in (on, off))
    c_on, c_off = (statistics.median(r[1] for r in runs) for runs in (on, off))
    impl = f"{crc._crc32.__module__ or 'zlib'}.crc32"
    print(f"CRC-32 check ({impl}): (b) median of {repeats}: wall {t_on:.2f} s with it, "
          f"{t_off:.2f} s without (PREFVEC_VERIFY_CRC=0): {100 * (t_on / t_off - 1):+.1f}%; "
          f"CPU {c_on:.2f} s vs {c_off:.2f} s: {100 * (c_on / c_off - 1):+.1f}% "
          f"(wall with: {', '.join(f'{t:.2f}' for t, _ in on)}; without: "
          f"{', '.join(f'{t:.2f}' for t, _ in off)}; rank files {checked / 1e9:.2f} GB)")
    return {"crc_impl": impl, "crc_on_s": t_on, "crc_off_s": t_off,
            "crc_cost": t_on / t_off - 1, "crc_cpu_on_s": c_on, "crc_cpu_off_s": c_off,
            "crc_cpu_cost": c_on / c_off - 1, "crc_on_runs": on, "crc_off_runs": off}


def bytes_moved(models: Path, out: Path) -> tuple[int, int]:
    """(bytes the merge must read: valid fp32 partition bytes of both checkpoints + base
    safetensors, bytes it writes)."""
    read = sum(f.stat().st_size for f in (models / "base").glob("*.safetensors"))
    for label in ("plus", "minus"):
        layout = checkpoint(models / label).layout
        read += sum(s.numel * 4 for g in layout.groups for s in g)  # padding excluded
    return read, sum(f.stat().st_size for f in out.glob("*.safetensors"))


def checkpoint(folder: Path):
    """Our reader for a DeepSpeed checkpoint of any ZeRO stage (its layout, its rank files)."""
    sys.path.insert(0, str(HERE.parents[1]))
    from prefvec_ds.ckpt.sources import open_deepspeed

    return open_deepspeed(folder)


def num_params(models: Path) -> int:
    return sum(s.numel for g in checkpoint(models / "plus").layout.groups for s in g)


def max_difference(a: Path, b: Path) -> float:
    import numpy as np

    from prefvec_ds.ckpt.safetensors_io import SafetensorsFolder

    fa, fb = SafetensorsFolder(a), SafetensorsFolder(b)
    if set(fa.names()) != set(fb.names()):
        return float("inf")
    return max(float(np.abs(fa.read_fp32(n) - fb.read_fp32(n)).max(initial=0.0))
               for n in fa.names())


def _median_runs(fn, repeats: int):
    runs = [fn() for _ in range(repeats)]
    return sorted(runs, key=lambda r: r[0])[len(runs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/prefvec-bench"))
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--also-layers", type=int, default=0, metavar="N",
                    help="also measure (b) at N layers: peak RSS should not grow with the model")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3,
                    help="median of this many runs (and of this many disk probes)")
    ap.add_argument("--only-ours", action="store_true", help="skip the conventional route")
    ap.add_argument("--methods", action="store_true",
                    help="also ties / dare_ties merges (and mergekit's ties on the gathered models)")
    ap.add_argument("--zero2", action="store_true",
                    help="also build ZeRO-2 checkpoints of the model and time the extractor "
                         "(prefvec vector) and (b) on them next to the ZeRO-3 ones")
    ap.add_argument("--crc-cost", action="store_true",
                    help="also time (b) with and without the CRC-32 check (issue 14: <= 10%%)")
    ap.add_argument("--results", type=Path, default=None, metavar="FILE",
                    help="also write the printed figures, with date and versions, to FILE "
                         "(e.g. docs/results/extract_merge.md)")
    args = ap.parse_args()
    from results_page import recording  # noqa: PLC0415 - benchmarks/ is on sys.path

    with recording(args.results, "Extractor and merger benchmark"):
        run(args)


def run(args: argparse.Namespace) -> None:
    args.workdir.mkdir(parents=True, exist_ok=True)
    models = build(args.workdir, args.layers)
    work = args.workdir / f"out_L{args.layers}"
    work.mkdir(exist_ok=True)
    warm_host_cache(models)
    probe = sorted((models / "plus").rglob("*optim_states.pt"))[0]
    read_bw, write_bw = disk_bandwidth(args.workdir, probe, args.repeats)
    params = num_params(models)
    results = {"layers": args.layers, "params": params, "read_GBps": read_bw / 1e9,
               "write_GBps": write_bw / 1e9}
    print(f"disk, the faster way each: read {read_bw / 1e9:.2f} GB/s, write {write_bw / 1e9:.2f} GB/s")
    print(f"model: {args.layers} layers, {params / 1e6:.0f}M params, ZeRO-3 W=2 fp32")
    if not args.only_ours:
        venv = mergekit_venv(args.workdir)
        steps = _median_runs(lambda: _conventional_total(models, work, venv), args.repeats)[1]
        for name, wall, rss in steps:
            print(f"(a) {name:28s} {wall:7.2f} s   peak RSS {rss / 1e9:5.2f} GB")
        a_wall, a_rss = sum(s[1] for s in steps), max(s[2] for s in steps)
        print(f"(a) conventional end to end      {a_wall:7.2f} s   peak RSS {a_rss / 1e9:5.2f} GB")
        results.update(a_s=a_wall, a_rss_GB=a_rss / 1e9)
    b_wall, b_rss, out = _median_runs(lambda: ours(models, work, args.workers), args.repeats)
    print(f"(b) prefvec merge (one pass)     {b_wall:7.2f} s   peak RSS {b_rss / 1e9:5.2f} GB")
    read, written = bytes_moved(models, out)
    bound = read / read_bw + written / write_bw
    overlapped = max(read / read_bw, written / write_bw)
    print(f"bytes: read {read / 1e9:.2f} GB, write {written / 1e9:.2f} GB; I/O lower bound "
          f"{bound:.2f} s (read and write overlapped: {overlapped:.2f} s); (b) / bound = "
          f"{b_wall / bound:.2f} (target <= 1.3; {b_wall / overlapped:.2f} x the overlapped one)")
    # The fixed cost before any data moves: interpreter, imports (numpy; no torch), arguments.
    startup = _median_runs(lambda: measure([sys.executable, "-m", "prefvec_ds.cli", "merge",
                                            "--help"], {"PYTHONPATH": str(HERE.parents[1])}), 3)[0]
    print(f"start-up (prefvec merge --help): {startup:.2f} s; (b) without it "
          f"{b_wall - startup:.2f} s = {(b_wall - startup) / bound:.2f} x bound")
    results.update(b_s=b_wall, b_rss_GB=b_rss / 1e9, bound_s=bound, overlapped_bound_s=overlapped,
                   b_over_bound=b_wall / bound, read_GB=read / 1e9, write_GB=written / 1e9,
                   startup_s=startup)
    if not args.only_ours:
        print(f"speed-up (a)/(b) = {a_wall / b_wall:.2f}x (target >= 4.5); "
              f"RSS (b)/(a) = {b_rss / a_rss:.3f} (target <= 0.25)")
        diff = max_difference(work / "merged_mergekit", out)
        print(f"max |(a) - (b)| over all tensors: {diff:.3g}")
        results.update(speedup=a_wall / b_wall, rss_ratio=b_rss / a_rss, max_abs_diff=diff)
    if args.crc_cost:
        results.update(crc_cost(models, work, args.workers, args.repeats))
    if args.also_layers:
        results["also"] = _second_size(args, params, b_wall, b_rss)
    if args.methods:
        from extract_merge_methods import methods_next_to_task_arithmetic  # noqa: PLC0415

        results["methods"] = methods_next_to_task_arithmetic(args, models, work)
    if args.zero2:
        from extract_merge_zero2 import zero2_next_to_zero3  # noqa: PLC0415

        results["zero2_vs_zero3"] = zero2_next_to_zero3(args, models, work)
    (work / "results.json").write_text(json.dumps(results, indent=2))


def _second_size(args, params: int, b_wall: float, b_rss: float) -> dict:
    """(b) on a second model size: its peak RSS against the main size's."""
    models = build(args.workdir, args.also_layers)
    work = args.workdir / f"out_L{args.also_layers}"
    work.mkdir(exist_ok=True)
    warm_host_cache(models)
    wall, rss, out = _median_runs(lambda: ours(models, work, args.workers), args.repeats)
    other = num_params(models)
    print(f"(b) at {args.also_layers} layers ({other / 1e6:.0f}M params): {wall:.2f} s, peak RSS "
          f"{rss / 1e9:.3f} GB; at {args.layers} layers ({params / 1e6:.0f}M): {b_wall:.2f} s, "
          f"{b_rss / 1e9:.3f} GB")
    (small, big) = sorted([(other, wall, rss), (params, b_wall, b_rss)])
    print(f"larger model / smaller: params x{big[0] / small[0]:.2f} -> (b) peak RSS "
          f"x{big[2] / small[2]:.2f}, time x{big[1] / small[1]:.2f}")
    shutil.rmtree(out, ignore_errors=True)
    return {"layers": args.also_layers, "params": other, "b_s": wall, "b_rss_GB": rss / 1e9}


def _conventional_total(models: Path, work: Path, venv: Path):
    steps = conventional(models, work, venv)
    return sum(s[1] for s in steps), steps


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-build":
        _rank_build(Path(sys.argv[2]), int(sys.argv[4]), sys.argv[3], int(sys.argv[5]),
                    int(sys.argv[6]))
    else:
        main()
