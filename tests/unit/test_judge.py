"""The LLM judge against a real loopback HTTP server (stdlib, scripted statuses and replies):
retries and backoff, Retry-After, the concurrency bound, parse retry and missing scores, the
cache, 4xx and dead-server errors, config checks. The same protocol against `transformers
serve` with a real model: tests/e2e/test_judge_server.py."""

from __future__ import annotations

import json
from pathlib import Path
import time

import pytest

from prefvec_ds import PrefvecError
from prefvec_ds.cli import main
from prefvec_ds.data.pairs import user_prompt
from prefvec_ds.eval.judge import (REFERENCE_PROMPT, RETRY_PROMPT, JudgeConfig, JudgeScorer,
                                   parse_rating)
from prefvec_ds.eval.scorers import build_scorer, check_scorer_options
from tests.judge_servers import RecordingServer, free_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def server():
    srv = RecordingServer()
    yield srv
    srv.close()


def judge(server, tmp_path, **options) -> JudgeScorer:
    options = {"base_url": server.url, "model": "m", "cache_dir": str(tmp_path / "cache"),
               "backoff_s": 0.01, **options}
    return build_scorer({"kind": "judge", **options})


def test_parse_rating_formats():
    assert parse_rating('{"helpfulness": 7, "harmlessness": 9}') == (7, 9)
    assert parse_rating("Helpfulness: 8/10\nHarmlessness: 10/10") == (8, 10)
    assert parse_rating("**Helpfulness score:** 6\n**Harmlessness:** 3") == (6, 3)
    assert parse_rating("helpfulness (1-10): 7, harmlessness: 2") is None  # would read 1
    assert parse_rating("Helpfulness: 11\nHarmlessness: 5") is None  # out of range
    assert parse_rating("Helpfulness: 4") is None
    assert parse_rating("") is None


def test_two_requests_per_new_pair_and_the_reference_in_the_second(server, tmp_path):
    server.script = [("reply", "REF-ALPHA"), ("reply", '{"helpfulness": 8, "harmlessness": 9}')]
    scorer = judge(server, tmp_path)
    out = scorer.score([user_prompt("How do I boil an egg?")], ["Boil it for 8 minutes."])
    assert out == {"judge_helpful": [8.0], "judge_harmless": [9.0]}
    first, second = (b["messages"][-1]["content"] for b in server.bodies)
    assert first == REFERENCE_PROMPT.format(prompt="How do I boil an egg?")
    assert "REF-ALPHA" in second and "Boil it for 8 minutes." in second
    assert all(b["model"] == "m" and b["temperature"] == 0.0 for b in server.bodies)
    c = scorer.last
    assert (c.pairs, c.requests, c.cache_hits, c.failures) == (1, 2, 0, 0)
    assert (c.prompt_tokens, c.completion_tokens) == (22, 10)  # the server's usage, summed
    # a second answer to the same prompt reuses the cached reference: one request
    scorer.score([user_prompt("How do I boil an egg?")], ["Microwave it."])
    assert len(server.bodies) == 3 and scorer.last.reference_cache_hits == 1
    # the same pairs again: all from the cache, no request at all
    again = scorer.score([user_prompt("How do I boil an egg?")] * 2,
                         ["Boil it for 8 minutes.", "Microwave it."])
    assert len(server.bodies) == 3 and scorer.last.cache_hits == 2
    assert again["judge_helpful"][0] == 8.0
    assert scorer.counters.requests == 3 and scorer.counters.cache_hits == 2


def test_retries_on_500_and_429_with_retry_after(server, tmp_path):
    server.script = [("status", 500), ("status", 429, {"Retry-After": "0"}), ("status", 503),
                     ("reply", "ref"), ("reply", "Helpfulness: 3\nHarmlessness: 4")]
    scorer = judge(server, tmp_path, max_retries=3)
    assert scorer.score([user_prompt("q")], ["a"])["judge_helpful"] == [3.0]
    assert server.statuses == [500, 429, 503, 200, 200]
    assert (scorer.last.requests, scorer.last.retries, scorer.last.failures) == (5, 3, 0)


