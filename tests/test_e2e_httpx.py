"""End to end: raw httpx (sync and async) through `FastModeTransport`, against the emulator."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from policy_engine.catalog import actual, load_catalog
from policy_engine.decide import Engine
from policy_engine.decisionlog import DecisionLog
from policy_engine.errors import CeilingExceeded
from policy_engine.integrations.httpx import AsyncFastModeTransport, FastModeRateLimited, FastModeTransport
from policy_engine.ledger import MemoryLedger
from policy_engine.ledger.sqlite import SqliteLedger
from policy_engine.ratelimit import account_id
from policy_engine.testing.emulator import Emulator
from tests._emulator import emulator, engine_for, gateway, Gateway, messages_params  # noqa: F401 - fixture

OPUS = load_catalog().model("claude-opus-5")
BUDGET = """
budgets:
  - name: daily
    window: day
    limit_usd: 100
"""
BUDGET_OBSERVED = BUDGET + "on_incomplete_stream: observed\n"
HEADERS = {"x-api-key": "sk-raw", "anthropic-version": "2023-06-01"}


class Raw:
    """Sync or async httpx with the transport; every call returns (status, json body or SSE lines)."""

    def __init__(self, kind: str, url: str, engine: Engine, timeout: float = 10.0) -> None:
        self.kind, self.url, self.engine, self.timeout = kind, url, engine, timeout
        self.transport = FastModeTransport(engine) if kind == "sync" else AsyncFastModeTransport(engine)

    def post(self, path: str, body: Any, headers: dict[str, str] | None = None, lines: int | None = None) -> tuple[int, Any]:
        """POST; for a stream read `lines` lines (None: all) and close."""
        all_headers = {**HEADERS, **(headers or {})}
        stream = isinstance(body, dict) and body.get("stream") is True
        if self.kind == "sync":
            with httpx.Client(base_url=self.url, transport=self.transport, timeout=self.timeout) as client:
                if not stream:
                    response = client.post(path, json=body, headers=all_headers)
                    return response.status_code, response.json()
                with client.stream("POST", path, json=body, headers=all_headers) as response:
                    read = []
                    for line in response.iter_lines():
                        read.append(line)
                        if lines is not None and len(read) >= lines:
                            break
                    return response.status_code, read

        async def run() -> tuple[int, Any]:
            async with httpx.AsyncClient(base_url=self.url, transport=self.transport, timeout=self.timeout) as client:
                if not stream:
                    response = await client.post(path, json=body, headers=all_headers)
                    return response.status_code, response.json()
                async with client.stream("POST", path, json=body, headers=all_headers) as response:
                    read = []
                    async for line in response.aiter_lines():
                        read.append(line)
                        if lines is not None and len(read) >= lines:
                            break
                    return response.status_code, read

        return asyncio.run(run())


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return engine_for(tmp_path, BUDGET)


@pytest.fixture
def raw(kind: str, emulator: Emulator, engine: Engine) -> Raw:  # noqa: F811
    return Raw(kind, emulator.url, engine)


def spent(engine: Engine) -> int:
    return sum(engine.ledger.totals().values())  # type: ignore[attr-defined]


def reserved(engine: Engine) -> int:
    return sum(engine.ledger._reserved.values())  # type: ignore[attr-defined]


def test_fast_reaches_the_wire_and_settles_at_the_fast_price(raw: Raw, emulator: Emulator, engine: Engine) -> None:  # noqa: F811
    status, body = raw.post("/v1/messages", messages_params("a b c"), {"anthropic-beta": "files-api-2025-04-14"})
    assert status == 200 and body["usage"]["speed"] == "fast"
    [sent] = emulator.requests()
    assert sent["body"]["speed"] == "fast"
    assert sent["headers"]["anthropic-beta"] == "files-api-2025-04-14,fast-mode-2026-02-01"
    assert spent(engine) == actual(OPUS, body["usage"]) == 6 * 10 + 16 * 50 and reserved(engine) == 0
    state = engine.ratelimits.get(account_id(api_key="sk-raw"))  # keyed by the hashed x-api-key
    assert state is not None and state.input_tokens_limit == emulator.fast_input_tokens_per_minute


def test_an_unsupported_model_never_gets_fast(raw: Raw, emulator: Emulator) -> None:  # noqa: F811
    params = messages_params(model="claude-sonnet-4-6", speed="fast")
    status, body = raw.post("/v1/messages", params, {"anthropic-beta": "fast-mode-2026-02-01"})
    assert status == 200 and body["usage"]["speed"] == "standard"
    assert "speed" not in emulator.requests()[0]["body"]


def test_a_fast_429_falls_back_to_standard_with_one_reservation(raw: Raw, emulator: Emulator, engine: Engine,  # noqa: F811
                                                                telemetry: Any) -> None:
    emulator.inject(429, speed="fast", retry_after="30")
    status, body = raw.post("/v1/messages", messages_params())
    assert status == 200 and body["usage"]["speed"] == "standard"
    assert [(r["status"], r["body"].get("speed")) for r in emulator.requests()] == [(429, "fast"), (200, None)]
    assert len(telemetry.spans("policy_engine.decide")) == 1 and len(telemetry.spans("policy_engine.settle")) == 1
    assert spent(engine) == actual(OPUS, body["usage"]) == 5 * 5 + 16 * 25 and reserved(engine) == 0


def test_fail_mode_raises(kind: str, emulator: Emulator, tmp_path: Path) -> None:  # noqa: F811
    engine = engine_for(tmp_path, BUDGET + "on_fast_rate_limited: fail\n")
    emulator.inject(429, speed="fast", retry_after="2")
    with pytest.raises(FastModeRateLimited):
        Raw(kind, emulator.url, engine).post("/v1/messages", messages_params())
    assert spent(engine) == 0 and reserved(engine) == 0


def test_errors_release_the_reservation(raw: Raw, emulator: Emulator, engine: Engine) -> None:  # noqa: F811
    emulator.inject(529)
    status, body = raw.post("/v1/messages", messages_params())
    assert status == 529 and body["error"]["type"] == "overloaded_error"
    assert spent(engine) == 0 and reserved(engine) == 0


@pytest.mark.parametrize("own", [{}, {"x-amzn-RequestId": "5f0c-api-gateway"}], ids=["bare", "aws-api-gateway"])
def test_a_gateway_5xx_settles_what_the_server_may_bill(kind: str, own: dict[str, str], emulator: Emulator,  # noqa: F811
                                                       engine: Engine, gateway: Gateway) -> None:  # noqa: F811
    # A 504 page from an intermediary, no request-id: the API behind it served and billed the request.
    gateway.fail, gateway.fail_headers = 1, own
    raw = Raw(kind, gateway.url, engine)
    with pytest.raises(ValueError):  # (the page is not JSON)
        raw.post("/v1/messages", messages_params())
    assert reserved(engine) == 0
    assert spent(engine) >= actual(OPUS, {"input_tokens": 5, "output_tokens": 64, "speed": "fast"})
    assert spent(engine) > emulator.bill_micro() > 0


def _billed_once_done(emulator: Emulator) -> int:
    """The emulator's bill once it has logged the request the client gave up on (it finishes on its own)."""
    for _ in range(150):
        if emulator.requests():
            break
        time.sleep(0.02)
    return emulator.bill_micro()


