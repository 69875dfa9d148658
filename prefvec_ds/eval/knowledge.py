"""Knowledge retention through the lm-eval harness (paper: CommonsenseQA accuracy as eta grows).

On a cluster: `prefvec scorers knowledge runs/x/merge/helpful1_harmless1 --tasks commonsense_qa`
runs lm-eval's own task (its data set comes from the hub, or the hub cache on compute nodes that
are offline). Without a hub, a local task is a YAML over a local jsonl: `write_local_task` writes
one in CommonsenseQA's schema (question, choices {label, text}, answerKey), either with
CommonsenseQA's own letter prompt (`letters`: "Question: ...\\nA. ...\\nAnswer:" -> " B") or as a
cloze (`cloze`: the answer text is the continuation, what a small model can do);
`embedded_knowledge_rows` builds such rows from the embedded world's checkable facts.

A model is a HF folder (lm-eval's `hf` model type) or a model object already in memory, e.g. a
base with preference vectors applied in place (prefvec_ds.ckpt.apply_vectors), so an eta sweep
reads the base once.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from prefvec_ds import PrefvecError
from prefvec_ds.config.checks import check

LETTERS = "ABCDE"
STYLES = ("letters", "cloze")


@dataclass
class KnowledgeSpec:
    """What lm-eval runs."""

    tasks: list[str] = field(default_factory=lambda: ["commonsense_qa"])
    """lm-eval task names (built-in, or defined by a YAML under include_path)."""
    include_path: str = ""
    """Folder of custom task YAMLs (e.g. from write_local_task); empty = built-in tasks only."""
    num_fewshot: int = 0
    """Few-shot examples per question (the paper's CommonsenseQA setting is zero-shot)."""
    limit: int = 0
    """Questions per task (0 = all): a quick look on a big task."""
    batch_size: int = 8
    """Sequences per forward."""
    apply_chat_template: bool = False
    """Render the context with the tokenizer's chat template (instruct models, the embedded
    tiny Llama); CommonsenseQA's published numbers use plain text."""
    seed: int = 1234
    """lm-eval's seeds (few-shot sampling)."""

    def __post_init__(self):
        check(bool(self.tasks), "knowledge.tasks", "at least one task", self.tasks)
        check(self.num_fewshot >= 0, "knowledge.num_fewshot", ">= 0", self.num_fewshot)
        check(self.limit >= 0, "knowledge.limit", ">= 0", self.limit)
        check(self.batch_size >= 1, "knowledge.batch_size", ">= 1", self.batch_size)


def _local_task_names(include_path: str) -> set[str]:
    names = set()
    for path in Path(include_path).rglob("*.yaml"):
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            continue  # lm-eval YAMLs may use !function tags; they are not ours
        if isinstance(doc, dict) and isinstance(doc.get("task"), str):
            names.add(doc["task"])
    return names


def task_manager(spec: KnowledgeSpec):
    """lm-eval's TaskManager; the built-in index (thousands of YAMLs, seconds to scan) is read
    only when a requested task is not defined under include_path."""
    from lm_eval.tasks import TaskManager  # noqa: PLC0415

    if not spec.include_path:
        return TaskManager()
    if not Path(spec.include_path).is_dir():
        raise PrefvecError(f"knowledge.include_path {spec.include_path}: not a folder")
    local = _local_task_names(spec.include_path)
    return TaskManager(include_path=spec.include_path,
                       include_defaults=not set(spec.tasks) <= local)


def evaluate_knowledge(model, tokenizer, spec: KnowledgeSpec, dtype: str = "float32",
                       device: str = "") -> dict[str, dict[str, float]]:
    """{task: {metric: value}}, e.g. {"commonsense_qa": {"acc": 0.55, "acc_stderr": 0.014,
    "n": 1221}}.

    `model` is a HF folder (tokenizer None = the folder's) or a loaded causal LM with its
    tokenizer.
    """
    try:
        import lm_eval  # noqa: PLC0415
        from lm_eval.models.huggingface import HFLM  # noqa: PLC0415
    except ImportError:
        raise PrefvecError("knowledge retention needs lm-eval (pip install lm-eval)") from None
    import torch  # noqa: PLC0415

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(model, (str, Path)):
        from prefvec_ds.models.hf import check_model_dir  # noqa: PLC0415

        folder = str(check_model_dir(model, "model"))
        lm = HFLM(pretrained=folder, tokenizer=tokenizer or folder, dtype=dtype, device=device,
                  batch_size=spec.batch_size)
    else:
        if tokenizer is None:
            raise PrefvecError("evaluate_knowledge: a model object needs its tokenizer")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=list(spec.tasks), num_fewshot=spec.num_fewshot,
        limit=spec.limit or None, task_manager=task_manager(spec), log_samples=False,
        bootstrap_iters=1000, apply_chat_template=spec.apply_chat_template,
        random_seed=spec.seed, numpy_random_seed=spec.seed, torch_random_seed=spec.seed,
        fewshot_random_seed=spec.seed)
    return {task: {("n" if m == "sample_len" else m.split(",")[0]): float(v)
                   for m, v in res.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, res in out["results"].items()}


def write_local_task(folder: str | Path, name: str, rows: list[dict], style: str = "letters"
                     ) -> Path:
    """`<folder>/<name>.jsonl` + `<folder>/<name>.yaml`: an lm-eval multiple-choice task over
    CommonsenseQA-schema rows ({question, choices: {label, text}, answerKey}). Returns folder."""
    check(style in STYLES, "style", "|".join(STYLES), style)
    check(name.replace("_", "").isalnum(), "task name", "letters, digits and _", name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        if not {"question", "choices", "answerKey"} <= set(row) or \
                row["answerKey"] not in row["choices"]["label"]:
            raise PrefvecError(f"task {name} row {i}: expected question, choices {{label, text}} "
                               "and an answerKey among the labels")
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
            "test_split": "test", "output_type": "multiple_choice",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    if style == "letters":  # CommonsenseQA's own prompt (lm-eval tasks/commonsense_qa)
        task["doc_to_text"] = ("Question: {{ question.strip() }}\n" + "".join(
            f"{c}. {{{{choices['text'][{i}]}}}}\n" for i, c in enumerate(LETTERS)) + "Answer:")
        task["doc_to_target"] = "answerKey"
        task["doc_to_choice"] = list(LETTERS)
    else:
        task["doc_to_text"] = "{{ question.strip() }}"
        task["doc_to_target"] = "{{ choices['label'].index(answerKey) }}"
        task["doc_to_choice"] = "{{ choices['text'] }}"
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return folder


def embedded_knowledge_rows(n: int = 60, seed: int = 0) -> list[dict]:
    """CommonsenseQA-schema questions on the embedded world's facts (sums, capitals, opposites),
    answered the way the embedded SFT data answers ("the answer is X ."), 5 choices each."""
    from prefvec_ds.data import embedded  # noqa: PLC0415

    rng = random.Random(seed)
    facts: dict[str, str] = {}
    for row in embedded.preference_rows(20 * n, seed):
        task = embedded.parse_task(row["prompt"])
        if task is not None and task.harm is None:
            facts.setdefault(task.prompt, task.answer)
    rows = []
    for i, (question, answer) in enumerate(list(facts.items())[:n]):
        pool = (embedded.NUMBERS if answer in embedded.NUMBERS
                else sorted(set(embedded.CAPITALS.values()) | set(embedded.OPPOSITES.values())))
        options = rng.sample([x for x in pool if x != answer], 4) + [answer]
        rng.shuffle(options)
        rows.append({"id": f"embedded-{i}", "question": question,
                     "choices": {"label": list(LETTERS),
                                 "text": [f"the answer is {o} ." for o in options]},
                     "answerKey": LETTERS[options.index(answer)]})
    return rows
