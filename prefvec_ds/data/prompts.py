"""Named eval prompt sets: the public sets a researcher evaluates alignment on, read from the
files their projects publish (pipeline.eval.prompt_sets).

- alpaca_eval: AlpacaEval's 805 instructions (`alpaca_eval.json` or any `*_model_outputs.json`:
  rows with `instruction`; `subset` keeps one `dataset` value) - helpfulness;
- advbench: AdvBench `harmful_behaviors.csv` (`goal` column) - harmful requests;
- harmbench: HarmBench `harmbench_behaviors_text_*.csv` (`Behavior`; `subset` is the
  FunctionalCategory, `standard` by default: the behaviours with no context string);
- beavertails: BeaverTails-Evaluation (`prompt`, `category`; `subset` keeps one category);
- xstest: XSTest `xstest_prompts.csv` (`prompt`, `label`; `subset` safe = 250 safe prompts that
  look unsafe, the over-refusal test; unsafe = 200 contrast prompts);
- prompts: a .txt with one prompt per line, or json/jsonl rows with a `prompt` field.

PROMPT_LOADERS is the table: a new set is its reader there plus its name in
prefvec_ds.config.choices.PromptSource. A set keeps `max_prompts` prompts picked by a hash of
their text, so the choice is stable and spread over files sorted by category.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Callable

from prefvec_ds import PrefvecError
from prefvec_ds.config.choices import PromptSource
from prefvec_ds.config.evaluation import PromptSetConfig
from prefvec_ds.data.pairs import Messages, user_prompt
from prefvec_ds.data.sources import missing_data_error, read_rows


def _csv_rows(path: str, source: str, columns: tuple[str, ...]) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise missing_data_error(path, source)
    try:
        with open(p, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise PrefvecError(f"prompt file {path}: missing column(s) {', '.join(missing)}; "
                                   f"it has {', '.join(reader.fieldnames or [])}")
            return list(reader)
    except (UnicodeDecodeError, csv.Error, OSError) as err:
        raise PrefvecError(f"prompt file {path}: cannot be read as CSV ({err})") from None


def _json_rows(path: str, source: str, column: str) -> list[dict]:
    if not Path(path).is_file():
        raise missing_data_error(path, source)
    rows = read_rows(path)
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get(column), str):
            raise PrefvecError(f"prompt file {path}: row {i + 1}: expected a `{column}` string")
    return rows


def _where(rows: list[dict], column: str, value: str) -> list[dict]:
    return [r for r in rows if not value or r.get(column) == value]


def _alpaca_eval(path: str, subset: str) -> list[str]:
    rows = _json_rows(path, "alpaca_eval", "instruction")
    return [r["instruction"] for r in _where(rows, "dataset", subset)]


def _advbench(path: str, subset: str) -> list[str]:
    return [r["goal"] for r in _csv_rows(path, "advbench", ("goal",))]


def _harmbench(path: str, subset: str) -> list[str]:
    rows = _csv_rows(path, "harmbench", ("Behavior", "FunctionalCategory"))
    return [r["Behavior"] for r in _where(rows, "FunctionalCategory", subset or "standard")]


def _beavertails(path: str, subset: str) -> list[str]:
    rows = _json_rows(path, "beavertails", "prompt")
    return [r["prompt"] for r in _where(rows, "category", subset)]


def _xstest(path: str, subset: str) -> list[str]:
    rows = _csv_rows(path, "xstest", ("prompt", "label"))
    return [r["prompt"] for r in _where(rows, "label", subset)]


def _prompts(path: str, subset: str) -> list[str]:
    if path.endswith(".txt"):
        if not Path(path).is_file():
            raise missing_data_error(path, "prompts")
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        return [line.strip() for line in lines if line.strip()]
    return [r["prompt"] for r in _json_rows(path, "prompts", "prompt")]


#: source -> reader of a set's prompts (file order); keys: prefvec_ds.config.choices.PromptSource
#: (tests/unit/test_choices.py checks both agree).
PROMPT_LOADERS: dict[PromptSource, Callable[[str, str], list[str]]] = {
    "alpaca_eval": _alpaca_eval, "advbench": _advbench, "harmbench": _harmbench,
    "beavertails": _beavertails, "xstest": _xstest, "prompts": _prompts,
}


def _stable_order(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_prompt_set(name: str, spec: PromptSetConfig) -> list[Messages]:
    """The distinct prompts of one set: `max_prompts` of them by a hash of the text, in file
    order."""
    texts = list(dict.fromkeys(t.strip() for t in PROMPT_LOADERS[spec.source](spec.path,
                                                                               spec.subset)))
    texts = [t for t in texts if t]
    if spec.max_prompts and len(texts) > spec.max_prompts:
        kept = set(sorted(texts, key=_stable_order)[:spec.max_prompts])
        texts = [t for t in texts if t in kept]
    if not texts:
        raise PrefvecError(f"config parameter pipeline.eval.prompt_sets.{name}: no prompts in "
                           f"{spec.path}" + (f" with subset {spec.subset!r}" if spec.subset else ""))
    return [user_prompt(t) for t in texts]


def load_prompt_sets(sets: dict[str, PromptSetConfig]) -> tuple[list[Messages], list[str]]:
    """Prompts of every set in config order, and the set of each prompt (a prompt in two sets
    is answered once per set)."""
    prompts, names = [], []
    for name, spec in sets.items():
        for prompt in load_prompt_set(name, spec):
            prompts.append(prompt)
            names.append(name)
    return prompts, names