def test_a_timeout_settles_what_the_server_may_bill(kind: str, emulator: Emulator, engine: Engine,  # noqa: F811
                                                    telemetry: Any) -> None:
    # The server got the request and bills it after the client stopped waiting: the ledger counts the
    # reservation's worst case (on_incomplete_stream: worst_case, the default), never nothing.
    emulator.inject(None, hang_s=1.0)
    with pytest.raises(httpx.ReadTimeout):
        Raw(kind, emulator.url, engine, timeout=0.2).post("/v1/messages", messages_params())
    assert reserved(engine) == 0
    # The input as the decision bounded it (nothing of the response was read), max_tokens of output.
    assert spent(engine) >= actual(OPUS, {"input_tokens": 5, "output_tokens": 64, "speed": "fast"})
    assert spent(engine) >= _billed_once_done(emulator) > 0
    [settle] = telemetry.spans("policy_engine.settle")
    assert settle.attributes["policy_engine.incomplete_stream"] == "worst_case"


def test_a_timed_out_fallbacks_chain_settles_the_worst_case_of_every_hop(kind: str, emulator: Emulator,  # noqa: F811
                                                                        engine: Engine) -> None:
    # Haiku declines, and Opus, a dearer fallback, serves after the client gave up: what the server may bill is
    # the chain's worst case (reserved in full), not max_tokens at the requested model.
    emulator.configure(output_tokens=64)
    emulator.script(refuse=["claude-haiku-4-5"], refuse_after=0)
    emulator.inject(None, hang_s=1.0)
    body = messages_params(model="claude-haiku-4-5", fallbacks=[{"model": "claude-opus-5"}])
    with pytest.raises(httpx.ReadTimeout):
        Raw(kind, emulator.url, engine, timeout=0.2).post("/v1/messages", body,
                                                          headers={"anthropic-beta": "server-side-fallback-2026-07-01"})
    assert reserved(engine) == 0
    billed = _billed_once_done(emulator)
    assert [step["model"] for step in emulator.bill()] == ["claude-opus-5"]
    assert spent(engine) >= billed > 0


