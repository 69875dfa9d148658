"""Adapters from on-disk (or hub) preference data to canonical PreferencePairs.

- PKU-SafeRLHF schema: prompt, response_0, response_1, better_response_id, safer_response_id,
  is_response_0_safe, is_response_1_safe. A preference orders each pair by one `*_response_id`
  column (helpful: better_response_id, harmless: safer_response_id).
- HH-RLHF: {"chosen", "rejected"} full dialogues; split into the shared multi-turn prompt and the
  two final assistant responses.
- generic jsonl: {prompt, chosen, rejected}.
- embedded: the generated world of prefvec_ds.data.embedded, in PKU schema.
- mora: pairs written by the MORA stage (prefvec_ds.mora), {prompt, chosen, rejected, ...}.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from prefvec_ds import PrefvecError
from prefvec_ds.config.schema import DataConfig, PreferenceConfig
from prefvec_ds.data import embedded
from prefvec_ds.data.pairs import Messages, PreferencePair, user_prompt

PKU_COLUMNS = ("prompt", "response_0", "response_1")
EMBEDDED_MULTI_INTENT = "embedded-multi-intent"


def read_rows(path: str, split: str = "train") -> list[dict]:
    """Rows of a local .json / .jsonl[.gz] / .parquet file, else of a `datasets` hub name."""
    p = Path(path)
    if p.is_file():
        name = p.name.lower()
        try:
            if name.endswith((".jsonl", ".jsonl.gz")):
                opener = gzip.open if name.endswith(".gz") else open
                with opener(p, "rt", encoding="utf-8") as fh:
                    return [json.loads(line) for line in fh if line.strip()]
            if name.endswith((".json", ".json.gz")):
                opener = gzip.open if name.endswith(".gz") else open
                with opener(p, "rt", encoding="utf-8") as fh:
                    data = json.load(fh)
                return data if isinstance(data, list) else data.get("data", data.get("rows", []))
            if name.endswith(".parquet"):
                import pyarrow.parquet as pq  # noqa: PLC0415

                return pq.read_table(p).to_pylist()
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
            raise PrefvecError(f"data file {p}: cannot be parsed ({err})") from None
        raise PrefvecError(f"data file {p}: expected .json, .jsonl, .jsonl.gz or .parquet")
    if p.suffix or "/" not in path or path.startswith((".", "/")):
        raise PrefvecError(f"data file {path} does not exist")
    try:
        import datasets  # noqa: PLC0415

        return list(datasets.load_dataset(path, split=split))
    except Exception as err:  # noqa: BLE001 - hub failures come in many types
        raise PrefvecError(f"data set {path!r} (split {split}): not a local file and could not "
                           f"be loaded from the hub ({type(err).__name__}: {err})") from None


def _require(row: dict, columns, where: str) -> None:
    missing = [c for c in columns if c not in row]
    if missing:
        raise PrefvecError(f"{where}: missing column(s) {', '.join(missing)}; "
                           f"the row has {', '.join(sorted(row))}")


def pku_pairs(rows: list[dict], order_by: str, where: str) -> list[PreferencePair]:
    """Order each PKU-schema row by `order_by` (0 or 1 = index of the preferred response)."""
    out = []
    for i, row in enumerate(rows):
        loc = f"{where}:{i}"
        _require(row, PKU_COLUMNS + (order_by,), loc)
        idx = row[order_by]
        if idx not in (0, 1):
            raise PrefvecError(f"{loc}: column {order_by} must be 0 or 1, got {idx!r}")
        chosen, rejected = row[f"response_{idx}"], row[f"response_{1 - idx}"]
        labels = [row.get(f"is_response_{i}_safe") for i in (idx, 1 - idx)]
        safe = [None if label is None else bool(label) for label in labels]
        out.append(PreferencePair(user_prompt(row["prompt"]), chosen, rejected, loc, *safe))
    return out


HH_TURN = {"\n\nHuman:": "user", "\n\nAssistant:": "assistant"}


def parse_hh_dialogue(text: str) -> list[tuple[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [('user', 'a'), ('assistant', 'b')]."""
    turns: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        starts = [(text.find(m, pos), m) for m in HH_TURN if text.find(m, pos) >= 0]
        if not starts:
            break
        start, marker = min(starts)
        if turns:  # text before this marker belongs to the previous turn
            role, content = turns[-1]
            turns[-1] = (role, content + text[pos:start])
        turns.append((HH_TURN[marker], ""))
        pos = start + len(marker)
    if turns:
        role, content = turns[-1]
        turns[-1] = (role, content + text[pos:])
    return [(r, c.strip()) for r, c in turns]