def test_exhausted_retries_leave_the_pair_missing_not_defaulted(server, tmp_path):
    server.default = ("reply", "Helpfulness: 2 Harmlessness: 2")
    server.route = lambda body: ("status", 500) if "q1" in str(body) else None
    scorer = judge(server, tmp_path, max_retries=2)
    out = scorer.score([user_prompt("q1"), user_prompt("q2")], ["a1", "a2"])
    assert out == {"judge_helpful": [None, 2.0], "judge_harmless": [None, 2.0]}
    assert (scorer.last.failures, scorer.last.retries, scorer.last.requests) == (1, 2, 5)
    # the failed pair was not cached: the next run asks for it again
    server.route = None
    assert scorer.score([user_prompt("q1")], ["a1"])["judge_helpful"] == [2.0]
    assert scorer.last.requests == 2


def test_unparseable_reply_is_asked_once_more(server, tmp_path):
    server.script = [("reply", "ref"), ("reply", "I think it is fine."),
                     ("reply", '{"helpfulness": 6, "harmlessness": 7}')]
    scorer = judge(server, tmp_path)
    assert scorer.score([user_prompt("q")], ["a"])["judge_harmless"] == [7.0]
    retry = server.bodies[2]["messages"]
    assert retry[-2] == {"role": "assistant", "content": "I think it is fine."}
    assert retry[-1]["content"] == RETRY_PROMPT and scorer.last.parse_retries == 1


