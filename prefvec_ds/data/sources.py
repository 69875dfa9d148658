"""Adapters from on-disk (or hub) preference data to canonical PreferencePairs.

- PKU-SafeRLHF schema: prompt, response_0, response_1, better_response_id, safer_response_id,
  is_response_0_safe, is_response_1_safe. A preference orders each pair by one `*_response_id`
  column (helpful: better_response_id, harmless: safer_response_id).
- HH-RLHF: {"chosen", "rejected"} full dialogues; split into the shared multi-turn prompt and the
  two final assistant responses.
- safety pairs: {prompt, response: [safer, worse]} (PKU-SafeRLHF-derived).
- generic jsonl: {prompt, chosen, rejected}.
- embedded: the generated world of prefvec_ds.data.embedded, in PKU schema.
- mora: pairs written by the MORA stage (prefvec_ds.mora), {prompt, chosen, rejected, ...};
  a `{run_dir}` in their path is filled in by expand_preference_paths.

PREFERENCE_LOADERS is the table of sources: a new source is its reader there plus its name in
prefvec_ds.config.choices.PreferenceSource.
"""

from __future__ import annotations

import gzip
import json
from itertools import zip_longest
from pathlib import Path
from typing import Callable

from prefvec_ds import PrefvecError
from prefvec_ds.config.choices import PreferenceSource
from prefvec_ds.config.schema import DataConfig, PreferenceConfig
from prefvec_ds.data import embedded
from prefvec_ds.data.pairs import Messages, PreferencePair, user_prompt

PKU_COLUMNS = ("prompt", "response_0", "response_1")
EMBEDDED_MULTI_INTENT = "embedded-multi-intent"


class Rows(list):
    """Rows of a data file; `lines[i]` is row i's 1-based line in a .jsonl file (None for other
    formats), so errors name the line a user sees in an editor."""

    lines: list[int] | None = None

    def where(self, i: int, source: str) -> str:
        """`file:LINE` (jsonl) or `file: row N` (1-based) for row i."""
        if self.lines is not None:
            return f"{source}:{self.lines[i]}"
        return f"{source}: row {i + 1}"


def row_location(rows, i: int, source: str) -> str:
    return rows.where(i, source) if isinstance(rows, Rows) else f"{source}: row {i + 1}"


def _read_jsonl(p: Path, opener) -> Rows:
    rows, lines = Rows(), []
    with opener(p, "rt", encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise PrefvecError(f"data file {p}, line {number}: not valid JSON ({err.msg} at "
                                   f"column {err.colno})") from None
            lines.append(number)
    rows.lines = lines
    return rows


def read_rows(path: str, split: str = "train") -> list[dict]:
    """Rows of a local .json / .jsonl[.gz] / .parquet file, else of a `datasets` hub name."""
    p = Path(path)
    if p.is_file():
        name = p.name.lower()
        try:
            if name.endswith((".jsonl", ".jsonl.gz")):
                return _read_jsonl(p, gzip.open if name.endswith(".gz") else open)
            if name.endswith((".json", ".json.gz")):
                opener = gzip.open if name.endswith(".gz") else open
                with opener(p, "rt", encoding="utf-8") as fh:
                    data = json.load(fh)
                if isinstance(data, dict):
                    data = data.get("data", data.get("rows", []))
                if not isinstance(data, list):
                    raise PrefvecError(f"data file {p}: expected a list of rows (or "
                                       f"{{\"data\": [...]}}), found a {type(data).__name__}")
                return Rows(data)
            if name.endswith(".parquet"):
                import pyarrow.parquet as pq  # noqa: PLC0415

                return Rows(pq.read_table(p).to_pylist())
        except json.JSONDecodeError as err:  # lineno and colno are 1-based
            raise PrefvecError(f"data file {p}, line {err.lineno}: not valid JSON ({err.msg} at "
                               f"column {err.colno})") from None
        except (UnicodeDecodeError, OSError, EOFError) as err:
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


def _require(row: dict, columns, where: str, text: tuple = ()) -> None:
    """The row is a mapping with `columns`; those in `text` hold strings."""
    if not isinstance(row, dict):
        raise PrefvecError(f"{where}: expected a row object {{...}}, found a "
                           f"{type(row).__name__}")
    missing = [c for c in columns if c not in row]
    if missing:
        raise PrefvecError(f"{where}: missing column(s) {', '.join(missing)}; "
                           f"the row has {', '.join(sorted(map(str, row)))}")
    for column in text:
        if not isinstance(row[column], str):
            raise PrefvecError(f"{where}: column {column}: expected a string, found "
                               f"{type(row[column]).__name__} {row[column]!r:.60}")


def _messages(prompt, where: str):
    """A prompt given as a list of {role, content} messages, checked."""
    if not prompt or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                             and isinstance(m.get("content"), str) for m in prompt):
        raise PrefvecError(f"{where}: column prompt: expected a string or a non-empty list of "
                           "{\"role\": str, \"content\": str} messages")
    return tuple((m["role"], m["content"]) for m in prompt)


