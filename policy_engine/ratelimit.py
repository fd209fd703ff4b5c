"""Fast-mode rate-limit state, per account, as the decision sees it (`ratelimit.*`).

The runtime integrations feed it from the `anthropic-fast-*` response headers and
from 429s (`RateLimitStore.record`); `snapshot()` turns it into features. State is
keyed by an account id (a hash of the API key, or a workspace name), never by the
raw key.

Fast mode replenishes its limits continuously rather than all at once at the reset
time, so between two responses the store models each limit as a token bucket: the
remaining count observed in the last response grows linearly until it reaches the
limit at the advertised reset time (or at `limit` per minute when no reset time was
given). A `ratelimit.input_tokens_remaining` read ten seconds after a response is
therefore what the API would have said then, not a stale number.

Headers that do not parse are ignored, each with a `policy_engine.ratelimit.bad_header`
event (see `telemetry.record_event`); recording never raises.
"""

from __future__ import annotations

import email.utils
import hashlib
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any, Final

from . import telemetry
from ._fork import renew_in_child
from ._mypyc import mypyc_attr

__all__ = ["FastRateLimit", "RateLimitStore", "account_id", "parse_headers", "parse_retry_after", "HEADERS"]

HEADERS = (
    "anthropic-fast-input-tokens-limit",
    "anthropic-fast-input-tokens-remaining",
    "anthropic-fast-input-tokens-reset",
    "anthropic-fast-output-tokens-limit",
    "anthropic-fast-output-tokens-remaining",
    "anthropic-fast-output-tokens-reset",
)
_COUNT_FIELDS = {
    "anthropic-fast-input-tokens-limit": "input_tokens_limit",
    "anthropic-fast-input-tokens-remaining": "input_tokens_remaining",
    "anthropic-fast-output-tokens-limit": "output_tokens_limit",
    "anthropic-fast-output-tokens-remaining": "output_tokens_remaining",
}
_RESET_FIELDS = {
    "anthropic-fast-input-tokens-reset": "input_reset_at",
    "anthropic-fast-output-tokens-reset": "output_reset_at",
}
_BAD_HEADER_EVENT: Final = "policy_engine.ratelimit.bad_header"
# The documented limits are per minute: without a reset time, that is the refill rate.
_WINDOW_S: Final = 60.0


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
    """Epoch seconds when the limits are fully replenished (the later of the two resets)."""
    last_429_at: float | None = None
    retry_after_until: float | None = None
    observed_at: float = 0.0
    input_reset_at: float | None = None
    output_reset_at: float | None = None

    def input_remaining_at(self, now: float) -> int | None:
        """Input tokens left at `now`, replenished since the observation."""
        return _replenished(self.input_tokens_remaining, self.input_tokens_limit,
                            self.input_reset_at if self.input_reset_at is not None else self.reset_at,
                            self.observed_at, now)

    def output_remaining_at(self, now: float) -> int | None:
        """Output tokens left at `now`, replenished since the observation."""
        return _replenished(self.output_tokens_remaining, self.output_tokens_limit,
                            self.output_reset_at if self.output_reset_at is not None else self.reset_at,
                            self.observed_at, now)


def _replenished(remaining: int | None, limit: int | None, reset_at: float | None, observed_at: float,
                 now: float) -> int | None:
    if remaining is None or limit is None or now <= observed_at or remaining >= limit:
        return remaining
    if reset_at is not None and reset_at > observed_at:
        if now >= reset_at:
            return limit
        rate = (limit - remaining) / (reset_at - observed_at)
    else:
        rate = limit / _WINDOW_S
    return min(limit, remaining + int(rate * (now - observed_at)))


_COUNT, _RESET, _RETRY_AFTER = 0, 1, 2
# What each header the store reads is, by lower-case name as str and as bytes (httpx keeps bytes).
_SPECS: Final[dict[str | bytes, tuple[str, int, str]]] = {}
for _name, _kind, _field in (*((n, _COUNT, f) for n, f in _COUNT_FIELDS.items()),
                             *((n, _RESET, f) for n, f in _RESET_FIELDS.items()),
                             ("retry-after", _RETRY_AFTER, "retry_after_until")):
    _SPECS[_name] = _SPECS[_name.encode("ascii")] = (_name, _kind, _field)


def parse_headers(headers: Mapping[str, str] | Any, now: float) -> tuple[dict[str, Any], list[str]]:
    """The `FastRateLimit` fields a response's fast-mode headers and `retry-after` give, and the
    names of malformed headers.

    One pass over the headers. httpx (and httpx2) Headers keep (raw key, lower-case key,
    value) bytes: each lower-case key is looked up as it is, and values are read as bytes
    (`int()` takes them), since their `items()`, `raw` and each case-insensitive `get()`
    decode, copy or scan the whole list. A name given twice: the last one counts.
    """
    entries = getattr(headers, "_list", None)
    if type(entries) is not list:  # anything else is brought to the same shape
        raw_pairs = getattr(headers, "raw", None)
        entries = ([(None, key.lower(), value) for key, value in raw_pairs] if isinstance(raw_pairs, list)
                   else [(None, str(key).lower(), value if type(value) is str else str(value))
                         for key, value in headers.items()])
    spec_of = _SPECS.get
    values: dict[str, Any] = {}
    bad: list[str] = []
    for _, key, raw in entries:
        spec = spec_of(key)
        if spec is None:
            continue
        name, kind, field_name = spec
        if kind == _COUNT:
            try:
                count = int(raw)  # int() itself allows surrounding blanks, and takes bytes
            except ValueError:
                count = -1
            if count >= 0:
                values[field_name] = count
                continue
        elif kind == _RESET:
            try:
                values[field_name] = _parse_rfc3339(raw)
                continue
            except (ValueError, OverflowError, OSError):
                pass
        else:
            retry_after = parse_retry_after(raw.decode("latin-1") if type(raw) is bytes else raw, now)
            if retry_after is not None:
                values[field_name] = now + retry_after
                continue
        values.pop(field_name, None)  # the last value given is the one that counts, even a bad one
        bad.append(name)
    return values, bad


