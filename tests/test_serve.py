"""`policy-engine serve` as a real process in front of the emulator: the proxy's behaviour, its faults,
the decision API, and operations (probes, reload, drain). Clients are the real anthropic SDK, httpx and sockets."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest

from policy_engine.catalog import actual, load_catalog
from policy_engine.cli import main
from policy_engine.ledger.sqlite import SqliteLedger
from policy_engine.schemas import serve_openapi
from policy_engine.serve.headers import client_headers, context_from_headers, upstream_headers

from tests._emulator import emulator, messages_params, write_policy  # noqa: F401 - fixtures
from tests._serve import serving

API_KEY = "sk-test-serve-key"
TENANTS = """
rules:
  - name: background
    when: "!context.interactive"
    speed: standard
  - name: slow-tenant
    when: has(context.tenant) && context.tenant == 'thrifty'
    speed: standard
"""
BUDGET = """
budgets:
  - name: daily
    window: day
    limit_usd: 100
"""


def client(url: str, **options: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=API_KEY, **options)


def policy_headers(response: Any) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("x-policy-")}


def ledger_spent_micro(path: Path) -> int:
    """What the server's SQLite ledger settled (micro-dollars), read from its file."""
    if not path.exists():
        return 0
    ledger = SqliteLedger(path)
    try:
        return sum(ledger.totals().values())
    finally:
        ledger.close()


# -- headers (no server) ----------------------------------------------------------------------

def test_context_headers_are_typed_and_labels_grouped() -> None:
    headers = [("X-Policy-Tenant", "acme"), ("x-policy-latency-slo-ms", "8000"), ("x-policy-interactive", "true"),
               ("x-policy-label-team", "search"), ("x-api-key", "k")]
    assert context_from_headers(headers) == {"tenant": "acme", "latency_slo_ms": 8000, "interactive": True,
                                             "labels": {"team": "search"}}
    # A value that does not read as its type is passed on as it came: the engine refuses it.
    assert context_from_headers([("x-policy-latency-slo-ms", "soon")]) == {"latency_slo_ms": "soon"}
    assert context_from_headers([("accept", "*/*")]) is None


def test_context_and_hop_headers_never_go_upstream() -> None:
    sent = upstream_headers([("x-policy-tenant", "acme"), ("host", "proxy"), ("x-api-key", "k"),
                             ("accept-encoding", "gzip"), ("connection", "keep-alive")], identity=True)
    assert sent == [("x-api-key", "k"), ("accept-encoding", "identity")]
    # So do the headers a Connection header names, either way.
    sent = upstream_headers([("Connection", "keep-alive, X-Hop-Only"), ("x-hop-only", "1"), ("x-api-key", "k")],
                            identity=False)
    assert sent == [("x-api-key", "k")]
    answered = httpx.Headers([(b"connection", b"close, x-upstream-hop"), (b"x-upstream-hop", b"1"),
                              (b"request-id", b"req_1")])
    assert client_headers(answered) == [(b"request-id", b"req_1")]


def test_the_accounts_of_client_credentials_are_remembered_within_a_bound() -> None:
    from policy_engine.decide import load
    from policy_engine.integrations._core import Runtime

    runtime = Runtime(load(Path(__file__).resolve().parents[1] / "policies" / "default.yaml"), observe=False)
    first = runtime.account_from("sk-a")
    for i in range(3_000):  # a client sending a new key with every request
        runtime.account_from(f"sk-random-{i}")
    assert len(runtime._accounts) <= 1_024
    assert runtime.account_from("sk-a") == runtime.account_from("Bearer sk-a") == first  # forgotten, then the same


def test_a_decision_stays_settleable_past_its_reservation_ttl(tmp_path: Path) -> None:
    from policy_engine.decide import load
    from policy_engine.integrations._core import Flight
    from policy_engine.serve.decisions import ApiFailure, DecisionStore

    now = [1000.0]
    store = DecisionStore(ttl_s=600, clock=lambda: now[0])
    decision = load(write_policy(tmp_path)).decide(messages_params())
    late = store.add(Flight(decision, decision.speed, None, now[0]))
    now[0] += 601  # past the TTL: a long response's usage still counts in the ledger, so it is still taken
    assert store.take(late).decision is decision
    gone = store.add(Flight(decision, decision.speed, None, now[0]))
    kept = store.add(Flight(decision, decision.speed, None, now[0] + 120))
    now[0] += 600 + 3600 + 61
    [stale] = store.expired()  # what is over an hour past the TTL, handed to the caller to settle
    assert stale.decision is decision and store.expired() == []  # (looked for once a minute)
    with pytest.raises(ApiFailure) as caught:
        store.take(gone)
    assert caught.value.code == "unknown_decision"
    assert [f.decision for f in store.drain()] == [decision] and len(store) == 0
    with pytest.raises(ApiFailure):
        store.take(kept)


