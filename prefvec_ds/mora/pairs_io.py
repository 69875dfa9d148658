"""MORA files: per-shard record logs (append, flush per prompt, torn tail discarded), the merged
records, the DPO pairs the data layer reads (`source: mora`: prefvec_ds.data.sources.read_pairs),
and mixed preference sets.

    <run_dir>/mora/shards/shard-00001-of-00004.jsonl   one JSON record per finished prompt
    <run_dir>/mora/records.jsonl                        every prompt, sorted by pool id (gather)
    <run_dir>/mora/pairs.jsonl                          {prompt, chosen, rejected, original_prompt,
                                                        id, margin, chosen_scores, rejected_scores}
    <run_dir>/mora/mixed/<name>.jsonl                   base pairs + MORA pairs (mix_into)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from prefvec_ds import PrefvecError
from prefvec_ds.atomic import write_text_atomic
from prefvec_ds.data.pairs import Messages


def shard_path(out: Path, shard: int, num_shards: int) -> Path:
    return Path(out) / "shards" / f"shard-{shard:05d}-of-{num_shards:05d}.jsonl"


def read_log(path: Path) -> tuple[list[dict], int]:
    """(records, byte length of the valid part). A last line without its newline is a write
    cut short by a kill: it is not a record and is cut off before the next append."""
    data = Path(path).read_bytes() if Path(path).is_file() else b""
    records, good = [], 0
    for n, line in enumerate(data.splitlines(keepends=True), 1):
        if not line.endswith(b"\n"):
            break  # torn tail
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise PrefvecError(f"{path}:{n}: not a JSON record (the file was edited?); delete "
                               "the shard file to recompute its prompts") from None
        good += len(line)
    return records, good


class ShardLog:
    """Append-only record log of one shard: one line per prompt, flushed and fsynced, so a kill
    loses at most the prompt being written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _, good = read_log(self.path)
        self.fh = open(self.path, "ab")
        self.fh.truncate(good)  # drop a torn tail before appending

    def append(self, record: dict) -> None:
        self.fh.write((json.dumps(record, sort_keys=True) + "\n").encode())
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def all_records(out: Path) -> dict[int, dict]:
    """Every finished prompt of every shard file (any layout), by pool id."""
    found: dict[int, dict] = {}
    for path in sorted((Path(out) / "shards").glob("shard-*.jsonl")):
        for rec in read_log(path)[0]:
            found.setdefault(rec["id"], rec)
    return found


def prompt_field(prompt: Messages):
    """A single user turn as a string, a conversation as a list of messages."""
    if len(prompt) == 1 and prompt[0][0] == "user":
        return prompt[0][1]
    return [{"role": r, "content": c} for r, c in prompt]


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> int:
    rows = list(rows)
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return len(rows)
