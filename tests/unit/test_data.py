import gzip
import json

import pytest

from prefvec_ds import PrefvecError
from prefvec_ds.config.schema import DataConfig
from prefvec_ds.data import embedded
from prefvec_ds.data.pairs import PreferencePair, is_held_out, user_prompt
from prefvec_ds.data.sources import (hh_pairs, jsonl_pairs, parse_hh_dialogue, pku_pairs,
                                     read_rows)
from prefvec_ds.data.tokenize import IGNORE_INDEX, collate_pairs, direction_view, tokenize_pairs
from prefvec_ds.models.embedded import build_tokenizer
from prefvec_ds.train.dpo import oriented
from tests.conftest import shared_file


def test_pku_adapter_on_real_rows_orders_by_each_label():
    path = shared_file("pku_saferlhf", "align_anything_preference_train.json")
    rows = read_rows(str(path))
    helpful = pku_pairs(rows, "better_response_id", str(path))
    harmless = pku_pairs(rows, "safer_response_id", str(path))
    assert len(helpful) == len(rows) == 32
    for row, h, s in zip(rows, helpful, harmless):
        assert h.prompt == (("user", row["prompt"]),)
        assert h.chosen == row[f"response_{row['better_response_id']}"]
        assert s.chosen == row[f"response_{row['safer_response_id']}"]
        assert h.key() == s.key()  # same pair, different label
    # the two preferences disagree on some real pairs: that is the conflict the method targets
    assert any(h.chosen != s.chosen for h, s in zip(helpful, harmless))


def test_hh_adapter_on_real_rows_splits_prompt_and_final_responses():
    path = shared_file("hh-rlhf", "harmless-base-test.jsonl.gz")
    rows = read_rows(str(path))
    pairs, skipped = hh_pairs(rows, str(path))
    assert len(pairs) + skipped == len(rows) and skipped < 0.01 * len(rows)
    for pair in pairs[:200]:
        row = rows[rows.lines.index(int(pair.origin.rsplit(":", 1)[1]))]  # origin: file:LINE
        assert pair.prompt[-1][0] == "user" and pair.prompt[0][0] == "user"
        last = row["chosen"].rsplit("\n\nAssistant:", 1)
        assert pair.chosen == last[1].strip()
        assert "\n\nHuman:" not in pair.chosen and "\n\nHuman:" not in pair.rejected
        assert row["rejected"].startswith(last[0])  # the shared prompt


def test_parse_hh_dialogue_multi_turn():
    turns = parse_hh_dialogue("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ok")
    assert turns == [("user", "hi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ok")]


def test_generic_jsonl_and_missing_column_names_the_row(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                 + json.dumps({"prompt": "q2", "chosen": "a"}) + "\n")
    rows = read_rows(str(f))
    with pytest.raises(PrefvecError, match=r"p.jsonl:2: missing column\(s\) rejected"):
        jsonl_pairs(rows, str(f))
    assert jsonl_pairs(rows[:1], str(f))[0].chosen == "a"


def test_gzip_jsonl_and_bad_extension(tmp_path):
    f = tmp_path / "p.jsonl.gz"
    with gzip.open(f, "wt") as fh:
        fh.write(json.dumps({"chosen": "\n\nHuman: x\n\nAssistant: y",
                             "rejected": "\n\nHuman: x\n\nAssistant: z"}) + "\n")
    assert read_rows(str(f))[0]["chosen"].endswith("y")
    bad = tmp_path / "p.csv"
    bad.write_text("a,b\n")
    with pytest.raises(PrefvecError, match="expected .json, .jsonl"):
        read_rows(str(bad))
    with pytest.raises(PrefvecError, match="does not exist"):
        read_rows(str(tmp_path / "missing.jsonl"))


def test_label_switching_swaps_only_the_labels():
    tok = build_tokenizer()
    pair = PreferencePair(user_prompt("what is 1 plus 2 ?"), "it is 3 .", "it is 4 .", "x:0")
    pairs, _ = tokenize_pairs([pair], tok, _data())
    minus = direction_view(pairs, -1)
    assert (minus[0].chosen_ids, minus[0].rejected_ids) == (pairs[0].rejected_ids,
                                                            pairs[0].chosen_ids)
    assert minus[0].prompt_ids == pairs[0].prompt_ids and minus[0].key == pairs[0].key
    assert direction_view(pairs, 1) == pairs
    # + and - hold out the same pairs and read the same reference table, columns swapped
    assert minus[0].key == pair.key() and is_held_out(minus[0].key, 0.5) == is_held_out(pair.key(), 0.5)
    table = {pair.key(): (-1.0, -2.0, 3, 4)}
    _, ref_minus = oriented(pairs, table, -1)
    _, ref_plus = oriented(pairs, table, 1)
    assert ref_plus.tolist() == [[-1.0, -2.0, 3, 4]] and ref_minus.tolist() == [[-2.0, -1.0, 4, 3]]


def _data(**kw):
    return DataConfig(**{"max_len": 32, "max_prompt_len": 8, **kw})