def hh_pairs(rows: list[dict], where: str) -> tuple[list[PreferencePair], int]:
    """Shared prompt (all turns but the last) + the two final assistant responses.

    Returns the pairs and how many rows were skipped because chosen and rejected do not share
    the same prompt or do not end with an assistant turn.
    """
    out, skipped = [], 0
    for i, row in enumerate(rows):
        loc = f"{where}:{i}"
        _require(row, ("chosen", "rejected"), loc)
        chosen, rejected = parse_hh_dialogue(row["chosen"]), parse_hh_dialogue(row["rejected"])
        if (len(chosen) < 2 or chosen[-1][0] != "assistant" or rejected[-1][0] != "assistant"
                or chosen[:-1] != rejected[:-1]):
            skipped += 1
            continue
        prompt: Messages = tuple(chosen[:-1])
        out.append(PreferencePair(prompt, chosen[-1][1], rejected[-1][1], loc))
    return out, skipped


def jsonl_pairs(rows: list[dict], where: str) -> list[PreferencePair]:
    out = []
    for i, row in enumerate(rows):
        loc = f"{where}:{i}"
        _require(row, ("prompt", "chosen", "rejected"), loc)
        prompt = row["prompt"]
        msgs = (tuple((m["role"], m["content"]) for m in prompt) if isinstance(prompt, list)
                else user_prompt(prompt))
        out.append(PreferencePair(msgs, row["chosen"], row["rejected"], loc))
    return out


def load_preference(name: str, pref: PreferenceConfig, data: DataConfig) -> list[PreferencePair]:
    """The + orientation pairs of one configured preference, before tokenization."""
    if pref.source == "embedded":
        rows = embedded.preference_rows(data.embedded_size, data.embedded_seed)
        pairs = pku_pairs(rows, pref.order_by, f"embedded[{name}]")
    elif pref.source == "mora":
        from prefvec_ds.mora.pairs_io import read_pairs  # noqa: PLC0415

        pairs = read_pairs(pref.path, name)
    else:
        rows = read_rows(pref.path, pref.split)
        if pref.source == "pku_saferlhf":
            pairs = pku_pairs(rows, pref.order_by, pref.path)
        elif pref.source == "hh_rlhf":
            pairs, _ = hh_pairs(rows, pref.path)
        else:
            pairs = jsonl_pairs(rows, pref.path)
    if pref.max_pairs:
        pairs = pairs[: pref.max_pairs]
    if not pairs:
        raise PrefvecError(f"preference {name}: no pairs in {pref.path or 'embedded data'}")
    return pairs


def load_sft_examples(data: DataConfig) -> list[tuple[Messages, str]]:
    """(prompt messages, response) rows for SFT: embedded, or a file of {prompt, response},
    {messages: [...]} (chat, ending with the assistant turn) or Alpaca {instruction, input,
    output} rows."""
    if data.sft_source == "embedded":
        return [(user_prompt(r["prompt"]), r["response"])
                for r in embedded.sft_examples(data.embedded_size, data.embedded_seed)]
    if data.sft_source == EMBEDDED_MULTI_INTENT:  # opt-in: also fused prompts (MORA)
        return [(user_prompt(r["prompt"]), r["response"]) for r in
                embedded.sft_examples_multi_intent(data.embedded_size, data.embedded_seed)]
    out = []
    for i, row in enumerate(read_rows(data.sft_source)):
        loc = f"{data.sft_source}:{i}"
        if "instruction" in row and "output" in row:  # Alpaca: instruction, input, output
            prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
            out.append((user_prompt(prompt), row["output"]))
        elif "messages" in row:
            msgs = [(m["role"], m["content"]) for m in row["messages"]]
            if not msgs or msgs[-1][0] != "assistant":
                raise PrefvecError(f"{loc}: messages must end with an assistant turn")
            out.append((tuple(msgs[:-1]), msgs[-1][1]))
        else:
            _require(row, ("prompt", "response"), loc)
            out.append((user_prompt(row["prompt"]), row["response"]))
    if not out:
        raise PrefvecError(f"SFT data {data.sft_source}: no examples")
    return out
