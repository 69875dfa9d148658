#!/usr/bin/env bash
# The device check: what a lent GPU validates in minutes (docs/gpu.md; review outline in
# issue 19). One GPU, <= 8 minutes, no network: the embedded tiny model and tokenizer, and
# random-init weights with Llama-3.1-8B layer shapes built here.
#
#   benchmarks/gpu_check.sh [--out DIR]       # on a GPU node, from the repo root
#   benchmarks/gpu_check.sh --dry-run         # the CPU-possible parts on CPU (CI runs this)
#
# Prints one line per check: `CHECK <name> PASS|FAIL|SKIP <seconds>s <detail>`; each check's
# output is in DIR/logs/<name>.log. Exit status: the number of failed checks (0 = all good).
# Checks, in order of value:
#   versions    torch / CUDA / deepspeed / transformers / vLLM / nvcc / GPU
#   collectives group.init + all_reduce_sum, from_rank0, all_gather_objects (nccl on GPU: C1)
#   fused_adam  (GPU, background) time of DeepSpeed's FusedAdam JIT build (the configs use
#               torch_adam, so nothing below waits for it: S1)
#   sft         prefvec train sft, bf16 ZeRO-3 + gradient checkpointing, 1 rank (C2)
#   ref_logps   prefvec train ref-logps helpful
#   dpo         prefvec train dpo helpful+ and helpful- (step-0 eval: C1), peak memory, margins
#   extract     prefvec vector on the bf16_* checkpoints vs DeepSpeed's zero_to_fp32 gather
#   merge       prefvec merge (fp32, the pipeline default, and bf16)
#   memprobe    2 layers with Llama-3.1-8B shapes (h 4096, i 14336, vocab 128256): peak memory
#               after forward / backward / step of one DPO micro-batch (tiny shapes on --dry-run)
#   sweep       prefvec sweep with transformers; then with vLLM when it is installed (C4, R10)
set -uo pipefail

DRY=0
OUT="${OUT:-$(mktemp -d -t prefvec-gpu-check.XXXXXX)}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="$2"; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (expected --dry-run, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
PY="${PYTHON:-python}"
mkdir -p "$OUT/logs"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/prefvec-ds/torch_extensions}"
if ((DRY)); then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    LAUNCH=(--launcher none)  # one in-process rank: spares CI a launcher start per stage
else
    unset DS_ACCELERATOR  # a leftover `cpu` would run every check below on the CPU
    LAUNCH=(--nproc 1)        # the deepspeed launcher, as users run it
fi
FAILED=0

# check NAME TIMEOUT_S COMMAND...: run it, log it, print one line (the detail is the last line
# of the log that starts with RESULT:, else its last training/reference line). A function of
# this script runs in `bash -c` with the variables and functions it uses (timeout needs a
# program).
check() {
    local name="$1" limit="$2"; shift 2
    local log="$OUT/logs/$name.log" t0=$SECONDS rc detail state
    if declare -F "$1" >/dev/null; then
        set -- bash -c "$(declare -p PY OVR LAUNCH CFG QS DRY OUT); $(declare -f prefvec "$1"); \"\$@\"" \
            check "$@"
    fi
    timeout "$limit" "$@" >"$log" 2>&1
    rc=$?
    detail="$(grep '^RESULT:' "$log" | tail -n1 | cut -c9-)"
    [[ -n "$detail" ]] || detail="$(grep -E '^(train|eval) step|^reference log-probs' "$log" |
                                    tail -n1 | cut -c1-160)"
    if ((rc == 0)); then state=PASS; else
        state=FAIL; FAILED=$((FAILED + 1))
        ((rc == 124)) && detail="timed out after ${limit}s" ||
            detail="exit $rc: $(grep -v '^\s*$' "$log" | tail -n1 | cut -c1-160)"
    fi
    echo "CHECK $name $state $((SECONDS - t0))s $detail"
}
skip() { echo "CHECK $1 SKIP 0s $2"; }
prefvec() { "$PY" -m prefvec_ds.cli "$@"; }

QS="$OUT/qs"
DS_CONFIG="$REPO/ds_configs/zero3_gpu_bf16.json"
OVR=(run_dir="$QS" distributed.ds_config="$DS_CONFIG" distributed.nproc_per_node=1
     'data.preferences={helpful: {source: embedded, order_by: better_response_id, eval_fraction: 0.1}}'
     model.gradient_checkpointing=true data.embedded_size=400 sft.max_steps=2 sft.log_every=1
     dpo.max_steps=3 dpo.save_every=0 dpo.eval_every=2 dpo.log_every=1
     pipeline.eval.prompts=16 pipeline.eval.margin_pairs=16 'pipeline.eval.etas=[-1,0,1]'
     pipeline.eval.diagnostic_seeds=[])