def test_twice_unparseable_is_recorded_missing_and_cached(server, tmp_path):
    server.script = [("reply", "ref"), ("reply", "no idea"), ("reply", "still no idea")]
    scorer = judge(server, tmp_path)
    out = scorer.score([user_prompt("q")], ["a"])
    assert out == {"judge_helpful": [None], "judge_harmless": [None]}
    assert scorer.last.unparseable == 1
    records = list((tmp_path / "cache").rglob("rating/*/*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["scores"] is None and record["replies"] == ["no idea", "still no idea"]
    scorer.score([user_prompt("q")], ["a"])
    assert len(server.bodies) == 3  # kept: the judge would repeat itself
    server.script = [("reply", "Helpfulness: 9, Harmlessness: 9")]
    again = judge(server, tmp_path, retry_missing=True).score([user_prompt("q")], ["a"])
    assert again["judge_helpful"] == [9.0] and len(server.bodies) == 4  # reference cached


def test_concurrency_bound_and_shared_references(tmp_path):
    server = RecordingServer(default=("reply", "Helpfulness: 5\nHarmlessness: 5"), delay=0.2)
    try:
        scorer = judge(server, tmp_path, max_concurrency=3)
        prompts = [user_prompt(f"question {i % 4}") for i in range(12)]
        out = scorer.score(prompts, [f"answer {i}" for i in range(12)])
    finally:
        server.close()
    assert out["judge_helpful"] == [5.0] * 12
    assert server.peak == 3 and scorer.last.peak_in_flight == 3
    references = [b for b in server.bodies if b["max_tokens"] == 400]
    assert len(references) == 4  # one per distinct prompt, shared by its three answers
    assert len(server.bodies) == 16


def test_a_repeated_pair_is_judged_once_per_call(server, tmp_path):
    scorer = judge(server, tmp_path, cache_dir="off")
    out = scorer.score([user_prompt("q")] * 3 + [user_prompt("q2")], ["a", "a", None, "a"])
    assert out["judge_helpful"] == [5.0, 5.0, None, 5.0]
    assert scorer.last.pairs == 2 and len(server.bodies) == 4


def test_callable_from_inside_a_running_event_loop(server, tmp_path):
    import asyncio

    async def caller():
        return judge(server, tmp_path).score([user_prompt("q")], ["a"])

    assert asyncio.run(caller())["judge_harmless"] == [6.0]


def test_client_error_stops_at_once_with_the_servers_message(server, tmp_path):
    server.script = [("status", 400)]
    with pytest.raises(PrefvecError, match="HTTP 400 for model 'm'.*scripted 400"):
        judge(server, tmp_path).score([user_prompt("q")], ["a"])
    assert len(server.bodies) == 1


def test_dead_server_is_a_clear_error_not_a_hang(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    scorer = JudgeScorer(base_url=url, model="m", cache_dir="off", backoff_s=0.01,
                         max_retries=2, abort_after_failures=3)
    t0 = time.monotonic()
    with pytest.raises(PrefvecError, match=r"3 pairs in a row failed after every retry, last: "
                                           r"ConnectError"):
        scorer.score([user_prompt(f"q{i}") for i in range(20)], ["a"] * 20)
    assert time.monotonic() - t0 < 30
    assert scorer.last.failures >= 3 and scorer.last.requests <= 20 * 3


def test_api_key_from_the_named_variable(server, tmp_path, monkeypatch):
    server.script = [("reply", "ref"), ("reply", "Helpfulness: 5 Harmlessness: 5")]
    seen = []
    handler = server.httpd.RequestHandlerClass
    original = handler.do_POST

    def spy(self):
        seen.append(self.headers.get("Authorization"))
        original(self)

    monkeypatch.setattr(handler, "do_POST", spy)
    monkeypatch.setenv("PREFVEC_TEST_JUDGE_KEY", "sk-test")
    judge(server, tmp_path, api_key_env="PREFVEC_TEST_JUDGE_KEY").score([user_prompt("q")],
                                                                        ["a"])
    assert seen == ["Bearer sk-test"] * 2
    monkeypatch.delenv("PREFVEC_TEST_JUDGE_KEY")
    with pytest.raises(PrefvecError, match="PREFVEC_TEST_JUDGE_KEY is not set"):
        judge(server, tmp_path, api_key_env="PREFVEC_TEST_JUDGE_KEY")


@pytest.mark.parametrize("options, message", [
    ({"model": "m"}, "judge.base_url: expected an http"),
    ({"base_url": "http://127.0.0.1:1/v1"}, "judge.model"),
    ({"base_url": "http://h/v1", "model": "m", "max_concurrency": 0}, "max_concurrency"),
    ({"base_url": "http://h/v1", "model": "m", "timeout_s": 0}, "timeout_s: expected a number > 0"),
    ({"base_url": "http://h/v1", "model": "m", "api_key_env": "sk-123secret"}, "not shown"),
    ({"base_url": "http://h/v1", "model": "m", "modle": "x"}, "unknown option"),
])
def test_config_checks(options, message):
    with pytest.raises(PrefvecError, match=message) as err:
        check_scorer_options({"kind": "judge", **options})
    assert "123secret" not in str(err.value)


@pytest.mark.parametrize("load", ["eval", "run"])
def test_judge_options_are_checked_when_a_run_config_is_loaded(tmp_path, load):
    """`prefvec eval|sweep` and `prefvec run` refuse a judge without base_url before any stage
    or generation starts (config/ cannot import eval/, so the check lives in these two doors)."""
    from prefvec_ds.eval.commands import load_run_config
    from prefvec_ds.pipeline.prepare import validate

    recipe = str(Path(__file__).parents[2] / "recipes" / "quickstart.yaml")
    bad = [f"run_dir={tmp_path / 'run'}", "pipeline.eval.scorers=[rules, {kind: judge, model: m}]"]
    with pytest.raises(PrefvecError, match="judge.base_url"):
        if load == "eval":
            load_run_config(recipe, bad)
        else:
            from prefvec_ds.config.loader import load_config

            validate(load_config(recipe, bad))
    good = [bad[0], "pipeline.eval.scorers=[rules, {kind: judge, base_url: 'http://h/v1', "
            "model: m}]"]
    cfg = load_run_config(recipe, good)
    assert JudgeConfig(base_url="http://h/v1", model="m").protocol.startswith("pv-judge-1")
    assert len(cfg.pipeline.eval.scorers) == 2
    assert not (tmp_path / "run").exists()


def test_cli_judge_scores_a_file_with_counters(server, tmp_path, capsys):
    server.script = [("reply", "ref"), ("reply", "Helpfulness: 7 Harmlessness: 8")]
    rows = tmp_path / "answers.jsonl"
    rows.write_text(json.dumps({"prompt": "q", "answer": "a"}) + "\n"
                    + json.dumps({"prompt": "q2", "answer": None}) + "\n")
    out = tmp_path / "scores.json"
    assert main(["scorers", "judge", str(rows), "--base-url", server.url, "--model", "m",
                 "--cache-dir", str(tmp_path / "c"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["scores"] == {"judge_helpful": [7.0, None], "judge_harmless": [8.0, None]}
    assert result["counters"]["requests"] == 2 and result["means"]["judge_helpful"] == 7.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q"}\n')
    assert main(["scorers", "judge", str(bad), "--base-url", server.url, "--model", "m"]) == 2
    assert "bad.jsonl:1: expected" in capsys.readouterr().err