def pku_pairs(rows: list[dict], order_by: str, where: str) -> list[PreferencePair]:
    """Order each PKU-schema row by `order_by` (0 or 1 = index of the preferred response)."""
    out = []
    for i, row in enumerate(rows):
        loc = row_location(rows, i, where)
        _require(row, PKU_COLUMNS + (order_by,), loc, PKU_COLUMNS)
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
        loc = row_location(rows, i, where)
        _require(row, ("chosen", "rejected"), loc, ("chosen", "rejected"))
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
        loc = row_location(rows, i, where)
        _require(row, ("prompt", "chosen", "rejected"), loc, ("chosen", "rejected"))
        prompt = row["prompt"]
        if not isinstance(prompt, (str, list)):
            raise PrefvecError(f"{loc}: column prompt: expected a string or a list of messages, "
                               f"found {type(prompt).__name__}")
        msgs = _messages(prompt, loc) if isinstance(prompt, list) else user_prompt(prompt)
        out.append(PreferencePair(msgs, row["chosen"], row["rejected"], loc))
    return out


RUN_DIR_MARK = "{run_dir}"


def expand_run_dir(path: str, run_dir: str | Path) -> str:
    """`{run_dir}/mora/pairs.jsonl` -> `<absolute run_dir>/mora/pairs.jsonl`."""
    return path.replace(RUN_DIR_MARK, str(Path(run_dir).resolve()))


def expand_preference_paths(cfg) -> None:
    """Fill `{run_dir}` into the paths of `source: mora` preferences (in place)."""
    for pref in cfg.data.preferences.values():
        if pref.source == "mora" and RUN_DIR_MARK in pref.path:
            pref.path = expand_run_dir(pref.path, cfg.run_dir)


def read_pairs(path: str, name: str) -> list[PreferencePair]:
    """The `mora` source: pairs written by the MORA stage (pairs.jsonl or a mixed set)."""
    if RUN_DIR_MARK in path:
        raise PrefvecError(f"config parameter data.preferences.{name}.path: {path!r}: "
                           f"{RUN_DIR_MARK} is filled in by `prefvec run|submit|mora`; outside "
                           "them give the file's real path")
    if not Path(path).is_file():
        raise PrefvecError(f"data.preferences.{name}: MORA pairs {path} do not exist: run "
                           "`prefvec mora CONFIG` (or the pipeline's mora stage) first")
    return jsonl_pairs(read_rows(path), path)


#: where each public data set comes from, for the error a user without the file gets
DATA_DOWNLOADS = {
    "hh_rlhf": "Anthropic/hh-rlhf on the Hugging Face hub (e.g. helpful-base/test.jsonl.gz, "
               "saved as hh-rlhf/helpful-base-test.jsonl.gz)",
    "pku_saferlhf": "PKU-Alignment/PKU-SafeRLHF on the Hugging Face hub (rows with response_0, "
                    "response_1, better_response_id, safer_response_id)",
    "safety_pairs": "a JSON list of {prompt, response: [safer, worse]} derived from "
                    "PKU-Alignment/PKU-SafeRLHF (e.g. its safer_response_id pairs)",
    "alpaca_eval": "tatsu-lab/alpaca_eval on the Hugging Face hub (alpaca_eval.json, or a "
                   "*_model_outputs.json of its results)",
    "advbench": "harmful_behaviors.csv from github.com/llm-attacks/llm-attacks (data/advbench)",
    "harmbench": "harmbench_behaviors_text_all.csv from github.com/centerforaisafety/HarmBench "
                 "(data/behavior_datasets)",
    "beavertails": "PKU-Alignment/BeaverTails-Evaluation on the Hugging Face hub",
    "xstest": "xstest_prompts.csv from github.com/paul-rottger/xstest",
}


def missing_data_error(path: str, source: str) -> PrefvecError:
    """One line: which file is missing, and where the data set it should hold comes from."""
    where = DATA_DOWNLOADS.get(source)
    hint = f": download {where}, then point data.root (or the path) at it" if where else ""
    return PrefvecError(f"data file {path} does not exist ({source} data){hint}")