def parse_retry_after(value: str | None, now: float) -> float | None:
    """`retry-after` in seconds (a number, or an HTTP date); None when absent or malformed."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        parsed = email.utils.parsedate_tz(text)
        if parsed is None:
            return None
        seconds = email.utils.mktime_tz(parsed) - now
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return None
    return max(0.0, seconds)


_reset_cache: Final[dict[str | bytes, float]] = {}


def _parse_rfc3339(raw: str | bytes) -> float:
    # Every response of a second carries the same reset time: parse each value once.
    cached = _reset_cache.get(raw)
    if cached is not None:
        return cached
    text: str = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    value = datetime.fromisoformat(text.strip().replace("z", "Z").replace("Z", "+00:00"))
    if value.tzinfo is None:  # RFC 3339 requires an offset; a bare time is taken as UTC
        value = value.replace(tzinfo=timezone.utc)
    if len(_reset_cache) >= 256:
        _reset_cache.clear()
    epoch = _reset_cache[raw] = value.timestamp()
    return epoch


@mypyc_attr(allow_interpreted_subclasses=True)  # RedisRateLimitStore shares it across processes
class RateLimitStore:
    """In-process rate-limit state for every account seen."""

    def __init__(self, clock: Any = time.time) -> None:
        self._lock = threading.Lock()
        self._state: dict[str, FastRateLimit] = {}
        self._clock = clock
        self._renewal: object = renew_in_child(self._renew_lock)

    def _renew_lock(self) -> None:
        # In a forked child: a parent thread may have held the lock at the fork. The state stays.
        self._lock = threading.Lock()

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
            state.observed_at = self._clock() if now is None else now

    def record(self, account: str, headers: Mapping[str, str] | Any, *, rate_limited: bool = False,
               now: float | None = None) -> bool:
        """Take in one response's fast-mode headers (and, for a fast-mode 429, `retry-after`).

        Returns whether anything was recorded. Malformed headers are skipped with a warning
        event; this never raises on header content.
        """
        now = self._clock() if now is None else now
        values, bad = parse_headers(headers, now)
        for name in bad:
            telemetry.record_event(_BAD_HEADER_EVENT, {"policy_engine.header": name})
        if not rate_limited:
            # A retry-after on anything but a fast 429 is about some other limit.
            values.pop("retry_after_until", None)
        else:
            values["last_429_at"] = now
        if not values:
            return False
        input_reset, output_reset = values.get("input_reset_at"), values.get("output_reset_at")
        with self._lock:
            state = self._state.get(account)
            if state is None:
                state = self._state[account] = FastRateLimit()
            else:
                # Bring the buckets to `now` before moving `observed_at`, so fields this response
                # does not mention keep the replenishment they earned; fresh counts then replace them.
                if "input_tokens_remaining" not in values:
                    state.input_tokens_remaining = state.input_remaining_at(now)
                if "output_tokens_remaining" not in values:
                    state.output_tokens_remaining = state.output_remaining_at(now)
            for name, value in values.items():
                setattr(state, name, value)
            if input_reset is not None or output_reset is not None:
                state.reset_at = (input_reset if output_reset is None else output_reset if input_reset is None
                                  else max(input_reset, output_reset))
            state.observed_at = now
        return True

    def get(self, account: str) -> FastRateLimit | None:
        return self._state.get(account)

    def snapshot(self, account: str, now: float) -> dict[str, Any]:
        """The `ratelimit` features: only what is known, so `has()` tells known from unknown."""
        state = self._state.get(account)
        if state is None:
            return {}
        features: dict[str, Any] = {}
        if state.input_tokens_limit is not None:
            features["input_tokens_limit"] = state.input_tokens_limit
        if state.output_tokens_limit is not None:
            features["output_tokens_limit"] = state.output_tokens_limit
        remaining = state.input_remaining_at(now)
        if remaining is not None:
            features["input_tokens_remaining"] = remaining
        remaining = state.output_remaining_at(now)
        if remaining is not None:
            features["output_tokens_remaining"] = remaining
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
        # A bucket only refills: what was left when observed is enough, it is still enough now.
        remaining = state.input_tokens_remaining
        if remaining is not None and remaining < input_tokens:
            remaining = state.input_remaining_at(now)
            if remaining is not None and remaining < input_tokens:
                return True
        remaining = state.output_tokens_remaining
        if remaining is not None and remaining <= 0:
            remaining = state.output_remaining_at(now)
            return remaining is not None and remaining <= 0
        return False
