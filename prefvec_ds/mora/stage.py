"""The MORA stage: every shard runs its prompts end to end, then one gather merges the shards.

Per chunk of `prompts_per_batch` pool prompts (chunk c belongs to shard c mod S):
  1. mine: N answers per prompt, every dimension scored, single-reward prompts found;
  2. fuse: targets rewritten into multi-intent prompts (original kept in the record);
  3. self-play: K answers per rewritten prompt, every dimension scored;
  4. select: the max-margin pair whose chosen answer is never worse on any dimension.
Each finished prompt is one line appended (and fsynced) to the shard's log; a re-run skips the
prompts already there, whatever the previous shard layout. The random streams are per chunk,
so results are the same for any number of shards and any interruption point.

Shards are launcher ranks (RANK/WORLD_SIZE, SLURM_PROCID/SLURM_NTASKS, MPI) times SLURM array
tasks (SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, with --array). Only prefvec_ds.distributed.env is
used for that: the stage never joins a process group.

    python -m prefvec_ds.mora.stage shard CONFIG [overrides] [--no-array]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from prefvec_ds import PrefvecError
from prefvec_ds.atomic import write_json_atomic
from prefvec_ds.config.layout import RunLayout
from prefvec_ds.config.schema import RunConfig
from prefvec_ds.distributed.process import REQUEUE_EXIT_CODE, run_main, wait_forwarding
from prefvec_ds.mora import pairs_io
from prefvec_ds.mora.mining import PoolPrompt, classify, load_pool, pass_at
from prefvec_ds.mora.rewrite import rewritten_prompt
from prefvec_ds.mora.scoring import DimensionTable, score_answers
from prefvec_ds.mora.select import select_pair
from prefvec_ds.mora.selfplay import chunk_seed

_STOP: list[int] = []


def out_dir(cfg: RunConfig) -> Path:
    return RunLayout.of(cfg).mora


def policy_dir(cfg: RunConfig, must_exist: bool = True) -> Path:
    """The sampling policy: pipeline.mora.policy, else theta_base."""
    from prefvec_ds.models.hf import check_model_dir  # noqa: PLC0415
    from prefvec_ds.train.stage import base_model_dir  # noqa: PLC0415

    if cfg.pipeline.mora.policy:
        return check_model_dir(cfg.pipeline.mora.policy, "pipeline.mora.policy")
    return base_model_dir(cfg, must_exist=must_exist)


def fingerprint(cfg: RunConfig) -> str:
    """What the shard records depend on (mixing, figures and `enabled` do not change them).
    Paths inside the run folder are left out, so that a copied run folder resumes."""
    mora = dataclasses.asdict(cfg.pipeline.mora)
    for key in ("enabled", "mix_into", "plots"):
        mora.pop(key)
    prefs = {k: dataclasses.asdict(v) for k, v in cfg.data.preferences.items()
             if v.source != "mora"}  # MORA's own outputs never shape its pool
    payload = {"mora": mora, "seed": cfg.seed, "base": cfg.model.base, "prefs": prefs,
               "data": [cfg.data.embedded_size, cfg.data.embedded_seed]}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def validate(cfg: RunConfig) -> None:
    """What can be checked before any shard starts (no model is loaded)."""
    from prefvec_ds.eval.scorers import SCORER_KINDS  # noqa: PLC0415
    from prefvec_ds.models.hf import check_model_dir  # noqa: PLC0415

    mora = cfg.pipeline.mora
    for spec in mora.scorers:
        kind = spec if isinstance(spec, str) else spec.get("kind")
        if kind not in SCORER_KINDS:
            raise PrefvecError(f"config parameter pipeline.mora.scorers: kind {kind!r}: expected "
                               f"one of {', '.join(SCORER_KINDS)}")
    if mora.policy:
        check_model_dir(mora.policy, "pipeline.mora.policy")
    if mora.rewriter.kind == "hf" and mora.rewriter.model:
        check_model_dir(mora.rewriter.model, "pipeline.mora.rewriter.model")


def check_fingerprint(cfg: RunConfig, restart: bool = False) -> None:
    """Shard logs of other settings must not be resumed: refuse (or, with restart, delete)."""
    out = out_dir(cfg)
    path = out / "fingerprint.json"
    want = fingerprint(cfg)
    if path.is_file():
        have = json.loads(path.read_text()).get("fingerprint")
        if have == want:
            return
        if not restart:
            raise PrefvecError(f"{out} holds MORA records of other settings (fingerprint {have}, "
                               f"now {want}): pass --restart to delete them, or another run_dir")
    if restart and out.exists():
        shutil.rmtree(out)
    write_json_atomic(path, {"fingerprint": want})


def shard_of(env=None, use_array: bool = True) -> tuple[int, int, int]:
    """(shard, number of shards, local rank): launcher rank x SLURM array task."""
    from prefvec_ds.distributed.env import discover  # noqa: PLC0415

    env = os.environ if env is None else env
    info = discover(env)
    task, tasks = 0, 1
    if use_array and "SLURM_ARRAY_TASK_ID" in env:
        low = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        task = int(env["SLURM_ARRAY_TASK_ID"]) - low
        tasks = int(env.get("SLURM_ARRAY_TASK_COUNT")
                    or int(env.get("SLURM_ARRAY_TASK_MAX", task + low)) - low + 1)
    return task * info.world_size + info.rank, tasks * info.world_size, info.local_rank


def chunks(pool: list[PoolPrompt], size: int) -> list[list[PoolPrompt]]:
    return [pool[i:i + size] for i in range(0, len(pool), size)]


class ChunkWorker:
    """Loaded policy, scorers and rewriter of one shard; `run(c, prompts)` -> records."""

    def __init__(self, cfg: RunConfig, local_rank: int = 0):
        from prefvec_ds.mora.rewrite import build_rewriter  # noqa: PLC0415
        from prefvec_ds.mora.scoring import build_scorers  # noqa: PLC0415
        from prefvec_ds.mora.selfplay import Sampler  # noqa: PLC0415

        self.cfg, self.mora = cfg, cfg.pipeline.mora
        policy = policy_dir(cfg)
        self.table = DimensionTable(self.mora.dimensions)
        self.scorers = build_scorers(self.mora.scorers)
        self.sampler = Sampler(policy, self._sampler_config(), local_rank)
        self.rewriter = build_rewriter(self.mora.rewriter, policy)

    def _sampler_config(self):
        """mora with vllm.max_model_len filled in when 0: a vLLM engine lives for the whole
        shard, so it reserves data.max_len prompt tokens + max_new_tokens (not vLLM's 131072
        for Llama-3.1: 16 GiB of KV cache for one sequence)."""
        vllm = self.mora.vllm
        if vllm.max_model_len:
            return self.mora
        length = self.cfg.data.max_len + self.mora.max_new_tokens
        return dataclasses.replace(self.mora, vllm=dataclasses.replace(vllm, max_model_len=length))

    def close(self) -> None:
        """Shut the sampler's vLLM engine down (a no-op for transformers)."""
        close = getattr(self.sampler, "close", None)
        if close is not None:
            close()

    def _scored(self, answers, vectors, ns: list[int]) -> dict:
        combined = [self.table.combined(v) for v in vectors]
        out = {"scores": {d: [v[d] for v in vectors] for d in self.table.dims},
               "combined": combined, "pass_at": pass_at(combined, ns)}
        if self.mora.keep_responses:
            out["responses"] = list(answers)
        return out

    def run(self, c: int, prompts: list[PoolPrompt]) -> list[dict]:
        mora, seed = self.mora, self.cfg.seed
        answers = self.sampler.sample([p.prompt for p in prompts], mora.pass_n,
                                      chunk_seed(seed, mora, c, "mine"))
        vectors = score_answers(self.scorers, self.table, [p.prompt for p in prompts], answers)
        records, targets = [], []
        for p, ans, vecs in zip(prompts, answers, vectors):
            info = classify(vecs, self.table)
            records.append({"id": p.id, "prompt": pairs_io.prompt_field(p.prompt),
                            "category": p.category, "target": info["target"],
                            "mine": {**self._scored(ans, vecs, mora.pass_at), **info},
                            "rewriter": mora.rewriter.kind, "rewrite": None, "selfplay": None,
                            "pair": None, "drop": None if info["target"] else "not a target"})
            if info["target"]:
                targets.append((p.id, p.prompt, info["missing"]))
        by_id = {r["id"]: r for r in records}
        rewrites = self.rewriter.rewrite(targets, chunk_seed(seed, mora, c, "rewrite"))
        fused = []
        for (pid, prompt, _), text in zip(targets, rewrites, strict=True):
            if text:
                fused.append((pid, rewritten_prompt(prompt, text)))
                by_id[pid]["rewrite"] = text
            else:
                by_id[pid]["drop"] = "the rewriter gave nothing usable"
        self._self_play(c, fused, by_id)
        return records

    def _self_play(self, c: int, fused: list, by_id: dict[int, dict]) -> None:
        mora = self.mora
        prompts = [p for _, p in fused]
        answers = self.sampler.sample(prompts, mora.selfplay_k,
                                      chunk_seed(self.cfg.seed, mora, c, "play"))
        vectors = score_answers(self.scorers, self.table, prompts, answers)
        ns = sorted({n for n in mora.pass_at if n <= mora.selfplay_k} | {mora.selfplay_k})
        for (pid, _), ans, vecs in zip(fused, answers, vectors):
            rec = by_id[pid]
            rec["selfplay"] = {**self._scored(ans, vecs, ns), **classify(vecs, self.table)}
            rec["selfplay"].pop("missing")
            sel = select_pair(ans, vecs, self.table, mora.min_margin)
            if sel.chosen is None:
                rec["drop"] = sel.reason
                continue
            rec["drop"] = None
            rec["pair"] = {"chosen": ans[sel.chosen], "rejected": ans[sel.rejected],
                           "margin": sel.margin, "chosen_scores": vecs[sel.chosen],
                           "rejected_scores": vecs[sel.rejected]}


