"""Gather: the shards' records merged in pool order, then the DPO pairs, the mixed preference
sets, the summary, the figures and `done.json` (last: it marks the stage finished).

Deterministic: the same records give byte-identical files whatever the shard layout was.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefvec_ds import PrefvecError
from prefvec_ds.atomic import write_json_atomic
from prefvec_ds.config.schema import PreferenceConfig, RunConfig
from prefvec_ds.mora import pairs_io
from prefvec_ds.mora.mining import load_pool
from prefvec_ds.mora.report import format_summary, summarize

DONE_FILE = "done.json"


def merged_records(cfg: RunConfig, out: Path) -> list[dict]:
    """Every pool prompt's record, in pool order; an error when a prompt has none yet."""
    pool = load_pool(cfg)
    found = pairs_io.all_records(out)
    missing = [p.id for p in pool if p.id not in found]
    if missing:
        raise PrefvecError(f"{out}: {len(missing)} of {len(pool)} prompts have no record yet "
                           f"(ids {missing[:5]}...): run the shards again, they resume")
    records = [found[p.id] for p in pool]
    for p, rec in zip(pool, records):
        if rec["prompt"] != pairs_io.prompt_field(p.prompt):
            raise PrefvecError(f"{out}: the record of pool prompt {p.id} is for another prompt "
                               "(the pool changed?): rerun with --restart")
    return records


def pair_rows(records: list[dict]) -> list[dict]:
    """The DPO pairs: the rewritten prompt, chosen, rejected, and where they came from."""
    rows = []
    for rec in records:
        pair = rec["pair"]
        if not pair:
            continue
        prompt = rec["prompt"]
        rewritten = (rec["rewrite"] if isinstance(prompt, str)
                     else [*prompt[:-1], {"role": "user", "content": rec["rewrite"]}])
        rows.append({"prompt": rewritten, "chosen": pair["chosen"],
                     "rejected": pair["rejected"], "original_prompt": prompt, "id": rec["id"],
                     "margin": pair["margin"], "chosen_scores": pair["chosen_scores"],
                     "rejected_scores": pair["rejected_scores"], "origin": "mora"})
    return rows


def mixed_rows(cfg: RunConfig, sources: list[dict], mora_rows: list[dict]) -> list[dict]:
    """Pairs of the base sources (in their + orientation) followed by the MORA pairs."""
    from prefvec_ds.data.sources import load_preference  # noqa: PLC0415

    rows = []
    for k, src in enumerate(sources):
        for pair in load_preference(f"mix[{k}]", PreferenceConfig(**src), cfg.data):
            rows.append({"prompt": pairs_io.prompt_field(pair.prompt), "chosen": pair.chosen,
                         "rejected": pair.rejected, "origin": pair.origin})
    return rows + [{k: r[k] for k in ("prompt", "chosen", "rejected", "origin")}
                   for r in mora_rows]


def gather(cfg: RunConfig) -> dict:
    """Merge the shards and write every output of the stage; returns the summary."""
    from prefvec_ds.mora.plots import write_plots  # noqa: PLC0415
    from prefvec_ds.mora.stage import out_dir  # noqa: PLC0415

    t0 = time.time()
    mora = cfg.pipeline.mora
    out = out_dir(cfg)
    records = merged_records(cfg, out)
    pairs_io.write_jsonl_atomic(out / "records.jsonl", records)
    rows = pair_rows(records)
    pairs_io.write_jsonl_atomic(out / "pairs.jsonl", rows)
    mixed = {name: pairs_io.write_jsonl_atomic(out / "mixed" / f"{name}.jsonl",
                                               mixed_rows(cfg, sources, rows))
             for name, sources in mora.mix_into.items()}
    summary = summarize(records, mora)
    summary["mixed"] = mixed
    summary["plots"] = (write_plots(summary, list(mora.dimensions), out / "plots")
                        if mora.plots else "pipeline.mora.plots is false")
    write_json_atomic(out / "summary.json", summary)
    print(format_summary(summary), flush=True)
    write_json_atomic(out / DONE_FILE, {"finished_at": time.time(), "pairs": len(rows),
                                        "seconds": round(time.time() - t0, 2)})
    return summary
