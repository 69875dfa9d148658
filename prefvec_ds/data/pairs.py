"""The canonical preference pair and the direction view (label switching)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

Messages = tuple[tuple[str, str], ...]  # ((role, content), ...), ending with a user turn


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with a preferred and a dispreferred response (the + orientation)."""

    prompt: Messages
    chosen: str
    rejected: str
    origin: str = ""
    """`file:row` of the source row, for error messages."""
    chosen_safe: bool | None = None
    """Safety label of the chosen response (PKU `is_response_X_safe`); None = unlabelled.
    Used by the cost model's sign term; not part of key()."""
    rejected_safe: bool | None = None
    """Safety label of the rejected response; None = unlabelled."""

    def key(self) -> str:
        """Order-free identity (prompt + both responses): the same pair under every label."""
        lo, hi = sorted((self.chosen, self.rejected))
        text = "\x1e".join(f"{r}\x1f{c}" for r, c in self.prompt) + "\x1d" + lo + "\x1d" + hi
        return hashlib.sha1(text.encode()).hexdigest()

    def messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.prompt]


def user_prompt(text: str) -> Messages:
    return (("user", text),)


def is_held_out(key: str, fraction: float) -> bool:
    """Deterministic held-out split by the order-free pair key (PreferencePair.key()): the + and
    - runs of a preference hold out exactly the same pairs."""
    return int(key[:8], 16) / 0xFFFFFFFF < fraction