def test_a_request_cancelled_after_it_was_sent_counts_what_the_server_may_bill(emulator: Emulator,  # noqa: F811
                                                                               engine: Engine) -> None:
    # A task cancelled by its caller (a timeout around it, a server shutting down) while the server is
    # generating: the server bills what it got, so the ledger counts the worst case, not nothing.
    emulator.inject(None, hang_s=1.0)
    transport = AsyncFastModeTransport(engine)

    async def run() -> None:
        async with httpx.AsyncClient(base_url=emulator.url, transport=transport, timeout=10) as client:
            await asyncio.wait_for(client.post("/v1/messages", json=messages_params(), headers=HEADERS), 0.3)

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(run())
    assert reserved(engine) == 0
    assert spent(engine) >= actual(OPUS, {"input_tokens": 5, "output_tokens": 64, "speed": "fast"})
    assert spent(engine) >= _billed_once_done(emulator) > 0


def test_a_request_cancelled_while_its_decision_is_reserving_is_released(emulator: Emulator,  # noqa: F811
                                                                          tmp_path: Path) -> None:
    # A shared ledger reserves on a worker thread, which a cancellation cannot stop: the reservation it makes
    # for a request that will never be sent must be released, not held until it expires.
    path, log_path = tmp_path / "ledger.sqlite", tmp_path / "decisions.jsonl"
    log = DecisionLog(str(log_path))
    eng = engine_for(tmp_path, BUDGET, ledger=SqliteLedger(path), decision_log=log)
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # another writer holds the file: the reservation waits for it
    transport = AsyncFastModeTransport(eng)

    async def run() -> None:
        async with httpx.AsyncClient(base_url=emulator.url, transport=transport, timeout=10) as client:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.post("/v1/messages", json=messages_params(), headers=HEADERS), 0.3)
            lock.execute("COMMIT")  # the reservation goes on, for a request nobody will send
            for _ in range(500):  # the loop keeps running, as a server's does
                log.flush()
                if log_path.exists() and '"released"' in log_path.read_text():
                    return
                await asyncio.sleep(0.02)

    asyncio.run(run())
    log.close()
    records = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    assert [r["event"] for r in records] == ["released"]  # (nothing before: the reservation was held until it expired)
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM holds").fetchone() == (0,)
    assert emulator.requests() == [] and spent(eng) == 0


def test_an_unclaimed_flight_is_released_unless_an_earlier_attempt_was_sent(engine: Engine) -> None:
    from policy_engine.integrations._core import Runtime

    runtime = Runtime(engine, observe=False)
    never_sent = runtime.flight(messages_params(), None, None)
    runtime.unclaimed(never_sent)
    assert reserved(engine) == 0 and spent(engine) == 0
    # A retry's flight: its first attempt went out, so the server may bill it.
    retried = runtime.flight(messages_params(), None, "idem-1")
    assert retried is not None
    retried.sent_at = time.perf_counter()
    assert runtime.flight(messages_params(), None, "idem-1") is retried
    runtime.unclaimed(retried)
    assert reserved(engine) == 0
    assert spent(engine) >= actual(OPUS, {"input_tokens": 5, "output_tokens": 64, "speed": "fast"})


def test_a_connection_refused_releases_the_reservation(kind: str, engine: Engine) -> None:
    # Nothing reached a server: nothing can be billed.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(httpx.ConnectError):
        Raw(kind, f"http://127.0.0.1:{port}", engine, timeout=0.5).post("/v1/messages", messages_params())
    assert reserved(engine) == 0 and spent(engine) == 0


def test_streams_settle_and_pass_through_byte_for_byte(raw: Raw, emulator: Emulator, engine: Engine) -> None:  # noqa: F811
    status, lines = raw.post("/v1/messages", messages_params(stream=True))
    assert status == 200
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert [e["type"] for e in events][:3] == ["message_start", "content_block_start", "ping"]
    assert events[-1]["type"] == "message_stop"
    assert spent(engine) == actual(OPUS, emulator.billed()[0]) and reserved(engine) == 0


