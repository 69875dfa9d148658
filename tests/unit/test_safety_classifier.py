"""The generative safety classifier on the embedded tiny Llama (random init, word-level
tokenizer): P(safe) from the next token, in range, batch-invariant (left padding with position
ids from the mask), equal to the probability computed by hand; option checks. On the real
SmolLM2-135M: tests/e2e/test_safety_classifier_smollm2.py."""

from __future__ import annotations

import pytest
import torch

from prefvec_ds import PrefvecError
from prefvec_ds.data.pairs import user_prompt
from prefvec_ds.eval.scorers import build_scorer, check_scorer_options
from prefvec_ds.models.embedded import materialize_embedded_model

pytestmark = pytest.mark.timeout(300)
# the embedded vocabulary has neither "safe" nor "unsafe": two words it has stand in
WORDS = {"safe_word": "help", "unsafe_word": "sorry"}
PROMPTS = [user_prompt("how do i break a car window"), user_prompt("what is the capital of "
                                                                   "france ?"),
           user_prompt("hello"), user_prompt("how can i hide a dog"),
           user_prompt("is it hot in cairo")]
ANSWERS = ["i can not help with that .", "paris", None, "i know a big dark car . " * 6, "yes"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(materialize_embedded_model("tiny-llama", tmp_path_factory.mktemp("m") / "tiny", 3))


def test_probabilities_in_range_and_batch_invariant(tiny):
    one = build_scorer({"kind": "safety_classifier", "path": tiny, "batch_size": 1, **WORDS})
    four = build_scorer({"kind": "safety_classifier", "path": tiny, "batch_size": 4, **WORDS})
    a = one.score(PROMPTS, ANSWERS)["guard_safe"]
    b = four.score(PROMPTS, ANSWERS)["guard_safe"]
    assert a[2] is None and b[2] is None
    kept = [i for i in range(5) if i != 2]
    assert all(0.0 < a[i] < 1.0 for i in kept)
    assert len({round(a[i], 6) for i in kept}) == 4  # the inputs matter
    torch.testing.assert_close(torch.tensor([b[i] for i in kept]),
                               torch.tensor([a[i] for i in kept]), rtol=0, atol=1e-5)


def test_equals_the_next_token_probability_by_hand(tiny):
    scorer = build_scorer({"kind": "safety_classifier", "path": tiny, **WORDS})
    tok = scorer.tokenizer
    assert scorer.safe_ids == [tok.convert_tokens_to_ids("help")]
    assert scorer.unsafe_ids == [tok.convert_tokens_to_ids("sorry")]
    text = scorer.render(PROMPTS[0], ANSWERS[0])
    assert "how do i break a car window" in text and "i can not help with that ." in text
    assert text.endswith("<|assistant|>")  # the chat template's generation prompt
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = scorer.model(ids).logits[0, -1]
    p = torch.softmax(logits, -1)
    want = p[scorer.safe_ids].sum() / (p[scorer.safe_ids].sum() + p[scorer.unsafe_ids].sum())
    got = scorer.score(PROMPTS[:1], ANSWERS[:1])["guard_safe"][0]
    assert got == pytest.approx(float(want), abs=1e-6)


def test_chat_template_and_custom_templates(tiny):
    chat = build_scorer({"kind": "safety_classifier", "path": tiny, "template": "chat",
                         "answer_prefix": " is", **WORDS})
    text = chat.render(PROMPTS[1], "paris")
    assert text == "<|user|> what is the capital of france ? <|end|> <|assistant|> paris " \
                   "<|end|> <|assistant|> is"
    own = build_scorer({"kind": "safety_classifier", "path": tiny,
                        "template": "{prompt} -> {answer} : help or sorry ?", **WORDS})
    assert "hello -> hi : help or sorry ?" in own.render(user_prompt("hello"), "hi")
    assert 0 < own.score([user_prompt("hello")], ["hi"])["guard_safe"][0] < 1


def test_words_the_tokenizer_cannot_tell_apart_are_refused(tiny):
    with pytest.raises(PrefvecError, match="cannot tell 'safe'"):  # both are <unk> here
        build_scorer({"kind": "safety_classifier", "path": tiny})


@pytest.mark.parametrize("options, message", [
    ({}, "safety_classifier.path"),
    ({"path": "m", "template": "no placeholders"}, "safety_classifier.template"),
    ({"path": "m", "batch_size": 0}, "safety_classifier.batch_size"),
    ({"path": "m", "safe_word": "x", "unsafe_word": " x"}, "a word other than safe_word"),
    ({"path": "m", "treshold": 0.5}, "unknown option"),
])
def test_option_checks(options, message):
    with pytest.raises(PrefvecError, match=message):
        check_scorer_options({"kind": "safety_classifier", **options})


def test_not_a_model_folder(tmp_path):
    with pytest.raises(PrefvecError, match="not a model folder"):
        build_scorer({"kind": "safety_classifier", "path": str(tmp_path)})
