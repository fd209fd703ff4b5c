"""Fast-mode rate-limit state, per account, as the decision sees it (`ratelimit.*`).

The runtime integrations feed it from the `anthropic-fast-*` response headers and
from 429s; `snapshot()` turns it into features. State is keyed by an account id
(a hash of the API key, or a workspace name), never by the raw key.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["FastRateLimit", "RateLimitStore", "account_id"]


def account_id(api_key: str | None = None, workspace: str | None = None) -> str:
    """A stable, non-reversible id for rate-limit state: the workspace, else a hash of the key."""
    if workspace:
        return f"ws:{workspace}"
    if api_key:
        return "key:" + hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:16]
    return "default"


@dataclass(slots=True)
class FastRateLimit:
    """What the last response (or a test) said about one account's fast-mode limits."""

    input_tokens_limit: int | None = None
    input_tokens_remaining: int | None = None
    output_tokens_limit: int | None = None
    output_tokens_remaining: int | None = None
    reset_at: float | None = None
    """Epoch seconds when the limits are fully replenished."""
    last_429_at: float | None = None
    retry_after_until: float | None = None
    observed_at: float = 0.0


class RateLimitStore:
    """In-process rate-limit state for every account seen."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: dict[str, FastRateLimit] = {}

    def update(self, account: str, now: float | None = None, **values: Any) -> None:
        """Set some fields of an account's state (the others keep their values)."""
        known = {f.name for f in fields(FastRateLimit)}
        unknown = set(values) - known
        if unknown:
            raise TypeError(f"unknown rate-limit fields: {', '.join(sorted(unknown))}")
        with self._lock:
            state = self._state.setdefault(account, FastRateLimit())
            for name, value in values.items():
                setattr(state, name, value)
            state.observed_at = time.time() if now is None else now

    def get(self, account: str) -> FastRateLimit | None:
        return self._state.get(account)

    def snapshot(self, account: str, now: float) -> dict[str, Any]:
        """The `ratelimit` features: only what is known, so `has()` tells known from unknown."""
        state = self._state.get(account)
        if state is None:
            return {}
        features: dict[str, Any] = {}
        for name in ("input_tokens_limit", "input_tokens_remaining", "output_tokens_limit", "output_tokens_remaining"):
            value = getattr(state, name)
            if value is not None:
                features[name] = value
        if state.reset_at is not None:
            features["reset_in_s"] = max(0.0, state.reset_at - now)
        if state.last_429_at is not None:
            features["seconds_since_429"] = max(0.0, now - state.last_429_at)
        return features

    def exhausted(self, account: str, input_tokens: int, now: float) -> bool:
        """Known to be unable to serve this request at fast speed right now."""
        state = self._state.get(account)
        if state is None:
            return False
        if state.retry_after_until is not None and now < state.retry_after_until:
            return True
        if state.input_tokens_remaining is not None and state.input_tokens_remaining < input_tokens:
            return True
        return state.output_tokens_remaining is not None and state.output_tokens_remaining <= 0
