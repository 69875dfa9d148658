"""Knowledge retention through lm-eval on a local task (no dataset hub) with the tiny Llama."""

import json

import pytest
import yaml

from prefvec_ds import PrefvecError
from prefvec_ds.data import embedded
from prefvec_ds.eval.knowledge import (KnowledgeSpec, embedded_knowledge_rows,
                                       evaluate_knowledge, write_local_task)

pytest.importorskip("lm_eval", reason="knowledge retention needs lm-eval")


def test_local_task_files(tmp_path):
    rows = embedded_knowledge_rows(12, seed=1)
    assert len(rows) == 12 and len({r["question"] for r in rows}) == 12
    for row in rows:
        answer = row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
        task = embedded.parse_task(row["question"])
        assert answer == f"the answer is {task.answer} ."
    write_local_task(tmp_path, "csqa_like", rows, "letters")
    spec = yaml.safe_load((tmp_path / "csqa_like.yaml").read_text())
    assert spec["doc_to_choice"] == list("ABCDE") and spec["doc_to_target"] == "answerKey"
    assert spec["doc_to_text"].startswith("Question: ") and spec["doc_to_text"].endswith("Answer:")
    assert [json.loads(line) for line in (tmp_path / "csqa_like.jsonl").open()] == rows
    with pytest.raises(PrefvecError, match="row 0"):
        write_local_task(tmp_path, "bad", [{"question": "q", "choices": {"label": ["A"],
                                                                         "text": ["a"]},
                                            "answerKey": "B"}])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from prefvec_ds.models.embedded import materialize_embedded_model

    root = tmp_path_factory.mktemp("knowledge")
    model_dir = materialize_embedded_model("tiny-llama", root / "tiny", seed=0)
    write_local_task(root / "tasks", "embedded_knowledge", embedded_knowledge_rows(24), "cloze")
    return model_dir, root / "tasks"


def test_lm_eval_on_a_local_task_from_a_folder_and_from_a_model_object(tiny, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # nothing may come from the hub
    model_dir, tasks = tiny
    spec = KnowledgeSpec(tasks=["embedded_knowledge"], include_path=str(tasks))
    from_folder = evaluate_knowledge(str(model_dir), None, spec)["embedded_knowledge"]
    assert from_folder["n"] == 24 and 0.0 <= from_folder["acc"] <= 1.0
    assert "acc_stderr" in from_folder
    # an in-memory model (e.g. a base with vectors applied in place) gives the same numbers
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    from_object = evaluate_knowledge(model, AutoTokenizer.from_pretrained(model_dir), spec)
    assert from_object["embedded_knowledge"]["acc"] == from_folder["acc"]
    with pytest.raises(PrefvecError, match="tokenizer"):
        evaluate_knowledge(model, None, spec)