def _read(pref: PreferenceConfig) -> list[dict]:
    """Rows of a preference's file; a missing local file says what to download."""
    p = Path(pref.path)
    if not p.exists() and (p.suffix or pref.path.startswith((".", "/"))):
        raise missing_data_error(pref.path, pref.source)
    return read_rows(pref.path, pref.split)


def safety_pairs(rows: list[dict], where: str) -> list[PreferencePair]:
    """`{prompt, response: [safer, worse]}` rows (PKU-SafeRLHF-derived safety pairs)."""
    out = []
    for i, row in enumerate(rows):
        loc = row_location(rows, i, where)
        _require(row, ("prompt", "response"), loc, ("prompt",))
        pair = row["response"]
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(r, str)
                                                                 for r in pair)):
            raise PrefvecError(f"{loc}: column response: expected [safer, worse] strings")
        out.append(PreferencePair(user_prompt(row["prompt"]), pair[0], pair[1], loc))
    return out


def _embedded(name: str, pref: PreferenceConfig, data: DataConfig) -> list[PreferencePair]:
    rows = embedded.preference_rows(data.embedded_size, data.embedded_seed)
    return pku_pairs(rows, pref.order_by, f"embedded[{name}]")


def _pku(name: str, pref: PreferenceConfig, data: DataConfig) -> list[PreferencePair]:
    return pku_pairs(_read(pref), pref.order_by, pref.path)


def _hh(name: str, pref: PreferenceConfig, data: DataConfig) -> list[PreferencePair]:
    return hh_pairs(_read(pref), pref.path)[0]


def _jsonl(name: str, pref: PreferenceConfig, data: DataConfig) -> list[PreferencePair]:
    return jsonl_pairs(_read(pref), pref.path)


def _safety_pairs(name: str, pref: PreferenceConfig, data: DataConfig) -> list[PreferencePair]:
    return safety_pairs(_read(pref), pref.path)


def _mora(name: str, pref: PreferenceConfig, data: DataConfig) -> list[PreferencePair]:
    return read_pairs(pref.path, name)


PairLoader = Callable[[str, PreferenceConfig, DataConfig], list[PreferencePair]]

#: source -> reader of the + orientation pairs; the keys are
#: prefvec_ds.config.choices.PreferenceSource (tests/unit/test_choices.py checks both agree).
PREFERENCE_LOADERS: dict[PreferenceSource, PairLoader] = {
    "embedded": _embedded, "pku_saferlhf": _pku, "hh_rlhf": _hh, "safety_pairs": _safety_pairs,
    "jsonl": _jsonl, "mora": _mora,
}


def _load_part(name: str, pref: PreferenceConfig, data: DataConfig) -> list[PreferencePair]:
    pairs = PREFERENCE_LOADERS[pref.source](name, pref, data)
    return pairs[: pref.max_pairs] if pref.max_pairs else pairs


def load_preference(name: str, pref: PreferenceConfig, data: DataConfig) -> list[PreferencePair]:
    """The + orientation pairs of one configured preference, before tokenization."""
    pairs = PREFERENCE_LOADERS[pref.source](name, pref, data)
    if pref.also:  # interleaved, so that max_pairs keeps a share of every part
        parts = [pairs] + [_load_part(name, part, data) for part in pref.also]
        pairs = [p for row in zip_longest(*parts) for p in row if p is not None]
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
    rows = read_rows(data.sft_source)
    for i, row in enumerate(rows):
        loc = row_location(rows, i, data.sft_source)
        _require(row, (), loc)
        if "instruction" in row and "output" in row:  # Alpaca: instruction, input, output
            _require(row, (), loc, ("instruction", "output"))
            prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
            out.append((user_prompt(prompt), row["output"]))
        elif "messages" in row:
            msgs = list(_messages(row["messages"], loc) if isinstance(row["messages"], list)
                        else _messages(None, loc))
            if not msgs or msgs[-1][0] != "assistant":
                raise PrefvecError(f"{loc}: messages must end with an assistant turn")
            out.append((tuple(msgs[:-1]), msgs[-1][1]))
        else:
            _require(row, ("prompt", "response"), loc, ("prompt", "response"))
            out.append((user_prompt(row["prompt"]), row["response"]))
    if not out:
        raise PrefvecError(f"SFT data {data.sft_source}: no examples")
    return out
