"""Check: `prefvec merge --method` against mergekit's own implementation, on HF folders.

    python benchmarks/merge_methods_check.py [--workdir DIR] [--results docs/results/merge_methods.md]

Builds a tiny Llama (seeded random init) as the base and two "fine-tuned" variants (base plus
seeded noise of different scales per tensor), then merges them with mergekit (pinned, installed
once into its own venv on this interpreter's torch, like the extractor benchmark's) and with
prefvec, same method, weights and knobs, and prints the largest absolute difference over every
tensor. dare is compared at density 1 only: both draw their drops from different generators
(docs/merge-methods.md says how they differ); its drop itself is tested in
tests/unit/test_merge_methods.py. Exit status 1 when a case is outside the tolerance.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_page  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MERGEKIT_PIN = "mergekit==0.1.5"
VENV = Path(os.environ.get("PREFVEC_MERGEKIT_VENV",
                           Path.home() / ".cache" / "prefvec-ds" / "mergekit-venv"))
TOLERANCE = 1e-6  # fp32 sums in another order: a few ulps of values ~1
# (name, prefvec method, mergekit method, knobs, weights)
CASES = [
    ("task_arithmetic", "task_arithmetic", "task_arithmetic", {}, (1.0, 0.5)),
    ("ties d=0.2 normalize", "ties", "ties", {"density": 0.2}, (1.0, 0.5)),
    ("ties d=0.5 no normalize", "ties", "ties", {"density": 0.5, "normalize": False},
     (1.0, -0.7)),
    ("dare_linear d=1", "dare", "dare_linear", {"density": 1.0}, (1.0, 0.5)),
    ("dare_ties d=1", "dare_ties", "dare_ties", {"density": 1.0}, (0.6, 0.8)),
]


def mergekit_yaml() -> Path:
    exe = VENV / "bin" / "mergekit-yaml"
    if not exe.exists():
        torch_pin = f"torch=={torch.__version__.split('+')[0]}"
        print(f"installing {MERGEKIT_PIN} into {VENV} (once), with {torch_pin}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)],
                       check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", MERGEKIT_PIN, torch_pin],
                       check=True)
    return exe


def build_models(work: Path) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg).float()
    folders = {}
    for seed, (name, scale) in enumerate((("base", 0.0), ("a", 0.02), ("b", 0.05))):
        model = LlamaForCausalLM(cfg).float()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for (_, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
                p.copy_(q + scale * torch.randn(q.shape, generator=g) * q.std().clamp(min=1e-3))
        folders[name] = work / name
        model.save_pretrained(folders[name])
    return folders


def run_mergekit(exe: Path, folders: dict, work: Path, case) -> Path:
    name, _, method, knobs, weights = case
    tag = name.replace(" ", "_").replace("=", "")
    lines = [f"merge_method: {method}", f"base_model: {folders['base']}", "dtype: float32"]
    if "normalize" in knobs:
        lines.append(f"parameters: {{normalize: {str(knobs['normalize']).lower()}}}")
    lines.append("models:")
    for model, w in zip(("a", "b"), weights):
        params = f"weight: {w}" + (f", density: {knobs['density']}" if "density" in knobs else "")
        lines += [f"  - model: {folders[model]}", f"    parameters: {{{params}}}"]
    cfg = work / f"{tag}.yml"
    cfg.write_text("\n".join(lines) + "\n")
    out = work / f"mergekit_{tag}"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([str(exe), str(cfg), str(out), "--no-copy-tokenizer"], check=True,
                   capture_output=True)
    return out


def run_prefvec(folders: dict, work: Path, case) -> Path:
    from prefvec_ds.ckpt.merge import merge_vectors
    from prefvec_ds.ckpt.methods import MERGE_METHODS, MethodParams
    from prefvec_ds.ckpt.sources import open_vector_arg

    name, method, _, knobs, weights = case
    out = work / f"prefvec_{name.replace(' ', '_').replace('=', '')}"
    params = MethodParams(density=knobs.get("density", 1.0),
                          normalize=knobs.get("normalize", MERGE_METHODS[method].normalize_default))
    vectors = [(open_vector_arg(f"{folders[m]},{folders['base']}"), w)
               for m, w in zip(("a", "b"), weights)]
    merge_vectors(folders["base"], vectors, out, method=method, params=params, overwrite=True)
    return out


def largest_difference(a: Path, b: Path) -> tuple[float, int]:
    from safetensors.torch import load_file

    def read(folder):
        sd = {}
        for f in sorted(folder.glob("*.safetensors")):
            sd.update(load_file(f))
        return sd

    x, y = read(a), read(b)
    if set(x) != set(y):
        raise SystemExit(f"tensor names differ: {sorted(set(x) ^ set(y))[:5]}")
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x), len(x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/prefvec-merge-methods"))
    ap.add_argument("--results", type=Path, help="also write a results page (markdown) here")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    exe = mergekit_yaml()
    bad = 0
    with results_page.recording(args.results, "Merge methods: prefvec against mergekit"):
        folders = build_models(args.workdir)
        print(f"tiny Llama (hidden 128, 2 layers, vocab 512, untied) and two variants; "
              f"{MERGEKIT_PIN}; tolerance {TOLERANCE:g} (max |difference| over every tensor)")
        for case in CASES:
            t0 = time.perf_counter()
            ours = run_prefvec(folders, args.workdir, case)
            t1 = time.perf_counter()
            theirs = run_mergekit(exe, folders, args.workdir, case)
            diff, n = largest_difference(ours, theirs)
            moved, _ = largest_difference(ours, folders["base"])
            ok = diff <= TOLERANCE
            bad += not ok
            print(f"{case[0]:<24} weights {case[4]}: {n} tensors, max |prefvec - base| "
                  f"{moved:.2e}, max |prefvec - mergekit| {diff:.2e} "
                  f"{'OK' if ok else 'OUTSIDE TOLERANCE'} (prefvec {t1 - t0:.2f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