CFG="$REPO/recipes/quickstart.yaml"

echo "gpu_check: out=$OUT dry_run=$DRY"
check versions 60 "$PY" - <<'EOF'
import importlib, shutil, subprocess, torch
mods = {}
for name in ("deepspeed", "transformers", "vllm"):
    try:
        mods[name] = importlib.import_module(name).__version__
    except Exception as err:  # noqa: BLE001 - reported, not fatal
        mods[name] = f"absent ({type(err).__name__})"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print("nvidia-smi:", subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
      if shutil.which("nvidia-smi") else "absent")
print(f"RESULT: torch {torch.__version__} cuda {torch.version.cuda} gpu {gpu} "
      + " ".join(f"{k} {v}" for k, v in mods.items()) + f" nvcc {shutil.which('nvcc')}")
EOF

# pyfile NAME: stdin -> $OUT/NAME.py (torchrun wants a file)
pyfile() { cat >"$OUT/$1.py"; echo "$OUT/$1.py"; }
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1)

check collectives 120 "${TORCHRUN[@]}" "$(pyfile collectives <<'EOF'
import torch
from prefvec_ds.distributed import collectives, group, model_build
group.init(seed=0)
import torch.distributed as tdist
out = collectives.all_reduce_sum({"a": 1.5, "b": 2.0})
assert out == {"a": 1.5, "b": 2.0}, out
assert collectives.from_rank0("tag") == "tag" and collectives.all_gather_objects(3) == [3]
group.barrier()
print(f"RESULT: backend {tdist.get_backend()} buffer on {collectives.collective_device()}")
group.shutdown()
EOF
)"

if ((DRY)); then
    skip fused_adam "dry run"
else
    (timeout 180 "$PY" -c "import time; t=time.time()
from deepspeed.ops.op_builder import FusedAdamBuilder as B; B().load()
print(f'RESULT: FusedAdam built/loaded in {time.time()-t:.0f} s')" >"$OUT/logs/fused_adam.log" 2>&1;
     echo "rc=$?" >>"$OUT/logs/fused_adam.log") &
    FUSED_PID=$!
fi

check sft 300 prefvec train sft "$CFG" "${OVR[@]}" "${LAUNCH[@]}"
check ref_logps 180 prefvec train ref-logps "$CFG" "${OVR[@]}" --preference helpful "${LAUNCH[@]}"
dpo_both() {
    for d in helpful+ helpful-; do
        prefvec train dpo "$CFG" "${OVR[@]}" --direction "$d" "${LAUNCH[@]}" || return 1
    done
    "$PY" - "$QS" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
parts = []
for d in ("helpful+", "helpful-"):
    done = json.loads((run / "dpo" / d / "done.json").read_text())
    rows = [json.loads(x) for x in (run / "dpo" / d / "metrics.jsonl").read_text().splitlines()]
    step0 = next(r for r in rows if r["step"] == 0 and "eval/rewards/margins" in r)
    parts.append(f"{d} peak_gpu_mb {done.get('peak_gpu_mb_per_rank')} step-0 margin "
                 f"{step0['eval/rewards/margins']:.1e}")
print("RESULT: " + "; ".join(parts) + " (R14: |margin| ~1e-2 expected in bf16)")
EOF
}
check dpo 420 dpo_both

check extract 180 "$PY" - "$QS" <<'EOF'
import subprocess, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint as gather
run = Path(sys.argv[1])
ck = {s: run / "dpo" / f"helpful{s}" / "ckpt" for s in "+-"}
files = sorted(p.name for p in next(ck["+"].glob("global_step*")).iterdir())
subprocess.run([sys.executable, "-m", "prefvec_ds.cli", "vector", "--plus", str(ck["+"]),
                "--minus", str(ck["-"]), "--out", str(run / "vectors" / "helpful"),
                "--overwrite"], check=True)
ours = {}
for f in (run / "vectors" / "helpful").glob("*.safetensors"):
    ours.update(load_file(f))
plus, minus = (gather(str(ck[s])) for s in "+-")
worst = max((ours[k].float() - (plus[k].float() - minus[k].float())).abs().max().item()
            for k in ours if k in plus)