def _stop(signum, frame):  # noqa: ARG001
    _STOP.append(signum)


def run_shard(cfg: RunConfig, shard: int, num_shards: int, local_rank: int = 0) -> int:
    """Process this shard's unfinished chunks; 0 when done, REQUEUE_EXIT_CODE on a signal."""
    out = out_dir(cfg)
    pool = load_pool(cfg)
    done = set(pairs_io.all_records(out))
    mine = [(c, ch) for c, ch in enumerate(chunks(pool, cfg.pipeline.mora.prompts_per_batch))
            if c % num_shards == shard and any(p.id not in done for p in ch)]
    print(f"[mora] shard {shard}/{num_shards}: {len(mine)} chunk(s) to do, "
          f"{len(done)} of {len(pool)} prompts already done", flush=True)
    if not mine:
        return 0
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _stop)
    worker = ChunkWorker(cfg, local_rank)
    t0 = time.monotonic()
    try:
        with pairs_io.ShardLog(pairs_io.shard_path(out, shard, num_shards)) as log:
            for k, (c, prompts) in enumerate(mine):
                if _STOP:
                    print(f"[mora] shard {shard}: stopped by a signal; a re-run resumes",
                          flush=True)
                    return REQUEUE_EXIT_CODE
                for record in worker.run(c, prompts):
                    if record["id"] not in done:
                        log.append(record)
                print(f"[mora] shard {shard}: chunk {k + 1}/{len(mine)} "
                      f"({time.monotonic() - t0:.1f} s)", flush=True)
    finally:
        worker.close()
    return 0


