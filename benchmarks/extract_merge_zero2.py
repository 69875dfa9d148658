"""extract_merge.py --zero2: the extractor (`prefvec vector`) and `prefvec merge` on ZeRO-2
checkpoints of the benchmark model, next to the ZeRO-3 ones (cold cache each, medians of
--repeats). The ZeRO-2 pair is trained and cached like the ZeRO-3 one (W=2, fp32, one AdamW step,
same base), under --workdir/llama_L{layers}_zero2.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import extract_merge as bench


def extractor(models: Path, work: Path, workers: int) -> tuple[float, float, Path]:
    """`prefvec vector --plus PLUS --minus MINUS` (phi as fp32 safetensors), cold cache."""
    out = work / "vector_prefvec"
    shutil.rmtree(out, ignore_errors=True)
    bench.evict(models / "plus", models / "minus")
    cmd = [sys.executable, "-m", "prefvec_ds.cli", "vector", "--plus", str(models / "plus"),
           "--minus", str(models / "minus"), "--out", str(out), "--workers", str(workers)]
    wall, rss = bench.measure(cmd, {"PYTHONPATH": str(bench.HERE.parents[1])})
    return wall, rss, out


def zero2_next_to_zero3(args, models3: Path, work3: Path) -> dict:
    """The extractor and (b) on ZeRO-2 checkpoints of the same model, next to ZeRO-3."""
    models2 = bench.build(args.workdir, args.layers, stage=2)
    work2 = args.workdir / f"out_L{args.layers}_zero2"
    work2.mkdir(exist_ok=True)
    bench.warm_host_cache(models2)
    rows = {}
    for stage, models, work in ((3, models3, work3), (2, models2, work2)):
        ckpt = bench.checkpoint(models / "plus")
        v_wall, v_rss, vec = bench._median_runs(
            lambda: extractor(models, work, args.workers), args.repeats)
        b_wall, b_rss, _ = bench._median_runs(
            lambda: bench.ours(models, work, args.workers), args.repeats)
        fp32 = sum(s.numel * 4 for g in ckpt.layout.groups for s in g)
        print(f"ZeRO-{stage} W={ckpt.layout.world}: vector {v_wall:6.2f} s, peak RSS "
              f"{v_rss / 1e9:.3f} GB ({2 * fp32 / 1e9:.2f} GB of fp32 partitions read); merge "
              f"{b_wall:6.2f} s, peak RSS {b_rss / 1e9:.3f} GB")
        rows[f"zero{stage}"] = {"vector_s": v_wall, "vector_rss_GB": v_rss / 1e9,
                                "merge_s": b_wall, "merge_rss_GB": b_rss / 1e9}
        shutil.rmtree(vec, ignore_errors=True)
    z2, z3 = rows["zero2"], rows["zero3"]
    print(f"ZeRO-2 / ZeRO-3: vector time x{z2['vector_s'] / z3['vector_s']:.2f}, merge time "
          f"x{z2['merge_s'] / z3['merge_s']:.2f}")
    return rows