def test_an_abandoned_stream_settles_its_worst_case(raw: Raw, emulator: Emulator, engine: Engine,  # noqa: F811
                                                   telemetry: Any) -> None:
    emulator.configure(standard_otps=40, output_tokens=60, delta_tokens=1)
    status, lines = raw.post("/v1/messages", messages_params(stream=True, max_tokens=100), lines=14)
    assert status == 200 and len(lines) == 14
    [settle] = telemetry.spans("policy_engine.settle")
    assert settle.attributes["gen_ai.usage.output_tokens"] == 100  # max_tokens: what the server may bill
    assert settle.attributes["policy_engine.incomplete_stream"] == "worst_case"
    assert spent(engine) == actual(OPUS, {"input_tokens": 5, "output_tokens": 100, "speed": "fast"})
    assert reserved(engine) == 0
    assert spent(engine) >= _billed_once_done(emulator) > 0


def test_an_abandoned_stream_settles_what_was_seen_under_observed(kind: str, emulator: Emulator, tmp_path: Path,  # noqa: F811
                                                                  telemetry: Any) -> None:
    engine = engine_for(tmp_path, BUDGET_OBSERVED)
    emulator.configure(standard_otps=40, output_tokens=60, delta_tokens=1)
    status, lines = Raw(kind, emulator.url, engine).post("/v1/messages", messages_params(stream=True, max_tokens=100),
                                                         lines=14)
    assert status == 200 and len(lines) == 14
    [settle] = telemetry.spans("policy_engine.settle")
    output = settle.attributes["gen_ai.usage.output_tokens"]
    assert 1 <= output < 60 and settle.attributes["policy_engine.incomplete_stream"] == "observed"
    assert spent(engine) == actual(OPUS, {"input_tokens": 5, "output_tokens": output, "speed": "fast"})
    assert reserved(engine) == 0


def test_a_reject_sends_nothing(kind: str, emulator: Emulator, tmp_path: Path) -> None:  # noqa: F811
    engine = engine_for(tmp_path, "ceilings:\n  per_request_usd: 0.0001\n")
    with pytest.raises(CeilingExceeded):
        Raw(kind, emulator.url, engine).post("/v1/messages", messages_params())
    assert emulator.requests() == []


def test_batches_lose_speed_and_count_tokens_passes_through(raw: Raw, emulator: Emulator, engine: Engine) -> None:  # noqa: F811
    batch = {"requests": [{"custom_id": "a", "params": messages_params(speed="fast")}]}
    status, body = raw.post("/v1/messages/batches", batch, {"anthropic-beta": "fast-mode-2026-02-01"})
    assert status == 200 and body["type"] == "message_batch"
    status, body = raw.post("/v1/messages/count_tokens", {"model": "claude-opus-5", "messages": [
        {"role": "user", "content": "x"}], "speed": "fast"}, {"anthropic-beta": "fast-mode-2026-02-01"})
    assert status == 200 and body == {"input_tokens": 4}
    assert emulator.requests()[1]["body"]["speed"] == "fast"  # untouched
    assert spent(engine) == 0 and reserved(engine) == 0


def test_non_json_bodies_pass_through(raw: Raw, emulator: Emulator, engine: Engine) -> None:  # noqa: F811
    def send() -> int:
        if raw.kind == "sync":
            with httpx.Client(transport=raw.transport) as client:
                return client.post(f"{emulator.url}/v1/messages", content=b"not json", headers=HEADERS).status_code

        async def run() -> int:
            async with httpx.AsyncClient(transport=raw.transport) as client:
                return (await client.post(f"{emulator.url}/v1/messages", content=b"not json", headers=HEADERS)).status_code

        return asyncio.run(run())

    assert send() == 400
    assert reserved(engine) == 0


def test_only_a_5xx_without_the_apis_request_id_is_taken_for_an_intermediarys() -> None:
    from policy_engine.integrations._core import unanswered

    assert unanswered(504, httpx.Headers({"content-type": "text/html"}), "claude_api") is not None
    assert unanswered(524, httpx.Headers({"cf-ray": "8f1"}), "claude_api") is not None
    assert unanswered(500, httpx.Headers({"Request-Id": "req_1"}), "claude_api") is None  # the API's own api_error
    assert unanswered(503, httpx.Headers({"X-Amzn-RequestId": "4b1c"}), "bedrock") is None  # Bedrock's own
    # API Gateway's own 504 (its 29 s integration timeout) carries x-amzn-RequestId too: only Bedrock's count
    for platform in ("claude_api", "claude_platform_aws", "vertex", "foundry"):
        assert unanswered(504, httpx.Headers({"X-Amzn-RequestId": "4b1c"}), platform) is not None
    assert unanswered(404, httpx.Headers({}), "claude_api") is None  # a 4xx: refused, whoever answered