def test_a_decision_nobody_settles_is_counted_at_its_worst_case(tmp_path: Path, emulator: Any) -> None:
    # Handed out to be sent, never settled nor released: expired, or left when the server stops (a client
    # settling later would find no decision), it is settled as an attempt cut short, never dropped.
    from policy_engine.decide import load
    from policy_engine.integrations._core import Flight, Runtime
    from policy_engine.serve.decisions import DecisionApi

    engine = load(write_policy(tmp_path, BUDGET))
    decision = engine.decide(messages_params())
    DecisionApi.settle_unclaimed(Runtime(engine), [Flight(decision, decision.speed, None, 0.0)], "expired")
    assert sum(engine.ledger._reserved.values()) == 0  # type: ignore[attr-defined]
    assert sum(engine.ledger.totals().values()) == actual(load_catalog().model("claude-opus-5"),  # type: ignore[attr-defined]
        {"input_tokens": decision.input_tokens, "output_tokens": decision.max_tokens, "speed": decision.speed})
    ledger = tmp_path / "ledger.sqlite"
    with serving(write_policy(tmp_path, BUDGET), upstream=emulator.url, args=["--ledger-path", str(ledger)]) as server:
        decided = httpx.post(server.url + "/v1/decide", json={"params": messages_params()}).json()
        server.signal(signal.SIGTERM)
        assert server.process.wait(20) in (0, -signal.SIGTERM)
    assert ledger_spent_micro(ledger) == actual(load_catalog().model("claude-opus-5"), {
        "input_tokens": decided["decision"]["input_tokens"], "output_tokens": 64, "speed": "fast"})


# -- the proxy --------------------------------------------------------------------------------

def test_messages_are_decided_by_context_headers_and_answer_with_the_decision(tmp_path: Path, emulator: Any) -> None:
    policy = write_policy(tmp_path, TENANTS)
    with serving(policy, upstream=emulator.url) as server:
        sdk = client(server.url)
        fast = sdk.messages.with_raw_response.create(**messages_params(), extra_headers={
            "x-policy-interactive": "true", "x-policy-tenant": "acme"})
        assert policy_headers(fast) == {"x-policy-speed": "fast", "x-policy-decided-speed": "fast",
                                        "x-policy-rule": "default", "x-policy-outcome": "allowed",
                                        "x-policy-policy": policy_headers(fast)["x-policy-policy"]}
        assert fast.parse().usage.speed == "fast"
        thrifty = sdk.messages.with_raw_response.create(**messages_params(), extra_headers={
            "x-policy-interactive": "true", "x-policy-tenant": "thrifty"})
        assert policy_headers(thrifty)["x-policy-rule"] == "slow-tenant"
        assert sdk.messages.create(**messages_params()).usage.speed == "standard"  # not interactive
    arrived = emulator.requests()
    assert [r["speed"] for r in arrived] == ["fast", "standard", "standard"]
    assert all(not any(k.lower().startswith("x-policy") for k in r.get("headers", {})) for r in arrived)


def test_a_stream_passes_through_and_settles_when_it_ends(tmp_path: Path, emulator: Any) -> None:
    emulator.configure(output_tokens=40, delta_tokens=2, standard_otps=200.0, fast_ratio=2.5)  # ~0.1 s of stream
    ledger = tmp_path / "ledger.sqlite"
    with serving(write_policy(tmp_path, BUDGET), upstream=emulator.url, args=["--ledger-path", str(ledger)]) as server:
        with client(server.url).messages.stream(**messages_params()) as stream:
            pieces = iter(stream.text_stream)
            first = next(pieces)
            assert ledger_spent_micro(ledger) == 0  # under way: reserved, not settled
            text = first + "".join(pieces)
            final = stream.get_final_message()
        assert text and final.usage.speed == "fast" and final.usage.output_tokens == 40
        assert wait_for(lambda: ledger_spent_micro(ledger) == emulator.bill_micro() > 0)  # settled at its end


