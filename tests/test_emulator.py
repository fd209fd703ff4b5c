"""The local Messages API emulator reproduces the documented fast-mode behaviour (raw HTTP)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from policy_engine.ratelimit import parse_headers
from policy_engine.testing.emulator import Emulator, count_request_tokens, count_text_tokens, running
from tests._emulator import emulator, messages_params  # noqa: F401 - fixture

BASE_HEADERS = {"x-api-key": "test-key", "anthropic-version": "2023-06-01"}
FAST = {"anthropic-beta": "fast-mode-2026-02-01"}


@pytest.fixture
def http(emulator: Emulator) -> Iterator[httpx.Client]:  # noqa: F811 - pytest fixture injection
    with httpx.Client(base_url=emulator.url, headers=BASE_HEADERS, timeout=10) as client:
        yield client


def post(http: httpx.Client, params: dict[str, Any], headers: dict[str, str] | None = None,
         path: str = "/v1/messages") -> httpx.Response:
    return http.post(path, json=params, headers=headers or {})


def test_tokenizer_is_deterministic() -> None:
    assert count_text_tokens("Hello, world!") == 4
    params = messages_params("Hello, world!", system="Be brief.")
    assert count_request_tokens(params) == 3 + 3 + 4  # system, message overhead, text


def test_standard_request_reports_usage_and_speed(http: httpx.Client) -> None:
    response = post(http, messages_params("one two three"))
    assert response.status_code == 200
    body = response.json()
    assert body["type"] == "message" and body["content"][0]["type"] == "text"
    assert body["usage"]["speed"] == "standard"
    assert body["usage"]["input_tokens"] == 3 + 3
    assert body["usage"]["output_tokens"] == 16 == count_text_tokens(body["content"][0]["text"])
    assert "anthropic-fast-input-tokens-limit" not in response.headers


def test_fast_request_needs_the_beta_header(http: httpx.Client) -> None:
    response = post(http, messages_params(speed="fast"))
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "fast-mode-2026-02-01" in response.json()["error"]["message"]
    ok = post(http, messages_params(speed="fast"), {"anthropic-beta": "other-beta, fast-mode-2026-02-01"})
    assert ok.status_code == 200 and ok.json()["usage"]["speed"] == "fast"


@pytest.mark.parametrize("params,extra,fragment", [
    (messages_params(speed="turbo"), FAST, "speed"),
    (messages_params(model="claude-sonnet-4-6", speed="fast"), FAST, "not supported"),
    (messages_params(speed="fast", service_tier="priority"), FAST, "Priority Tier"),
    ({"model": "claude-opus-4-6", "messages": [{"role": "user", "content": "x"}]}, {}, "max_tokens"),
])
def test_invalid_requests_get_a_400(http: httpx.Client, params: dict[str, Any], extra: dict[str, str], fragment: str) -> None:
    response = post(http, params, extra)
    assert response.status_code == 400 and fragment in response.json()["error"]["message"]


def test_priority_tier_accounts_cannot_use_fast_on_auto(emulator: Emulator, http: httpx.Client) -> None:  # noqa: F811
    emulator.configure(priority_tier=True)
    assert post(http, messages_params(speed="fast"), FAST).status_code == 400
    assert post(http, messages_params(speed="fast", service_tier="standard_only"), FAST).status_code == 200


def test_unknown_models_are_404_and_missing_auth_is_401(emulator: Emulator, http: httpx.Client) -> None:  # noqa: F811
    assert post(http, messages_params(model="claude-nope")).status_code == 404
    response = httpx.post(f"{emulator.url}/v1/messages", json=messages_params(), headers={"anthropic-version": "2023-06-01"})
    assert response.status_code == 401


def test_batches_refuse_fast(http: httpx.Client) -> None:
    batch = {"requests": [{"custom_id": "a", "params": messages_params()},
                          {"custom_id": "b", "params": messages_params(speed="fast")}]}
    response = post(http, batch, FAST, path="/v1/messages/batches")
    assert response.status_code == 400 and "requests.1.params" in response.json()["error"]["message"]
    batch["requests"].pop()
    assert post(http, batch, path="/v1/messages/batches").json()["type"] == "message_batch"


def test_count_tokens(http: httpx.Client) -> None:
    params = {"model": "claude-opus-4-6", "messages": [{"role": "user", "content": "a b c"}]}
    assert post(http, params, path="/v1/messages/count_tokens").json() == {"input_tokens": 6}


def test_fast_buckets_send_the_six_headers_and_429_with_retry_after(emulator: Emulator, http: httpx.Client) -> None:  # noqa: F811
    emulator.configure(fast_input_tokens_per_minute=600, fast_output_tokens_per_minute=40)
    fast = messages_params("a b c", max_tokens=30, speed="fast")
    first = post(http, fast, FAST)
    assert first.status_code == 200
    values, bad = parse_headers(first.headers, time.time())
    assert bad == []
    assert values["input_tokens_limit"] == 600 and values["output_tokens_limit"] == 40
    assert values["input_tokens_remaining"] == 600 - 6 and values["output_tokens_remaining"] == 40 - 16
    assert values["output_reset_at"] > time.time()
    # 8 output tokens left after another request: the third cannot fit.
    assert post(http, fast, FAST).status_code == 200
    limited = post(http, fast, FAST)
    assert limited.status_code == 429
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert "anthropic-fast-output-tokens-remaining" in limited.headers
    # Standard speed has its own limits: unaffected.
    assert post(http, messages_params("a b c", max_tokens=30)).status_code == 200


def test_the_prompt_cache_is_keyed_by_speed(http: httpx.Client) -> None:
    system = [{"type": "text", "text": "You are a careful assistant. " * 20, "cache_control": {"type": "ephemeral"}}]
    params = messages_params("question", system=system)
    usage = [post(http, {**params, "speed": speed}, FAST).json()["usage"]
             for speed in ("standard", "standard", "fast", "fast", "standard")]
    prefix = count_text_tokens(system[0]["text"])
    assert [u["cache_creation_input_tokens"] for u in usage] == [prefix, 0, prefix, 0, 0]
    assert [u["cache_read_input_tokens"] for u in usage] == [0, prefix, 0, prefix, prefix]
    assert [u["speed"] for u in usage] == ["standard", "standard", "fast", "fast", "standard"]
    assert all(u["input_tokens"] == 3 + 1 for u in usage)


def test_a_speed_switch_misses_the_cache(http: httpx.Client) -> None:
    system = [{"type": "text", "text": "Context " * 50, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    standard = messages_params("q", system=system)
    fast = {**standard, "speed": "fast"}
    runs = [post(http, standard).json()["usage"], post(http, fast, FAST).json()["usage"],
            post(http, fast, FAST).json()["usage"], post(http, standard).json()["usage"]]
    assert [u["cache_creation"]["ephemeral_1h_input_tokens"] for u in runs] == [50, 50, 0, 0]
    assert [u["cache_read_input_tokens"] for u in runs] == [0, 0, 50, 50]
    assert [u["speed"] for u in runs] == ["standard", "fast", "fast", "standard"]


def test_minimum_cacheable_prompt(emulator: Emulator, http: httpx.Client) -> None:  # noqa: F811
    emulator.configure(min_cache_tokens=1_024)
    system = [{"type": "text", "text": "short", "cache_control": {"type": "ephemeral"}}]
    usage = post(http, messages_params("q", system=system)).json()["usage"]
    assert usage["cache_creation_input_tokens"] == 0 and usage["input_tokens"] == 1 + 3 + 1


def sse_events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in response.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_streaming_follows_anthropics_event_format(http: httpx.Client) -> None:
    response = post(http, messages_params("stream me", stream=True, speed="fast"), FAST)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert all(name == data["type"] for name, data in events)
    start = events[0][1]["message"]
    assert start["usage"]["speed"] == "fast" and start["usage"]["output_tokens"] == 1
    assert start["usage"]["input_tokens"] == 3 + 2
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert count_text_tokens(text) == 16 == events[-2][1]["usage"]["output_tokens"]
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"


def test_max_tokens_stops_the_output(http: httpx.Client) -> None:
    body = post(http, messages_params(max_tokens=5)).json()
    assert body["stop_reason"] == "max_tokens" and body["usage"]["output_tokens"] == 5


def test_fast_output_is_2_5x_the_standard_speed() -> None:
    with Emulator(standard_otps=400, output_tokens=40, delta_tokens=4) as emu, \
            httpx.Client(base_url=emu.url, headers=BASE_HEADERS, timeout=10) as http:
        def elapsed(speed: str) -> float:
            params = messages_params(max_tokens=100, stream=True, speed=speed)
            started = time.perf_counter()
            post(http, params, FAST)
            return time.perf_counter() - started

        standard, fast = elapsed("standard"), elapsed("fast")
    # 40 tokens at 400/s = 100 ms; at 1,000/s = 40 ms.
    assert 0.09 <= standard < 0.5
    assert 0.035 <= fast < standard / 1.8


def test_injected_faults_then_recovery(emulator: Emulator, http: httpx.Client) -> None:  # noqa: F811
    emulator.inject(529, times=2)
    emulator.inject(500, times=1, speed="fast")
    assert [post(http, messages_params()).status_code for _ in range(3)] == [529, 529, 200]
    overloaded = emulator.requests()[0]
    assert overloaded["status"] == 529 and overloaded["usage"] is None
    assert post(http, messages_params(speed="fast"), FAST).status_code == 500
    assert post(http, messages_params(speed="fast"), FAST).status_code == 200


def test_a_hang_outlives_a_client_timeout(emulator: Emulator) -> None:  # noqa: F811
    emulator.inject(None, hang_s=1.0)
    with httpx.Client(base_url=emulator.url, headers=BASE_HEADERS, timeout=0.2) as http:
        with pytest.raises(httpx.ReadTimeout):
            post(http, messages_params())
    with httpx.Client(base_url=emulator.url, headers=BASE_HEADERS, timeout=5) as http:
        assert post(http, messages_params()).status_code == 200


def test_the_control_endpoints(emulator: Emulator, http: httpx.Client) -> None:  # noqa: F811
    post(http, messages_params("secret prompt"))
    received = http.get("/_emulator/requests").json()["requests"]
    assert len(received) == 1
    assert received[0]["headers"]["x-api-key"] == "<redacted>"
    assert received[0]["body"]["messages"][0]["content"] == "secret prompt"
    assert received[0]["usage"]["output_tokens"] == 16
    assert http.get("/_emulator/usage").json()["billed"][0]["model"] == "claude-opus-5"
    assert http.post("/_emulator/faults", json={"status": 529, "times": 1}).status_code == 200
    assert post(http, messages_params()).status_code == 529
    assert http.post("/_emulator/configure", json={"output_tokens": 3}).status_code == 200
    assert post(http, messages_params()).json()["usage"]["output_tokens"] == 3
    assert http.post("/_emulator/configure", json={"bogus": 1}).status_code == 400
    assert http.post("/_emulator/reset").status_code == 200
    assert http.get("/_emulator/requests").json()["requests"] == []


def test_running_yields_a_base_url() -> None:
    with running(standard_otps=None) as base_url:
        response = httpx.post(f"{base_url}/v1/messages", json=messages_params(), headers=BASE_HEADERS)
        assert response.status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{base_url}/v1/messages", json=messages_params(), headers=BASE_HEADERS, timeout=1)
