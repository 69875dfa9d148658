"""How much of eta * phi survives a merged model written in bf16 (review finding R9).

    python benchmarks/bf16_merge.py --base BASE_DIR --vector helpful=VECTOR_DIR \
        [--config RUN.yaml --pairs 64] [--markdown docs/bf16_merge.md]

DPO moves weights by about the bf16 spacing of typical weights, so rounding base + eta * phi to
bf16 can round away much of eta * phi. For each eta (and each scale s of phi, to see what a
longer run's larger phi would keep) this measures, over every tensor of the vector(s):
  d = round(base + s * eta * phi) - round(base)   (the change the rounded merged model carries)
  e = s * eta * phi                              (the change asked for, fp32)
  kept     = d.e / e.e                           (share of eta * phi along e that survives)
  rel_err  = norm(d - e) / norm(e)               (relative error of the change)
  lost     = share of elements with e != 0 and d == 0 (the change rounded away entirely)
for round = bf16, fp16 and fp32 outputs, plus the median |phi| and the median half-spacing of
bf16 at the base weights. With --config, the held-out log-prob margins of the config's
preferences (what the sweep reports) are measured for the fp32 merge and for the same merge
rounded to bf16 (both computed in fp32), at each eta.

--markdown writes the tables with the date, versions and this command line (docs/bf16_merge.md
is generated this way; never edit its figures by hand).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROUNDINGS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_tensors(folder: Path, dtypes: set | None = None) -> dict[str, torch.Tensor]:
    """A safetensors folder (`prefvec vector` output or a HF model) as fp32 tensors (a 135M
    model is ~0.5 GB: fine here); the stored dtypes are added to `dtypes`."""
    from safetensors import safe_open

    from prefvec_ds.models.hf import safetensors_index

    out = {}
    for name, file in safetensors_index(folder).items():
        with safe_open(folder / file, framework="pt") as fh:
            t = fh.get_tensor(name)
        if dtypes is not None:
            dtypes.add(str(t.dtype).removeprefix("torch."))
        out[name] = t.float()
    return out


def half_spacing_bf16(w: torch.Tensor) -> torch.Tensor:
    """Half the distance from w's bf16 value to the next one away from zero: a change smaller
    than this (in that direction) rounds back to the same bf16 value."""
    b = w.to(torch.bfloat16)
    # bf16 is sign-magnitude: +1 on the 16-bit pattern is the next value away from zero
    up = (b.view(torch.int16) + 1).view(torch.bfloat16)
    return (up.float() - b.float()).abs() / 2


def survival(base: dict[str, torch.Tensor], phi: dict[str, torch.Tensor], eta: float,
             scale: float) -> dict[str, dict[str, float]]:
    """kept / rel_err / lost per output rounding, over every tensor of phi."""
    acc = {r: {"ee": 0.0, "de": 0.0, "dd_err": 0.0, "lost": 0, "n": 0} for r in ROUNDINGS}
    for name, p in phi.items():
        w = base[name]
        e = p * (eta * scale)
        for r, dtype in ROUNDINGS.items():
            d = (w + e).to(dtype).float() - w.to(dtype).float()
            a = acc[r]
            a["ee"] += float((e.double() ** 2).sum())
            a["de"] += float((d.double() * e.double()).sum())
            a["dd_err"] += float(((d - e).double() ** 2).sum())
            nz = e != 0
            a["lost"] += int((nz & (d == 0)).sum())
            a["n"] += int(nz.sum())
    return {r: {"kept": a["de"] / a["ee"], "rel_err": (a["dd_err"] / a["ee"]) ** 0.5,
                "lost": a["lost"] / max(a["n"], 1)} for r, a in acc.items()}


def magnitudes(base, phi) -> dict[str, float]:
    """Medians over a sample of elements: |phi|, bf16 half-spacing at the base weights."""
    gen = torch.Generator().manual_seed(0)
    ps, hs = [], []
    for name, p in phi.items():
        flat_p, flat_w = p.reshape(-1), base[name].reshape(-1)
        idx = torch.randint(0, flat_p.numel(), (min(20000, flat_p.numel()),), generator=gen)
        ps.append(flat_p[idx].abs())
        hs.append(half_spacing_bf16(flat_w[idx]))
    ps, hs = torch.cat(ps), torch.cat(hs)
    return {"median_abs_phi": float(ps.median()), "median_half_spacing": float(hs.median()),
            "share_phi_below_half_spacing": float((ps < hs).float().mean())}


def margins_at(model, base, phis, eta, sets, pad_id, rounding) -> dict[str, float]:
    """Mean held-out margin per preference with every phi at eta, weights rounded or not."""
    from prefvec_ds.eval.margins import measure

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in base.items():
            if name not in params:
                continue
            new = w.clone()
            for phi in phis.values():
                if name in phi:
                    new += eta * phi[name]
            params[name].copy_(new.to(ROUNDINGS[rounding]).float())
    out = measure(model, sets, pad_id)
    return {p: m["margin"] for p, m in out.items()}


def table(rows: list[list[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, type=Path, help="theta_base HF folder")
    ap.add_argument("--vector", action="append", required=True,
                    help="NAME=DIR of a `prefvec vector` output (repeatable)")
    ap.add_argument("--etas", default="-1,-0.5,0.5,1")
    ap.add_argument("--scales", default="1,3,10",
                    help="phi multipliers: what a longer run's larger phi would keep")
    ap.add_argument("--config", help="run config whose held-out pairs give the margins")
    ap.add_argument("--pairs", type=int, default=64, help="held-out pairs per preference")
    ap.add_argument("--eval-fraction", type=float, default=None,
                    help="override every preference's eval_fraction for the margins (more "
                         "pairs; they may include pairs DPO trained on, which is fine for "
                         "comparing the fp32 and bf16 versions of one merge)")
    ap.add_argument("--markdown", type=Path, help="write the report here")
    ap.add_argument("--note", default="", help="a line on where the vectors came from")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    etas = [float(x) for x in args.etas.split(",")]
    scales = [float(x) for x in args.scales.split(",")]
    phis = {spec.split("=", 1)[0]: load_tensors(Path(spec.split("=", 1)[1]))
            for spec in args.vector}
    stored: set[str] = set()
    base_all = load_tensors(args.base, stored)
    names = sorted(set().union(*phis.values()))
    base = {n: base_all[n] for n in names if n in base_all}
    lines = [f"# bf16 merge precision (generated by benchmarks/bf16_merge.py)", "",
             f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
             f"torch {torch.__version__}, python {platform.python_version()}.", "",
             "Command: `python " + " ".join(shlex.quote(a) for a in sys.argv) + "`", ""]
    if args.note:
        lines += [args.note, ""]
    lines += [f"Base: `{args.base}` ({len(base)} tensors read as fp32)."]
    for pname, phi in phis.items():
        phi = {n: t for n, t in phi.items() if n in base}
        mag = magnitudes(base, phi)
        lines += ["", f"## Vector `{pname}`", "",
                  f"median |phi| = {mag['median_abs_phi']:.3g}; median bf16 half-spacing at the "
                  f"base weights = {mag['median_half_spacing']:.3g}; elements with |phi| below "
                  f"it: {100 * mag['share_phi_below_half_spacing']:.1f}%", ""]
        rows = [["scale s", "eta", "output", "kept: d.e / e.e", "rel. error: norm(d-e) / norm(e)",
                 "elements rounded away"]]
        for s in scales:
            for eta in etas:
                res = survival(base, phi, eta, s)
                for r in ROUNDINGS:
                    x = res[r]
                    rows.append([f"{s:g}", f"{eta:g}", r, f"{100 * x['kept']:.1f}%",
                                 f"{x['rel_err']:.3f}", f"{100 * x['lost']:.1f}%"])
        lines.append(table(rows))
    if args.config:
        from transformers import AutoModelForCausalLM

        from prefvec_ds.config.loader import load_config
        from prefvec_ds.eval.margins import held_out_pairs
        from prefvec_ds.train.stage import load_tokenizer

        cfg = load_config(args.config)
        if args.eval_fraction is not None:
            for pref in cfg.data.preferences.values():
                pref.eval_fraction = args.eval_fraction
        tok = load_tokenizer(args.base)
        sets = held_out_pairs(cfg, tok, args.pairs)
        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
        base_m = margins_at(model, base_all, {}, 0.0, sets, tok.pad_token_id, "fp32")
        rows = [["eta (every vector)", "preference", "margin fp32 merge",
                 "margin bf16-rounded merge", "shift kept by bf16"]]
        for eta in etas:
            m32 = margins_at(model, base_all, phis, eta, sets, tok.pad_token_id, "fp32")
            m16 = margins_at(model, base_all, phis, eta, sets, tok.pad_token_id, "bf16")
            for p in m32:
                shift = m32[p] - base_m[p]
                kept = (m16[p] - base_m[p]) / shift if shift else float("nan")
                rows.append([f"{eta:g}", p, f"{m32[p]:.4f}", f"{m16[p]:.4f}",
                             f"{100 * kept:.0f}%"])
        n = ", ".join(f"{s.preference}: {len(s.pairs)}" for s in sets)
        split = (f"eval_fraction {args.eval_fraction:g}: may include pairs DPO trained on"
                 if args.eval_fraction is not None else "the config's held-out split")
        lines += ["", "## Preference margins (what the sweep reports)", "",
                  f"Mean log p(chosen) - log p(rejected) over pairs ({n}; {split}), computed in "
                  f"fp32; theta_base: " + ", ".join(f"{p} {v:.4f}" for p, v in base_m.items())
                  + ". 'shift kept' = (bf16 margin - base) / (fp32 margin - base).", "",
                  table(rows)]
    lines += ["", f"({time.time() - t0:.0f} s; base stored as {', '.join(sorted(stored))})", ""]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