def wait_for(condition: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_count_tokens_and_other_paths_pass_through_untouched(tmp_path: Path, emulator: Any) -> None:
    with serving(write_policy(tmp_path), upstream=emulator.url) as server:
        counted = client(server.url).messages.count_tokens(model="claude-opus-5",
                                                           messages=[{"role": "user", "content": "Hello there"}])
        assert counted.input_tokens > 0
        models = httpx.get(server.url + "/v1/models", headers={"x-api-key": API_KEY})
        assert models.status_code == emulator_status(emulator, "/v1/models")
        assert "x-policy-speed" not in models.headers


def emulator_status(emulator: Any, path: str) -> int:
    return httpx.get(emulator.url + path, headers={"x-api-key": API_KEY}).status_code


def test_a_batch_never_asks_for_fast_mode(tmp_path: Path, emulator: Any) -> None:
    batch = {"requests": [{"custom_id": "a", "params": {**messages_params(), "speed": "fast"}}]}
    with serving(write_policy(tmp_path), upstream=emulator.url) as server:
        httpx.post(server.url + "/v1/messages/batches", json=batch,
                   headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01"})
    sent = [r for r in emulator.requests() if r.get("path", "").startswith("/v1/messages/batches")]
    assert sent, emulator.requests()
    assert "speed" not in json.dumps(sent[0].get("body", {}))


def test_a_ceiling_refusal_is_an_api_error_the_sdk_does_not_retry(tmp_path: Path, emulator: Any) -> None:
    with serving(write_policy(tmp_path, "ceilings:\n  per_request_usd: 0.0001\n"), upstream=emulator.url) as server:
        with pytest.raises(anthropic.PermissionDeniedError, match="per_request") as caught:
            client(server.url, max_retries=3).messages.create(**messages_params())
        assert caught.value.response.headers["x-policy-error"] == "ceiling_exceeded"
    assert emulator.requests() == []


def test_an_invalid_context_header_is_refused_under_reject(tmp_path: Path, emulator: Any) -> None:
    with serving(write_policy(tmp_path, "on_invalid_context: reject\n"), upstream=emulator.url) as server:
        with pytest.raises(anthropic.BadRequestError, match="latency_slo_ms") as caught:
            client(server.url).messages.create(**messages_params(), extra_headers={"x-policy-latency-slo-ms": "soon"})
        assert caught.value.response.headers["x-policy-error"] == "invalid_context"
        with pytest.raises(anthropic.BadRequestError, match="unknown context key"):
            client(server.url).messages.create(**messages_params(), extra_headers={"x-policy-tenat": "acme"})
    assert emulator.requests() == []


def test_a_fast_429_storm_falls_back_to_standard(tmp_path: Path, emulator: Any) -> None:
    ledger = tmp_path / "ledger.sqlite"
    with serving(write_policy(tmp_path, BUDGET + "on_fast_rate_limited: fallback\n"), upstream=emulator.url,
                 args=["--ledger-path", str(ledger)]) as server:
        emulator.inject(429, speed="fast", times=50, retry_after="30")
        sdk = client(server.url, max_retries=0)
        answers = [policy_headers(sdk.messages.with_raw_response.create(**messages_params())) for _ in range(5)]
    # The first is decided fast and falls back on its 429; the 429's retry-after then keeps the rest at standard.
    assert answers[0]["x-policy-decided-speed"] == "fast" and answers[0]["x-policy-speed"] == "standard"
    assert all(a["x-policy-decided-speed"] == a["x-policy-speed"] == "standard" for a in answers[1:])
    assert {a["x-policy-outcome"] for a in answers[1:]} == {"downgraded"}
    sent = [(r["status"], r["body"].get("speed", "standard")) for r in emulator.requests()]
    assert sent == [(429, "fast")] + [(200, "standard")] * 5
    assert ledger_spent_micro(ledger) == emulator.bill_micro()


def test_the_upstream_down_is_a_502_and_nothing_is_counted(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ledger = tmp_path / "ledger.sqlite"
    with serving(write_policy(tmp_path, BUDGET), upstream=f"http://127.0.0.1:{port}",
                 args=["--ledger-path", str(ledger)]) as server:
        with pytest.raises(anthropic.InternalServerError) as caught:
            client(server.url, max_retries=0).messages.create(**messages_params())
        assert caught.value.status_code == 502
        assert caught.value.response.headers["x-policy-error"] == "upstream_unavailable"
    assert ledger_spent_micro(ledger) == 0  # never reached a server: released


def test_a_slow_upstream_times_out_as_504_counted_at_the_worst_case(tmp_path: Path, emulator: Any) -> None:
    ledger = tmp_path / "ledger.sqlite"
    with serving(write_policy(tmp_path, BUDGET), upstream=emulator.url,
                 args=["--ledger-path", str(ledger), "--upstream-timeout", "0.5"]) as server:
        emulator.inject(None, hang_s=2.0)
        with pytest.raises(anthropic.APIStatusError) as caught:
            client(server.url, max_retries=0).messages.create(**messages_params())
        assert caught.value.status_code == 504
    # The server may still have generated (and billed) it: counted at max_tokens of fast output.
    assert ledger_spent_micro(ledger) >= emulator.bill_micro()
    assert ledger_spent_micro(ledger) > 0


def test_a_client_that_leaves_mid_stream_is_settled_at_the_worst_case(tmp_path: Path, emulator: Any) -> None:
    emulator.configure(output_tokens=400, delta_tokens=1, standard_otps=400.0, fast_ratio=2.5)
    ledger = tmp_path / "ledger.sqlite"
    with serving(write_policy(tmp_path, BUDGET), upstream=emulator.url, args=["--ledger-path", str(ledger)]) as server:
        with httpx.stream("POST", server.url + "/v1/messages", json=messages_params(max_tokens=1000, stream=True),
                          headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}) as response:
            for line in response.iter_lines():
                if "content_block_delta" in line:
                    break  # and close the connection with the stream half read
        assert wait_for(lambda: ledger_spent_micro(ledger) > 0)
    counted = ledger_spent_micro(ledger)
    assert counted >= emulator.bill_micro() > 0  # never less than billed
    assert counted > emulator.bill_micro()  # max_tokens of output: the server may have gone on generating


def _upstream_answering(answer: bytes) -> tuple[str, threading.Thread]:
    """An upstream that reads one request, writes `answer` as it is, and drops the connection."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_one() -> None:
        with listener, listener.accept()[0] as conn:
            received = b""
            while b"\r\n\r\n" not in received:
                received += conn.recv(65536)
            head, _, body = received.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(answer)
            time.sleep(0.2)  # what was written reaches the proxy before the connection drops

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", thread


def _cutting_upstream() -> tuple[str, threading.Thread]:
    """An upstream that answers one stream with its status line and first event, then drops the connection."""
    first = {"type": "message_start", "message": {
        "id": "msg_cut", "type": "message", "role": "assistant", "model": "claude-opus-5", "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 1, "speed": "fast"}}}
    event = f"event: message_start\ndata: {json.dumps(first)}\n\n".encode()
    return _upstream_answering(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                               + b"%x\r\n%s\r\n" % (len(event), event))


def test_a_success_whose_body_cannot_be_decoded_is_a_502_counted_at_the_worst_case(tmp_path: Path) -> None:
    garbage = b"\x1f\x8b\x08\x00not really gzip at all"
    upstream, answering = _upstream_answering(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                              b"content-encoding: gzip\r\ncontent-length: %d\r\n\r\n%s" % (len(garbage), garbage))
    ledger = tmp_path / "ledger.sqlite"
    with serving(write_policy(tmp_path, BUDGET), upstream=upstream, args=["--ledger-path", str(ledger)]) as server:
        with pytest.raises(anthropic.APIStatusError) as caught:
            client(server.url, max_retries=0).messages.create(**messages_params(max_tokens=1000))
        answering.join(5)
        server.stop()
    assert caught.value.status_code == 502
    assert caught.value.response.headers["x-policy-error"] == "upstream_unreadable"
    # A success status says it was billed: counted at max_tokens of fast output, not released.
    fast = load_catalog().model("claude-opus-5").rates("fast", 12)
    assert ledger_spent_micro(ledger) >= 1000 * fast.output // 1_000_000
    assert "Traceback" not in server.stderr(), server.stderr()


def test_an_upstream_cut_mid_stream_cuts_the_client_and_is_counted_at_the_worst_case(tmp_path: Path) -> None:
    upstream, answering = _cutting_upstream()
    ledger = tmp_path / "ledger.sqlite"
    with serving(write_policy(tmp_path, BUDGET), upstream=upstream, args=["--ledger-path", str(ledger)]) as server:
        seen: list[str] = []
        with pytest.raises(httpx.RemoteProtocolError):  # the client learns the stream was cut: no clean end
            with httpx.stream("POST", server.url + "/v1/messages", json=messages_params(max_tokens=1000, stream=True),
                              headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}) as response:
                assert response.status_code == 200
                seen.extend(response.iter_lines())
        answering.join(5)
        assert any("message_start" in line for line in seen)
        assert wait_for(lambda: ledger_spent_micro(ledger) > 0)
        server.stop()
    # The server may have generated up to max_tokens, which nobody saw: counted at max_tokens of fast output.
    fast = load_catalog().model("claude-opus-5").rates("fast", 12)
    assert ledger_spent_micro(ledger) >= 1000 * fast.output // 1_000_000
    log = server.stderr()
    assert "upstream failed mid-stream (RemoteProtocolError" in log, log
    assert "Traceback" not in log, log


@pytest.mark.parametrize("path", ["/v1/x/../messages", "/v1/messages/.", "/v1/./messages", "/v1/x/%2e%2e/messages",
                                  "/v1/messages/count_tokens/..", "/v1//messages", "/v1/messages/", "/v1/messages;x",
                                  "/V1/Messages", "/v1/messages/batches/"])
def test_another_spelling_of_a_metered_path_is_refused_not_passed_on_unmetered(tmp_path: Path, emulator: Any,
                                                                              path: str) -> None:
    body = json.dumps(messages_params(speed="fast")).encode()
    with serving(write_policy(tmp_path, BUDGET), upstream=emulator.url) as server:
        host, port = server.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)  # sends the path as written (httpx resolves it)
        conn.request("POST", path, body, {"x-api-key": API_KEY, "content-type": "application/json"})
        answer = conn.getresponse()
        error = json.loads(answer.read())
        conn.close()
        assert answer.status == 404 and answer.getheader("x-policy-error") == "non_canonical_path"
        assert error["error"]["type"] == "not_found_error" and "/v1/messages" in error["error"]["message"]
        # The usual spelling, with a query, is still decided and metered.
        metered = client(server.url).messages.with_raw_response.create(**messages_params(), extra_query={"beta": "true"})
        assert metered.headers["x-policy-speed"] == "fast"
    assert [r["path"] for r in emulator.requests()] == ["/v1/messages"]


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"model": 5, "messages": "Hi"}'])
def test_a_messages_body_the_engine_cannot_read_goes_as_it_is_and_says_so(tmp_path: Path, emulator: Any,
                                                                         body: bytes) -> None:
    with serving(write_policy(tmp_path), upstream=emulator.url) as server:
        answer = httpx.post(server.url + "/v1/messages", content=body,
                            headers={"x-api-key": API_KEY, "content-type": "application/json"})
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error"  # the API's answer
    assert answer.headers["x-policy-decision"] == "undecidable"


def test_an_oversized_body_is_refused_before_it_is_read(tmp_path: Path, emulator: Any) -> None:
    with serving(write_policy(tmp_path), upstream=emulator.url, args=["--max-body-bytes", "1000"]) as server:
        big = httpx.post(server.url + "/v1/messages", json=messages_params("x" * 5000), headers={"x-api-key": API_KEY})
        assert big.status_code == 413 and big.json()["error"]["type"] == "request_too_large"
    assert emulator.requests() == []


def test_the_api_key_is_never_logged(tmp_path: Path, emulator: Any) -> None:
    with serving(write_policy(tmp_path), upstream=emulator.url, args=["--access-log"]) as server:
        client(server.url).messages.create(**messages_params())
        httpx.post(server.url + "/v1/messages", content=b"{", headers={"x-api-key": API_KEY})
        server.stop()
    assert "POST /v1/messages" in server.stderr()
    assert API_KEY not in server.stderr()


# -- the decision API -------------------------------------------------------------------------

def test_decide_settle_release_round_trip_matches_the_openapi_description(tmp_path: Path, emulator: Any) -> None:
    spec = serve_openapi()
    schemas = spec["components"]["schemas"]

    def valid(body: Any, name: str) -> None:
        assert name in schemas
        jsonschema.validate(body, {"$ref": f"#/components/schemas/{name}", "components": spec["components"]})

    ledger = tmp_path / "ledger.sqlite"
    with serving(write_policy(tmp_path, BUDGET), upstream=emulator.url, args=["--ledger-path", str(ledger)]) as server:
        decided = httpx.post(server.url + "/v1/decide", json={"params": messages_params(), "context": {"tenant": "a"}})
        assert decided.status_code == 200, decided.text
        body = decided.json()
        valid(body, "DecideResponse")
        assert body["speed"] == "fast" and body["params"]["speed"] == "fast"
        assert body["headers"] == {"anthropic-beta": "fast-mode-2026-02-01"}
        # The service sends the request itself, with what the API said ...
        sent = httpx.post(emulator.url + "/v1/messages", json=body["params"],
                          headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01", **body["headers"]}).json()
        settled = httpx.post(server.url + "/v1/settle", json={"decision_id": body["decision_id"], "usage": sent["usage"]})
        assert settled.status_code == 200, settled.text
        valid(settled.json(), "SettleResponse")
        assert settled.json()["speed"] == "fast"
        again = httpx.post(server.url + "/v1/settle", json={"decision_id": body["decision_id"], "usage": sent["usage"]})
        assert again.status_code == 404 and again.json()["error"]["code"] == "unknown_decision"
        valid(again.json(), "ErrorResponse")
        unsent = httpx.post(server.url + "/v1/decide", json={"params": messages_params()}).json()
        released = httpx.post(server.url + "/v1/release", json={"decision_id": unsent["decision_id"]})
        assert released.json() == {"decision_id": unsent["decision_id"], "released": True}
        valid(released.json(), "ReleaseResponse")
    assert ledger_spent_micro(ledger) == emulator.bill_micro()


def test_settling_without_usage_counts_the_worst_case(tmp_path: Path, emulator: Any) -> None:
    ledger = tmp_path / "ledger.sqlite"
    with serving(write_policy(tmp_path, BUDGET), upstream=emulator.url, args=["--ledger-path", str(ledger)]) as server:
        decided = httpx.post(server.url + "/v1/decide", json={"params": messages_params(max_tokens=1000)}).json()
        settled = httpx.post(server.url + "/v1/settle", json={"decision_id": decided["decision_id"], "usage": None})
        assert settled.status_code == 200 and settled.json()["output_tokens"] == 1000


@pytest.mark.parametrize("body, code", [
    (b"not json", "invalid_json"),
    (b'{"params": 3}', "invalid_body"),
    (b'{"params": {}, "extra": 1}', "invalid_body"),
    (b'{"params": {"model": "claude-opus-5", "max_tokens": 10, "messages": []}, "policy": "nope"}', "unknown_policy"),
    (b'{"params": {"model": "claude-opus-5", "max_tokens": 10, "messages": []}, "context": {"tenat": "a"}}',
     "invalid_context"),
])
def test_decision_api_errors_are_json_with_a_code(tmp_path: Path, emulator: Any, body: bytes, code: str) -> None:
    with serving(write_policy(tmp_path, "on_invalid_context: reject\n"), upstream=emulator.url) as server:
        answer = httpx.post(server.url + "/v1/decide", content=body)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == code, answer.text


def test_decision_api_bearer_auth(tmp_path: Path, emulator: Any) -> None:
    with serving(write_policy(tmp_path), upstream=emulator.url, args=["--auth-token-env", "PE_TOKEN"],
                 env={"PE_TOKEN": "s3cret"}) as server:
        body = {"params": messages_params()}
        assert httpx.post(server.url + "/v1/decide", json=body).status_code == 401
        assert httpx.post(server.url + "/v1/decide", json=body, headers={"authorization": "Bearer wrong"}).status_code == 401
        ok = httpx.post(server.url + "/v1/decide", json=body, headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["speed"] == "fast"
        # The proxy is not behind it: clients authenticate to Anthropic with their own key.
        assert client(server.url).messages.create(**messages_params()).usage.speed == "fast"
        # A decision route spelt with a trailing slash is the server's own, never proxied with the token upstream.
        before = len(emulator.requests())
        slash = httpx.post(server.url + "/v1/settle/", json={"decision_id": "x"}, headers={"authorization": "Bearer s3cret"})
        assert slash.status_code in (307, 404) and len(emulator.requests()) == before


def test_the_openapi_file_describes_every_decision_route() -> None:
    spec = json.loads((Path(__file__).parent.parent / "schemas" / "serve-openapi.json").read_text())
    assert spec == serve_openapi()
    assert set(spec["paths"]) == {"/v1/decide", "/v1/settle", "/v1/release", "/healthz", "/readyz"}
    jsonschema.Draft202012Validator.check_schema({"$defs": spec["components"]["schemas"]})


# -- operations -------------------------------------------------------------------------------

def test_probes(tmp_path: Path, emulator: Any) -> None:
    with serving(write_policy(tmp_path), upstream=emulator.url) as server:
        assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
        ready = httpx.get(server.url + "/readyz")
        assert ready.status_code == 200 and ready.json()["policies"] == {"always-fast": ready.json()["policies"]["always-fast"]}


def test_readyz_follows_the_shared_state_and_on_state_unavailable(tmp_path: Path, emulator: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"  # no Redis there
    reject = write_policy(tmp_path, "on_state_unavailable: reject\n", name="reject.yaml")
    with serving(reject, upstream=emulator.url, args=["--redis", dead]) as server:
        ready = httpx.get(server.url + "/readyz")
        assert ready.status_code == 503 and ready.json()["state_reachable"] is False
    standard = write_policy(tmp_path, "on_state_unavailable: standard\n", name="standard.yaml")
    with serving(standard, upstream=emulator.url, args=["--redis", dead]) as server:
        assert httpx.get(server.url + "/readyz").status_code == 200


def test_sighup_reloads_the_policies(tmp_path: Path, emulator: Any) -> None:
    policy = write_policy(tmp_path)
    with serving(policy, upstream=emulator.url) as server:
        sdk = client(server.url)
        assert policy_headers(sdk.messages.with_raw_response.create(**messages_params()))["x-policy-speed"] == "fast"
        policy.write_text(policy.read_text().replace("default: fast", "default: standard"))
        server.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            speed = policy_headers(sdk.messages.with_raw_response.create(**messages_params()))["x-policy-speed"]
            if speed == "standard":
                break
            time.sleep(0.05)
        assert speed == "standard"


def test_sigterm_lets_a_stream_in_flight_finish_and_settles_it(tmp_path: Path, emulator: Any) -> None:
    emulator.configure(output_tokens=60, delta_tokens=1, standard_otps=100.0, fast_ratio=2.5)  # ~0.25 s of stream
    ledger = tmp_path / "ledger.sqlite"
    with serving(write_policy(tmp_path, BUDGET), upstream=emulator.url,
                 args=["--ledger-path", str(ledger), "--drain-timeout", "10"]) as server:
        chunks = []
        with httpx.stream("POST", server.url + "/v1/messages", json=messages_params(max_tokens=500, stream=True),
                          headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}) as response:
            lines = response.iter_lines()
            for line in lines:
                chunks.append(line)
                if "content_block_delta" in line:
                    server.signal(signal.SIGTERM)  # mid-stream
                    break
            chunks.extend(lines)
        status = server.process.wait(20)
    assert any("message_stop" in c for c in chunks), chunks[-3:]
    assert status in (0, -signal.SIGTERM)
    assert ledger_spent_micro(ledger) == emulator.bill_micro() > 0


def test_serve_refuses_a_plain_http_upstream_unless_told(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(write_policy(tmp_path)), "--upstream", "http://api.example.com"]) == 2
    assert "--allow-http-upstream" in capsys.readouterr().err


@pytest.mark.parametrize("platform", ["bedrock", "vertex"])
def test_serve_refuses_a_platform_whose_clients_call_other_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 platform: str) -> None:
    # Their clients call InvokeModel or rawPredict: passed on, every call would go undecided and unmetered.
    assert main(["serve", str(write_policy(tmp_path)), "--platform", platform]) == 2
    err = capsys.readouterr().err
    assert f"--platform {platform}" in err and "unmetered" in err and "claude_api" in err


def test_serve_help() -> None:
    out = subprocess.run([sys.executable, "-m", "policy_engine", "serve", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--upstream" in out.stdout and "x-policy-" in out.stdout