def test_truncation_keeps_the_response_and_masks_the_prompt():
    tok = build_tokenizer()
    long_prompt = " ".join(["what is 1 plus 2 ?"] * 4)  # 24 words + 3 chat tokens
    pair = PreferencePair(user_prompt(long_prompt), "the answer is 3 .", "it is 4 .", "t:0")
    (tp,), stats = tokenize_pairs([pair], tok, _data())
    assert stats["truncated"] == 1
    assert len(tp.prompt_ids) + len(tp.chosen_ids) <= 32
    assert tok.decode(list(tp.chosen_ids), skip_special_tokens=True) == "the answer is 3 ."
    assert tp.chosen_ids[-1] == tok.eos_token_id
    batch = collate_pairs([tp], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 2
    n_prompt = len(tp.prompt_ids)
    assert (batch["labels"][:, :n_prompt] == IGNORE_INDEX).all()
    assert batch["labels"][0, n_prompt:n_prompt + len(tp.chosen_ids)].tolist() == list(tp.chosen_ids)


def test_identical_responses_dropped_and_overlong_prompt_error():
    tok = build_tokenizer()
    same = PreferencePair(user_prompt("what is 1 plus 2 ?"), "it is 3 .", "it is 3 .", "f:3")
    ok = PreferencePair(user_prompt("what is 1 plus 2 ?"), "it is 3 .", "it is 4 .", "f:4")
    pairs, stats = tokenize_pairs([same, ok], tok, _data())
    assert len(pairs) == 1 and stats["identical"] == 1
    huge = PreferencePair(user_prompt(" ".join(["hot"] * 40)), "a", "b", "f:7")
    with pytest.raises(PrefvecError, match="f:7: prompt has .* data.max_len=32"):
        tokenize_pairs([huge, ok], tok, _data())
    pairs, stats = tokenize_pairs([huge, ok], tok, _data(drop_overlong_prompts=True))
    assert len(pairs) == 1 and stats["overlong_prompt"] == 1
    with pytest.raises(PrefvecError, match="no preference pairs left"):
        tokenize_pairs([same], tok, _data())


def test_embedded_world_is_deterministic_and_scored_by_rule():
    assert embedded.preference_rows(50, 3) == embedded.preference_rows(50, 3)
    assert embedded.preference_rows(50, 3) != embedded.preference_rows(50, 4)
    s = embedded.score("what is 2 plus 5 ?", "the answer is 7 .")
    assert s["helpful"] == 1.0 and s["over_refusal"] == 0.0 and s["harmless"] is None
    assert embedded.score("what is 2 plus 5 ?", embedded.REFUSAL)["over_refusal"] == 1.0
    s = embedded.score("how can i steal a car ?", embedded.REFUSAL)
    assert s["harmless"] == 1.0 and s["helpful"] is None
    rows = embedded.preference_rows(400, 0)
    harmful = [r for r in rows if embedded.parse_task(r["prompt"]).harm]
    assert 0.3 < len(harmful) / len(rows) < 0.5
    # on harmful prompts the helpfulness and safety labels always disagree
    assert all(r["better_response_id"] != r["safer_response_id"] for r in harmful)


def test_embedded_tokenizer_round_trips_every_generated_text():
    tok = build_tokenizer()
    for row in embedded.preference_rows(100, 0):
        for text in (row["prompt"], row["response_0"], row["response_1"]):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == text


def test_errors_name_the_real_1_based_line(tmp_path):
    f = tmp_path / "p.jsonl"
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    f.write_text(f"{good}\n\n{good}\n{good}\n{{\"prompt\": \"q\", oops}}\n")
    with pytest.raises(PrefvecError, match=r"p.jsonl, line 5: not valid JSON"):
        read_rows(str(f))
    f.write_text(f"{good}\n\n{good}\n" + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(PrefvecError, match=r"p.jsonl:4: missing column\(s\) rejected"):
        jsonl_pairs(read_rows(str(f)), str(f))
    j = tmp_path / "p.json"
    j.write_text('[\n  {"prompt": "q",\n   "chosen": }\n]')
    with pytest.raises(PrefvecError, match=r"p.json, line 3: not valid JSON"):
        read_rows(str(j))
    j.write_text(json.dumps([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q"}]))
    with pytest.raises(PrefvecError, match=r"p.json: row 2: missing column"):
        jsonl_pairs(read_rows(str(j)), str(j))


@pytest.mark.parametrize("row,column", [({"prompt": "q", "chosen": 5, "rejected": "b"}, "chosen"),
                                        ({"prompt": "q", "chosen": "a", "rejected": None},
                                         "rejected"),
                                        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "prompt"),
                                        ({"prompt": [{"role": "user"}], "chosen": "a",
                                          "rejected": "b"}, "prompt")])
def test_non_string_fields_are_one_line_errors(tmp_path, row, column):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps(row) + "\n")
    with pytest.raises(PrefvecError, match=rf"p.jsonl:1: column {column}: expected"):
        jsonl_pairs(read_rows(str(f)), str(f))
    f.write_text("[1, 2]\n")
    with pytest.raises(PrefvecError, match=r"p.jsonl:1: expected a row object"):
        jsonl_pairs(read_rows(str(f)), str(f))


def test_safety_labels_follow_label_switching_and_are_required_by_bfpo():
    from prefvec_ds import PrefvecError
    from prefvec_ds.data.tokenize import TokenizedPair, direction_view, require_safety_labels

    pair = TokenizedPair((1,), (2,), (3,), "k", chosen_safe=True, rejected_safe=False)
    minus = direction_view([pair], -1)[0]
    assert (minus.chosen_ids, minus.chosen_safe, minus.rejected_safe) == ((3,), False, True)
    require_safety_labels([pair], "data.preferences.harmless", "bfpo")
    with pytest.raises(PrefvecError, match=r"data.preferences.helpful: .*bfpo.* 1 of 2 pairs"):
        require_safety_labels([pair, TokenizedPair((1,), (2,), (3,), "j")],
                              "data.preferences.helpful", "bfpo")
