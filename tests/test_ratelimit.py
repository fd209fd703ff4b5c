"""Fast rate-limit state: the six headers, retry-after, token-bucket replenishment, malformed input."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import httpx
import pytest

from policy_engine.ratelimit import RateLimitStore, account_id, parse_headers, parse_retry_after
from tests._emulator import event_count

T0 = datetime(2026, 3, 2, 12, 0, 0, tzinfo=timezone.utc).timestamp()


def fast_headers(input_remaining: int = 1_000, output_remaining: int = 100, reset_s: float = 30.0,
                 **extra: str) -> dict[str, str]:
    reset = datetime.fromtimestamp(T0 + reset_s, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "anthropic-fast-input-tokens-limit": "10000",
        "anthropic-fast-input-tokens-remaining": str(input_remaining),
        "anthropic-fast-input-tokens-reset": reset,
        "anthropic-fast-output-tokens-limit": "1000",
        "anthropic-fast-output-tokens-remaining": str(output_remaining),
        "anthropic-fast-output-tokens-reset": reset,
        **extra,
    }


def test_all_six_headers_are_read() -> None:
    store = RateLimitStore()
    assert store.record("a", httpx.Headers(fast_headers()), now=T0)
    assert store.snapshot("a", T0) == {
        "input_tokens_limit": 10_000, "input_tokens_remaining": 1_000,
        "output_tokens_limit": 1_000, "output_tokens_remaining": 100, "reset_in_s": 30.0,
    }
    state = store.get("a")
    assert state is not None and state.input_reset_at == T0 + 30 and state.output_reset_at == T0 + 30


def test_header_names_are_case_insensitive_in_plain_dicts() -> None:
    store = RateLimitStore()
    store.record("a", {k.upper(): v for k, v in fast_headers().items()}, now=T0)
    assert store.snapshot("a", T0)["input_tokens_remaining"] == 1_000


def test_httpx_headers_read_the_same_as_a_dict_whatever_the_case() -> None:
    headers = {**fast_headers(), "anthropic-fast-input-tokens-remaining": " 250 ",
               "anthropic-fast-output-tokens-limit": "many", "retry-after": "3", "x-other": "1"}
    from_httpx = parse_headers(httpx.Headers({k.title(): v for k, v in headers.items()}), T0)
    assert from_httpx == parse_headers(headers, T0)
    values, bad = from_httpx
    assert values["input_tokens_remaining"] == 250 and values["retry_after_until"] == T0 + 3
    assert bad == ["anthropic-fast-output-tokens-limit"] and "output_tokens_limit" not in values


def test_a_header_given_twice_counts_with_its_last_value() -> None:
    pairs = [("anthropic-fast-input-tokens-remaining", "5"), ("Anthropic-Fast-Input-Tokens-Remaining", "7"),
             ("anthropic-fast-output-tokens-remaining", "9"), ("anthropic-fast-output-tokens-remaining", "nine")]
    values, bad = parse_headers(httpx.Headers(pairs), T0)
    assert values == {"input_tokens_remaining": 7} and bad == ["anthropic-fast-output-tokens-remaining"]


def test_rfc3339_offsets_and_fractions() -> None:
    values, bad = parse_headers({"anthropic-fast-input-tokens-reset": "2026-03-02T13:00:30.5+01:00"}, T0)
    assert bad == [] and values["input_reset_at"] == T0 + 30.5


def test_buckets_replenish_linearly_until_the_reset_time() -> None:
    store = RateLimitStore()
    store.record("a", fast_headers(input_remaining=1_000, output_remaining=100, reset_s=30), now=T0)
    # 9,000 input tokens come back over 30 s: 300 per second.
    assert store.snapshot("a", T0 + 10)["input_tokens_remaining"] == 4_000
    assert store.snapshot("a", T0 + 10)["output_tokens_remaining"] == 400
    assert store.snapshot("a", T0 + 10)["reset_in_s"] == 20.0
    assert store.snapshot("a", T0 + 31)["input_tokens_remaining"] == 10_000
    assert store.snapshot("a", T0 + 3_600)["output_tokens_remaining"] == 1_000


def test_without_a_reset_time_the_bucket_refills_at_the_limit_per_minute() -> None:
    store = RateLimitStore()
    store.record("a", {"anthropic-fast-input-tokens-limit": "6000", "anthropic-fast-input-tokens-remaining": "0"}, now=T0)
    assert store.snapshot("a", T0 + 1)["input_tokens_remaining"] == 100
    assert store.snapshot("a", T0 + 120)["input_tokens_remaining"] == 6_000


def test_exhaustion_follows_the_replenished_bucket() -> None:
    store = RateLimitStore()
    store.record("a", fast_headers(input_remaining=0, output_remaining=0, reset_s=30), now=T0)
    assert store.exhausted("a", 500, T0)
    assert store.exhausted("a", 500, T0 + 1)  # 300 input tokens back: not enough for 500
    assert not store.exhausted("a", 500, T0 + 2)
    assert not store.exhausted("other", 500, T0)


def test_a_fast_429_records_retry_after_and_the_time_of_the_429() -> None:
    store = RateLimitStore()
    store.record("a", {"retry-after": "7"}, rate_limited=True, now=T0)
    snapshot = store.snapshot("a", T0 + 2)
    assert snapshot == {"seconds_since_429": 2.0}
    assert store.exhausted("a", 1, T0 + 6.9)
    assert not store.exhausted("a", 1, T0 + 7.1)


def test_retry_after_on_other_responses_is_not_a_fast_limit() -> None:
    store = RateLimitStore()
    assert not store.record("a", {"retry-after": "30"}, now=T0)
    assert store.get("a") is None


def test_retry_after_as_an_http_date() -> None:
    assert parse_retry_after("Mon, 02 Mar 2026 12:00:05 GMT", T0) == 5.0
    assert parse_retry_after("1.5", T0) == 1.5
    assert parse_retry_after("-3", T0) == 0.0
    assert parse_retry_after("soon", T0) is None
    assert parse_retry_after("nan", T0) is None


def test_a_later_response_replaces_the_counts_and_keeps_the_other_fields() -> None:
    store = RateLimitStore()
    store.record("a", fast_headers(input_remaining=0, output_remaining=0, reset_s=60), now=T0)
    store.record("a", {"anthropic-fast-input-tokens-remaining": "9000"}, now=T0 + 30)
    snapshot = store.snapshot("a", T0 + 30)
    assert snapshot["input_tokens_remaining"] == 9_000
    assert snapshot["output_tokens_remaining"] == 500  # replenished half way, carried forward
    assert snapshot["reset_in_s"] == 30.0


@pytest.mark.parametrize("name,value", [
    ("anthropic-fast-input-tokens-remaining", "lots"),
    ("anthropic-fast-input-tokens-limit", "-5"),
    ("anthropic-fast-output-tokens-reset", "tomorrow"),
    ("anthropic-fast-output-tokens-reset", "2026-13-45T99:00:00Z"),
    ("retry-after", "whenever"),
])
def test_malformed_headers_are_ignored_with_a_warning_metric(name: str, value: str, telemetry: Any) -> None:
    store = RateLimitStore()
    headers = {**fast_headers(), name: value}
    assert store.record("a", headers, rate_limited=True, now=T0)  # the good headers still count
    assert event_count(telemetry, "policy_engine.ratelimit.bad_header") == 1
    snapshot = store.snapshot("a", T0)
    good = parse_headers(fast_headers(), T0)[0]
    field = {"anthropic-fast-input-tokens-remaining": "input_tokens_remaining",
             "anthropic-fast-input-tokens-limit": "input_tokens_limit"}.get(name)
    if field is not None:
        assert field not in snapshot
    assert snapshot["output_tokens_limit"] == good["output_tokens_limit"]


def test_update_keeps_the_test_runner_api() -> None:
    store = RateLimitStore()
    store.update("default", now=T0, input_tokens_remaining=5, reset_at=T0 + 10, last_429_at=T0 - 4)
    assert store.snapshot("default", T0) == {"input_tokens_remaining": 5, "reset_in_s": 10.0, "seconds_since_429": 4.0}
    with pytest.raises(TypeError, match="unknown rate-limit fields: bogus"):
        store.update("default", bogus=1)


def test_account_ids_never_hold_the_key() -> None:
    key = "sk-ant-api03-secret"
    ident = account_id(api_key=key)
    assert key not in ident and ident.startswith("key:") and ident == account_id(api_key=key)
    assert account_id(workspace="research") == "ws:research"
    assert account_id() == "default"