def pin_shard_gpu(env=None) -> str | None:
    """Under srun every task of a node sees all of the node's GPUs (`--gpus-per-node`), and
    vLLM takes no device argument: every shard's engine started on GPU 0 and the second one
    failed vLLM's free-memory check. An srun task therefore keeps only the GPU of its
    SLURM_LOCALID (through a preset CUDA_VISIBLE_DEVICES), before torch or vLLM touch CUDA;
    the scorers, built later, land there too. Local shards already get one GPU each
    (launch_local). Returns the GPU kept, or None when nothing was changed."""
    from prefvec_ds.distributed.env import srun_task  # noqa: PLC0415
    from prefvec_ds.distributed.launch import visible_gpu_ids  # noqa: PLC0415

    env = os.environ if env is None else env
    if not srun_task(env) or env.get("DS_ACCELERATOR") == "cpu":
        return None
    visible = visible_gpu_ids(env)
    if visible == []:
        return None  # no GPU at all
    local = int(env.get("SLURM_LOCALID", 0))
    gpu = str(visible[local % len(visible)] if visible else local)
    env["CUDA_VISIBLE_DEVICES"] = gpu
    return gpu


def launch_local(argv: list[str], nproc: int, devices: list[int] | None = None) -> int:
    """`nproc` shard processes on this node (RANK/WORLD_SIZE set for each; no rendezvous)."""
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_RANK": str(rank), "PYTHONUNBUFFERED": "1"}
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = str(devices[rank % len(devices)])
        procs.append(subprocess.Popen([sys.executable, "-m", "prefvec_ds.mora.stage", "shard",
                                       *argv, "--no-array"], env=env))
    return _wait_all(procs)


def launch_srun(argv: list[str], srun_args: list[str]) -> int:
    """One srun step over the allocation: a shard per task."""
    cmd = ["srun", "--kill-on-bad-exit=1", *srun_args, sys.executable, "-m",
           "prefvec_ds.mora.stage", "shard", *argv, "--no-array"]
    print(f"[mora] {' '.join(cmd)}", flush=True)
    return _wait_all([subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})])


def _wait_all(procs: list[subprocess.Popen]) -> int:
    codes = wait_forwarding(procs, tag="mora")
    bad = [c for c in codes if c not in (0, REQUEUE_EXIT_CODE)]
    return bad[0] if bad else max(codes)


def main(argv: list[str] | None = None) -> int:
    from prefvec_ds.config.loader import load_config  # noqa: PLC0415

    p = argparse.ArgumentParser(prog="python -m prefvec_ds.mora.stage")
    p.add_argument("what", choices=("shard",))
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--no-array", action="store_true",
                   help="ignore SLURM array variables (the pipeline's own launches)")
    args = p.parse_args(argv)

    def body() -> int:
        pin_shard_gpu()  # first: nothing may have initialised CUDA yet
        cfg = load_config(args.config, args.overrides)
        shard, num, local = shard_of(use_array=not args.no_array)
        return run_shard(cfg, shard, num, local)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