assert worst <= 1e-6, worst
print(f"RESULT: {len(ours)} tensors, max |ours - DeepSpeed gather| {worst:.1e}; "
      f"ckpt files {','.join(f for f in files if f.endswith('.pt'))[:90]}")
EOF

merge_both() {
    for dt in fp32 bf16; do
        prefvec merge --base "$QS/sft/model" --vector "$QS/vectors/helpful=1" \
            --out "$QS/merged/$dt" --dtype "$dt" --overwrite || return 1
    done
    echo "RESULT: merged fp32 and bf16 from the extracted vector"
}
check merge 120 merge_both

# 2 layers with Llama-3.1-8B shapes (1.3B parameters) on GPU; tiny shapes on the dry run
if ((DRY)); then SHAPE="64 128 4 2 512"; else SHAPE="4096 14336 32 8 128256"; fi
check memprobe 240 "${TORCHRUN[@]}" "$(pyfile memprobe <<'EOF'
import json, sys, time
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from prefvec_ds.data.tokenize import TokenizedPair
from prefvec_ds.distributed import collectives, group, model_build
from prefvec_ds.train.logps import batch_logps, pair_collate, split_pair_logps
from prefvec_ds.train.losses import preference_loss

folder, (h, inter, heads, kv, vocab) = Path(sys.argv[1]), map(int, sys.argv[2:7])
info = group.init(seed=0)
cuda = torch.cuda.is_available()
if group.rank() == 0 and not (folder / "config.json").exists():
    cfg = LlamaConfig(hidden_size=h, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, num_hidden_layers=2,
                      max_position_embeddings=2048, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
group.barrier()
ds = json.loads(Path("ds_configs/zero3_gpu_bf16.json").read_text())
ds.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1, train_batch_size=4)
ds["optimizer"]["params"].update(lr=1e-6, weight_decay=0.0)
engine = model_build.build_engine(folder, ds, train=True, lr_lambda=lambda s: 1.0,
                           gradient_checkpointing=True)
g = torch.Generator().manual_seed(0)
ids = lambda n: tuple(torch.randint(5, vocab, (n,), generator=g).tolist())
pairs = [TokenizedPair(ids(256), ids(256), ids(256), str(i)) for i in range(4)]
mem = lambda: torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
marks = {}
for step in range(3):
    if cuda:  # per-step peaks: max_memory_allocated is otherwise the max since start
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    logps, _ = batch_logps(engine, pair_collate(engine, True)(pairs, 0))
    c, r = split_pair_logps(logps.float())
    loss, _ = preference_loss(c, r, torch.zeros_like(c), torch.zeros_like(r), 0.1)
    marks["forward"] = mem()
    engine.backward(loss)
    marks["backward"] = mem()
    engine.step()
    marks["step"] = mem()
    if cuda:
        torch.cuda.synchronize()
    dt = time.time() - t0
n = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
print(f"RESULT: {n / 1e6:.1f}M params, peak GiB " + " ".join(f"{k} {v:.2f}" for k, v in marks.items())
      + f", {dt:.2f} s/step (4 pairs x 768 tokens)")
group.shutdown()
EOF
)" "$OUT/probe" $SHAPE

sweep_checks() {
    prefvec sweep "$CFG" "${OVR[@]}" pipeline.eval.generation.backend=transformers \
        --vector "helpful=$QS/vectors/helpful" --out "$QS/eval-transformers" --no-diagnostics \
        --no-merged || return 1
    if "$PY" -c "import vllm" 2>/dev/null && ((!DRY)); then
        prefvec sweep "$CFG" "${OVR[@]}" pipeline.eval.generation.backend=vllm \
            'pipeline.merges=[{name: fp32, eta: {helpful: 1}}]' \
            --vector "helpful=$QS/vectors/helpful" --out "$QS/eval-vllm" --no-diagnostics || return 1
        echo "RESULT: transformers and vLLM sweeps done"
    else
        echo "RESULT: transformers sweep done (vLLM not installed or dry run)"
    fi
}
check sweep 240 sweep_checks

if ((!DRY)); then
    wait "$FUSED_PID" 2>/dev/null
    echo "CHECK fused_adam INFO $(grep -E '^(RESULT|rc=)' "$OUT/logs/fused_adam.log" | tr '\n' ' ')"
fi
echo "gpu_check: $FAILED failed; logs in $OUT/logs"
exit "$FAILED"
