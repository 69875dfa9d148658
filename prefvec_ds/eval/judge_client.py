"""The judge's HTTP side: chat completions on an OpenAI-compatible server, bounded and retried.

One `ChatClient` per `JudgeScorer.score` call: an httpx.AsyncClient whose requests pass a
semaphore (at most `max_concurrency` in flight), retried with exponential backoff on HTTP 429,
408 and 5xx, timeouts and connection errors. Any other 4xx is the caller's mistake (wrong model
name, bad key) and stops at once with the server's own message. Everything is counted in
`JudgeCounters`, which the scorer reports with its scores.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, fields

from prefvec_ds import PrefvecError

RETRY_AFTER_CAP_S = 60.0  # a server asking for longer than a minute is treated as down


class RequestFailed(Exception):
    """One request still failed after every retry (message: the last error)."""


@dataclass
class JudgeCounters:
    """What judging cost; summed over calls by the scorer (`counters`), per call in `last`."""

    pairs: int = 0
    """Distinct (prompt, answer) pairs asked for (a repeated pair is judged once per call)."""
    requests: int = 0
    """HTTP requests sent, retries included."""
    cache_hits: int = 0
    """Pairs whose rating came from the disk cache (no request)."""
    reference_cache_hits: int = 0
    """Reference answers read from the disk cache instead of asked for."""
    retries: int = 0
    """Requests repeated after a 429 / 5xx / timeout / connection error."""
    parse_retries: int = 0
    """Ratings asked again because the first reply could not be parsed."""
    failures: int = 0
    """Pairs left unscored because a request failed after every retry."""
    unparseable: int = 0
    """Pairs left unscored because neither reply held two ratings from 1 to 10."""
    prompt_tokens: int = 0
    """Sum of the server's usage.prompt_tokens."""
    completion_tokens: int = 0
    """Sum of the server's usage.completion_tokens."""
    peak_in_flight: int = 0
    """Most requests in flight at once (never above max_concurrency)."""
    wall_s: float = 0.0
    """Seconds spent judging."""

    def add(self, other: "JudgeCounters") -> None:
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            setattr(self, f.name, max(mine, theirs) if f.name == "peak_in_flight"
                    else mine + theirs)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def line(self) -> str:
        return (f"{self.pairs} pairs: {self.requests} requests ({self.retries} retries, "
                f"{self.parse_retries} parse retries), {self.cache_hits} cache hits, "
                f"{self.failures} failed, {self.unparseable} unparseable, tokens "
                f"{self.prompt_tokens} prompt + {self.completion_tokens} completion, "
                f"{self.wall_s:.1f} s")


def _retryable(status: int) -> bool:
    return status in (408, 429) or status >= 500


def _retry_after(headers) -> float | None:
    try:
        return min(float(headers.get("retry-after", "")), RETRY_AFTER_CAP_S)
    except ValueError:
        return None


class ChatClient:
    """`await chat(messages, max_tokens)` -> the reply text; use as `async with`."""

    def __init__(self, cfg, api_key: str, counters: JudgeCounters):
        self.cfg = cfg
        self.api_key = api_key
        self.counters = counters
        self.semaphore = asyncio.Semaphore(cfg.max_concurrency)
        self.in_flight = 0
        self.http = None

    async def __aenter__(self):
        import httpx  # noqa: PLC0415 (only the judge needs it)

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=self.cfg.max_concurrency)
        self.http = httpx.AsyncClient(base_url=self.cfg.base_url.rstrip("/") + "/",
                                      headers=headers, timeout=self.cfg.timeout_s,
                                      limits=limits)
        return self

    async def __aexit__(self, *exc):
        await self.http.aclose()

    async def _post(self, body: dict):
        """One attempt: the response, or the text of a transport error."""
        import httpx  # noqa: PLC0415

        async with self.semaphore:
            self.in_flight += 1
            self.counters.requests += 1
            self.counters.peak_in_flight = max(self.counters.peak_in_flight, self.in_flight)
            try:
                return await self.http.post("chat/completions", json=body)
            except httpx.TimeoutException:
                return f"timed out after {self.cfg.timeout_s} s"
            except httpx.TransportError as err:
                return f"{type(err).__name__}: {err or 'connection lost'}"
            finally:
                self.in_flight -= 1

    async def chat(self, messages: list[dict], max_tokens: int) -> str:
        body = {"model": self.cfg.model, "messages": messages, "max_tokens": max_tokens,
                "temperature": self.cfg.temperature}
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self.counters.retries += 1
            resp = await self._post(body)
            if not isinstance(resp, str) and resp.status_code == 200:
                return self._reply(resp)
            if isinstance(resp, str):
                last, wait = resp, None
            elif _retryable(resp.status_code):
                last, wait = f"HTTP {resp.status_code}: {resp.text[:200]}", \
                    _retry_after(resp.headers)
            else:
                raise PrefvecError(f"judge {self.cfg.base_url}: HTTP {resp.status_code} for "
                                   f"model {self.cfg.model!r}: {resp.text[:300]} (check "
                                   "base_url, model and api_key_env)")
            if attempt < self.cfg.max_retries:
                await asyncio.sleep(wait if wait is not None
                                    else self.cfg.backoff_s * 2 ** attempt)
        raise RequestFailed(f"{last} (after {self.cfg.max_retries} retries)")

    def _reply(self, resp) -> str:
        try:
            payload = resp.json()
            content = payload["choices"][0]["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise PrefvecError(f"judge {self.cfg.base_url}: not an OpenAI chat completion: "
                               f"{resp.text[:200]!r}") from None
        usage = payload.get("usage") or {}
        self.counters.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.counters.completion_tokens += int(usage.get("completion_tokens") or 0)
        return content