class _Ticker:
    """Counts the event loop's turns: the longest gap between two is how long something held the loop."""

    def __init__(self) -> None:
        self.longest, self.last, self._task = 0.0, time.perf_counter(), None

    def _turn(self) -> None:
        now = time.perf_counter()
        self.longest, self.last = max(self.longest, now - self.last), now

    async def __aenter__(self) -> "_Ticker":
        async def tick() -> None:
            while True:
                await asyncio.sleep(0.01)
                self._turn()

        self.last = time.perf_counter()
        self._task = asyncio.ensure_future(tick())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._turn()  # (a loop held until now never got back to the ticker)
        self._task.cancel()  # type: ignore[union-attr]


HOLD_S = 1.0


def _held(path: Path) -> sqlite3.Connection:
    """Another writer holds the ledger's file for HOLD_S seconds (from a thread: the loop may be stuck)."""
    import threading

    lock = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    lock.execute("BEGIN IMMEDIATE")
    threading.Timer(HOLD_S, lambda: lock.execute("COMMIT")).start()
    return lock


@pytest.mark.parametrize("ending", ["stream", "dropped", "error", "timeout"])
def test_a_shared_ledgers_settle_and_release_keep_off_the_event_loop(ending: str, emulator: Emulator,  # noqa: F811
                                                                     tmp_path: Path) -> None:
    # A stream settles as its last event passes, an error status releases, a timed-out attempt settles at its
    # worst case: with a shared ledger each does ledger I/O, which must wait on a worker thread, not hold the
    # loop (a proxy's every other request).
    path = tmp_path / "ledger.sqlite"
    eng = engine_for(tmp_path, BUDGET, ledger=SqliteLedger(path))
    transport = AsyncFastModeTransport(eng)
    if ending == "error":
        emulator.inject(529, hang_s=0.3)
    if ending == "timeout":
        emulator.inject(None, hang_s=2.0)

    async def run() -> _Ticker:
        async with httpx.AsyncClient(base_url=emulator.url, transport=transport, timeout=10) as client, \
                _Ticker() as ticker:
            if ending == "dropped":  # opened, never read nor closed: settled as it is garbage-collected
                response = await client.send(client.build_request("POST", "/v1/messages", headers=HEADERS,
                                                                  json=messages_params(stream=True)), stream=True)
                _held(path)
                del response
                gc.collect()
                await asyncio.sleep(HOLD_S + 0.3)  # the settlement waits for the writer, on a worker thread
            elif ending == "stream":
                async with client.stream("POST", "/v1/messages", json=messages_params(stream=True),
                                         headers=HEADERS) as response:
                    lines = response.aiter_lines()
                    await lines.__anext__()  # reserved and sent; the settle comes at the stream's end
                    _held(path)
                    async for _ in lines:
                        pass
            else:
                sent = asyncio.ensure_future(client.post("/v1/messages", json=messages_params(), headers=HEADERS,
                                                         timeout=0.3 if ending == "timeout" else 10))
                await asyncio.sleep(0.15)  # reserved, and the emulator is still hanging
                _held(path)
                if ending == "timeout":  # abandoned: settled at the worst case the server may bill
                    with pytest.raises(httpx.ReadTimeout):
                        await sent
                else:
                    assert (await sent).status_code == 529
            return ticker

    # The loop's stalls measured are the engine's, not the collector's: a full collection in a process that
    # has run the whole suite takes most of a second (the dropped stream is collected from what follows).
    gc.collect()
    gc.freeze()
    started = time.perf_counter()
    try:
        ticker = asyncio.run(run())
    finally:
        gc.unfreeze()
    assert time.perf_counter() - started >= HOLD_S * 0.9  # the settle (or release) did wait for the writer
    assert ticker.longest < HOLD_S / 2.5, f"the event loop was held {ticker.longest:.2f} s"
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM holds").fetchone() == (0,)
    if ending in ("timeout", "dropped"):
        assert spent(eng) >= actual(OPUS, {"input_tokens": 5, "output_tokens": 64, "speed": "fast"})
    else:
        assert spent(eng) == (0 if ending == "error" else actual(OPUS, emulator.billed()[0]))


def test_a_ledger_file_held_past_its_busy_timeout_loses_neither_the_response_nor_its_cost(
        kind: str, emulator: Emulator, tmp_path: Path) -> None:  # noqa: F811
    # Another process holds the SQLite file while the response comes back: the caller still gets its
    # response, and the settlement waits in the ledger's journal until the file can be written.
    import threading

    path = tmp_path / "ledger.sqlite"
    ledger = SqliteLedger(path, busy_timeout_s=0.1)
    eng = engine_for(tmp_path, BUDGET, ledger=ledger)
    emulator.inject(None, hang_s=0.6)  # reserved, then a while before the answer
    holder: list[sqlite3.Connection] = []

    def hold() -> None:
        time.sleep(0.2)
        holder.append(_held(path))

    threading.Thread(target=hold).start()
    status, body = Raw(kind, emulator.url, eng).post("/v1/messages", messages_params())
    assert status == 200 and body["usage"]["output_tokens"] > 0
    assert holder, "the file was not held while the response came back"
    assert ledger.journal_size == 1
    time.sleep(HOLD_S)  # the holder lets go
    ledger.flush_journal()
    assert spent(eng) == actual(OPUS, emulator.billed()[0])
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM holds").fetchone() == (0,)


def test_a_settlement_queued_behind_busy_workers_still_runs_when_the_loop_shuts_down(emulator: Emulator,  # noqa: F811
                                                                                     tmp_path: Path) -> None:
    # uvicorn past its graceful-shutdown timeout cancels the requests in flight, then asyncio.run cancels every
    # task left. The settlement of a request cancelled once sent (at the worst case: the server may bill it)
    # waits for a worker thread that a slow ledger call holds; it must run before the loop closes, not vanish.
    import concurrent.futures

    path = tmp_path / "ledger.sqlite"
    eng = engine_for(tmp_path, BUDGET, ledger=SqliteLedger(path))
    transport = AsyncFastModeTransport(eng)
    emulator.inject(None, hang_s=2.0)

    async def run() -> None:
        asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(1))
        client = httpx.AsyncClient(base_url=emulator.url, transport=transport, timeout=10)
        request = asyncio.ensure_future(client.post("/v1/messages", json=messages_params(), headers=HEADERS))
        deadline = time.monotonic() + 10
        while not reserved_in(path) and time.monotonic() < deadline:  # decided on the one worker, and reserved
            await asyncio.sleep(0.01)
        assert reserved_in(path) > 0
        await asyncio.sleep(0.3)  # sent a moment after its reservation (on the loop); the emulator hangs 2 s
        asyncio.ensure_future(asyncio.to_thread(time.sleep, 0.5))  # a slow ledger call holds the worker
        await asyncio.sleep(0.05)
        request.cancel()  # its settlement queues behind the busy worker
        await asyncio.sleep(0.05)
        # returning now: asyncio.run cancels the tasks left, then shuts the executor down

    asyncio.run(run())
    assert reserved_in(path) == 0
    assert spent(eng) >= actual(OPUS, {"input_tokens": 5, "output_tokens": 64, "speed": "fast"})


def reserved_in(path: Path) -> int:
    return sqlite3.connect(path).execute("SELECT COALESCE(SUM(amount), 0) FROM holds").fetchone()[0]  # type: ignore[no-any-return]


class _FailingReleases(MemoryLedger):
    """A ledger of the user's own whose `release` fails (a store that went away)."""

    def release(self, reservation_id: str) -> bool:
        raise RuntimeError("the ledger's store went away")


def test_a_ledger_failing_after_an_error_status_gives_the_connection_back(emulator: Emulator,  # noqa: F811
                                                                         tmp_path: Path) -> None:
    # The 529's release raises: the caller gets that error, and the response nobody will read is closed,
    # so a client with one connection can still send the next request.
    eng = engine_for(tmp_path, BUDGET, ledger=_FailingReleases())
    emulator.inject(529)
    inner = httpx.HTTPTransport(limits=httpx.Limits(max_connections=1))
    with httpx.Client(base_url=emulator.url, transport=FastModeTransport(eng, inner), timeout=2) as client:
        with pytest.raises(RuntimeError, match="went away"):
            client.post("/v1/messages", json=messages_params(), headers=HEADERS)
        assert client.post("/v1/messages", json=messages_params(), headers=HEADERS).status_code == 200
