"""Real clients of `policy-engine serve`: the Python SDK (sync, async, streaming), the official TypeScript SDK
under node, curl and httpx, against the server as a real process in front of the emulator.

What each client gets back (the `x-policy-*` response headers, the usage), what reached the upstream (the
emulator's record: speed, the fast-mode beta), and what the server counted (its SQLite ledger, against the
emulator's own bill) must agree with the policy; and the decisions the proxy makes equal those of the
in-process middleware (`FastModePolicy`) for the same requests and contexts.

node and the TypeScript SDK come from `make test` (`make node-sdk`: Debian's nodejs and npm, then
`npm ci --prefix tests/ts` at the version tests/ts/package-lock.json pins); curl from `make curl`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from policy_engine.catalog import actual, load_catalog
from policy_engine.decide import Engine, load
from policy_engine.decisionlog import DecisionLog, Sink
from policy_engine.integrations.anthropic import FastModePolicy, policy_context
from policy_engine.ledger.sqlite import SqliteLedger
from policy_engine.testing.emulator import Emulator
from tests._emulator import started
from tests._serve import Server, serving

TS_DIR = Path(__file__).resolve().parent / "ts"
TS_CLIENT = TS_DIR / "client.mjs"
API_KEY = "sk-test-clients"
TOKEN = "pe-clients-test-token"
TOKEN_ENV = "PE_TEST_SERVE_TOKEN"
ANTHROPIC_VERSION = "2023-06-01"
CATALOG = load_catalog()

POLICY = """\
version: 1
name: clients
default: standard
on_invalid_context: reject
rules:
  - name: batch-tenant
    when: has(context.tenant) && context.tenant == "batch"
    speed: standard
  - name: search-team
    when: "'team' in context.labels && context.labels['team'] == 'search'"
    speed: fast
  - name: waiting
    when: context.interactive
    speed: fast
  - name: tight-slo
    when: has(context.latency_slo_ms) && context.latency_slo_ms < 5000
    speed: fast
budgets:
  - name: all_spend
    window: day
    limit_usd: 1000
    counts: all
"""
"""A few CEL rules over the context, so that different requests get different speeds for different reasons."""


def params(model: str = "claude-opus-5", text: str = "Hello there") -> dict[str, Any]:
    return {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": text}]}


CASES: list[tuple[dict[str, Any], dict[str, Any], tuple[str, str, str]]] = [
    # (params, context, the (speed, rule, outcome) the policy gives)
    (params(), {}, ("standard", "default", "allowed")),
    (params(), {"interactive": True}, ("fast", "waiting", "allowed")),
    (params(), {"interactive": True, "tenant": "batch"}, ("standard", "batch-tenant", "allowed")),
    (params("claude-opus-5-5"), {"labels": {"team": "search"}}, ("fast", "search-team", "allowed")),
    (params(), {"latency_slo_ms": 2000, "tenant": "acme"}, ("fast", "tight-slo", "allowed")),
    (params(), {"latency_slo_ms": 60000, "labels": {"team": "ads"}}, ("standard", "default", "allowed")),
    (params("claude-sonnet-4-6"), {"interactive": True}, ("standard", "waiting", "downgraded")),
]
"""Requests and contexts whose decisions every client must see alike (and the in-process middleware make)."""


# -- what the clients need -------------------------------------------------------------------------------


def command(name: str, target: str) -> str:
    """The path of a command the tests run; missing is a failure (CI's `make test` installs it), never a skip."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; `make test` installs it (make {target})")
    return path


def node() -> str:
    path = command("node", "node-sdk")
    if not (TS_DIR / "node_modules" / "@anthropic-ai" / "sdk" / "package.json").is_file():
        pytest.fail("the TypeScript SDK is not installed in tests/ts/node_modules; `make test` installs it "
                    "(make node-sdk: npm ci --prefix tests/ts)")
    return path


def pinned_ts_sdk() -> str:
    lock = json.loads((TS_DIR / "package-lock.json").read_text())
    return str(lock["packages"]["node_modules/@anthropic-ai/sdk"]["version"])


def context_headers(context: dict[str, Any]) -> dict[str, str]:
    """A decision context as the proxy's request headers."""
    headers = {}
    for key, value in context.items():
        if key == "labels":
            headers.update({f"x-policy-label-{name}": str(v) for name, v in value.items()})
        else:
            headers["x-policy-" + key.replace("_", "-")] = str(value).lower() if isinstance(value, bool) else str(value)
    return headers


def policy_headers(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith("x-policy-")}


def decided(headers: dict[str, str]) -> tuple[str, str, str]:
    """(speed, rule, outcome) of a proxied response's headers."""
    return headers["x-policy-decided-speed"], headers["x-policy-rule"], headers["x-policy-outcome"]


def wait_until(check: Callable[[], Any], what: str, timeout_s: float = 10.0) -> Any:
    """Poll `check` until it returns something true, within a deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last: {value!r}")
        time.sleep(0.02)


# -- the emulator, the servers, the ledger ----------------------------------------------------------------


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    yield from started()


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clients") / "policy.yaml"
    path.write_text(POLICY)
    return path


class Served:
    """A running server, with its SQLite ledger (None: the in-memory one) and its auth token (None: no auth)."""

    def __init__(self, server: Server, ledger: Path | None, token: str | None) -> None:
        self.server, self.ledger, self.token = server, ledger, token

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def served(emu: Emulator, policy_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """No auth, budgets in a SQLite file (the server then decides off its event loop, in worker threads)."""
    ledger = tmp_path_factory.mktemp("ledger") / "ledger.sqlite"
    with serving(policy_path, upstream=emu.url, args=["--ledger-path", str(ledger)]) as server:
        yield Served(server, ledger, None)


@pytest.fixture(scope="module")
def served_auth(emu: Emulator, policy_path: Path) -> Iterator[Served]:
    """The decision API behind a bearer token; budgets in memory (decided on the event loop)."""
    with serving(policy_path, upstream=emu.url, args=["--auth-token-env", TOKEN_ENV], env={TOKEN_ENV: TOKEN}) as server:
        yield Served(server, None, TOKEN)


@pytest.fixture(params=["auth-off", "auth-on"])
def either(request: pytest.FixtureRequest) -> Served:
    return request.getfixturevalue("served" if request.param == "auth-off" else "served_auth")  # type: ignore[no-any-return]


def ledger_spent(path: Path) -> int:
    """What the server's ledger counted as spent, in micro-dollars (read through a SqliteLedger of our own)."""
    ledger = SqliteLedger(path)
    try:
        return sum(ledger.totals().values())
    finally:
        ledger.close()


def ledger_held(path: Path) -> int:
    """What live reservations still hold in the ledger (0 once every request settled)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT COALESCE(SUM(amount), 0) FROM holds WHERE expires_at > ?",
                                (time.time(),)).fetchone()[0])


class Books:
    """The emulator's bill and the server's ledger from a point on: both must grow by the same amount."""

    def __init__(self, emu: Emulator, ledger: Path) -> None:
        self.emu, self.ledger = emu, ledger
        self.bill0, self.spent0, self.seen0 = emu.bill_micro(), ledger_spent(ledger), len(emu.requests())
        self.held0 = ledger_held(ledger)  # 0 unless an earlier failure left a reservation to its TTL

    def upstream(self) -> list[dict[str, Any]]:
        """The requests the emulator received since."""
        return self.emu.requests()[self.seen0:]

    def settled(self) -> int:
        """Wait until the ledger counted exactly what the emulator billed since, with nothing left reserved."""
        def balanced() -> bool:
            return (ledger_spent(self.ledger) - self.spent0 == self.emu.bill_micro() - self.bill0
                    and ledger_held(self.ledger) <= self.held0)

        wait_until(balanced, f"the ledger to count the emulator's bill (billed {self.emu.bill_micro() - self.bill0}, "
                             f"counted {ledger_spent(self.ledger) - self.spent0}, held {ledger_held(self.ledger)})")
        billed = self.emu.bill_micro() - self.bill0
        assert billed > 0
        return billed


def wire(entry: dict[str, Any]) -> tuple[str, bool]:
    """What arrived upstream: the speed asked for, and whether a fast-mode beta came with it."""
    betas = entry["headers"].get("anthropic-beta", "")
    return entry["body"].get("speed", "standard"), any(b.strip().startswith("fast-mode") for b in betas.split(","))


# -- the clients -------------------------------------------------------------------------------------------


def text_of(message: Any) -> str:
    return "".join(getattr(block, "text", "") for block in message.content)


def python_call(mode: str, url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[dict[str, str], Any]:
    """One Messages request with the Python SDK: (the response's x-policy-* headers, the usage)."""
    if mode == "sync":
        with anthropic.Anthropic(base_url=url, api_key=API_KEY, max_retries=0) as client:
            raw = client.messages.with_raw_response.create(**body, extra_headers=headers)
            message = raw.parse()
            assert text_of(message)
            return policy_headers(raw.headers), message.usage
    if mode == "stream":
        with anthropic.Anthropic(base_url=url, api_key=API_KEY, max_retries=0) as client:
            with client.messages.stream(**body, extra_headers=headers) as stream:
                events = sum(1 for _ in stream)
                message = stream.get_final_message()
                assert events > 0 and text_of(message)
                return policy_headers(stream.response.headers), message.usage

    async def run() -> tuple[dict[str, str], Any]:
        async with anthropic.AsyncAnthropic(base_url=url, api_key=API_KEY, max_retries=0) as client:
            if mode == "async":
                raw = await client.messages.with_raw_response.create(**body, extra_headers=headers)
                message = await raw.parse()
                assert text_of(message)
                return policy_headers(raw.headers), message.usage
            assert mode == "async_stream", mode
            async with client.messages.stream(**body, extra_headers=headers) as stream:
                events = 0
                async for _ in stream:
                    events += 1
                message = await stream.get_final_message()
                assert events > 0 and text_of(message)
                return policy_headers(stream.response.headers), message.usage

    return asyncio.run(run())


def ts_calls(url: str | None, requests: list[dict[str, Any]], env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Requests with the TypeScript SDK (tests/ts/client.mjs), one node process for all, in order. `url` None: the
    SDK finds the server in ANTHROPIC_BASE_URL (and the key in ANTHROPIC_API_KEY) of `env`."""
    spec = {"api_key": API_KEY if url else None, "requests": requests}
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
    done = subprocess.run([node(), str(TS_CLIENT), *([url] if url else [])], input=json.dumps(spec),
                          capture_output=True, text=True, timeout=120, cwd=TS_DIR, env={**environ, **(env or {})})
    assert done.returncode == 0, f"node client failed ({done.returncode}):\n{done.stderr}"
    out = json.loads(done.stdout)
    assert out["sdk"] == pinned_ts_sdk()  # the very SDK the lock file pins
    assert len(out["results"]) == len(requests)
    return out["results"]  # type: ignore[no-any-return]


class Collected(Sink):
    """A decision-log sink keeping the records in memory: what the in-process middleware decided."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, records: Sequence[dict[str, Any]], lines: Sequence[str]) -> None:
        self.records.extend(records)


def in_process(emu: Emulator, policy_path: Path) -> list[tuple[tuple[str, str, str], tuple[str, bool]]]:
    """Each case through the in-process middleware straight to the emulator: (decision, what went upstream)."""
    collected = Collected()
    log = DecisionLog(collected)
    engine: Engine = load(policy_path, decision_log=log)
    seen = len(emu.requests())
    with anthropic.Anthropic(base_url=emu.url, api_key=API_KEY, max_retries=0,
                             middleware=[FastModePolicy(engine)]) as client:
        for body, context, _ in CASES:
            with policy_context(**context):
                client.messages.create(**body)
    assert log.flush()
    log.close()
    decisions = [r["decision"] for r in collected.records]
    assert len(decisions) == len(CASES)
    sent = emu.requests()[seen:]
    assert len(sent) == len(CASES) and all(e["status"] == 200 for e in sent)
    return [((d["speed"], d["rule"], d["outcome"]), wire(e)) for d, e in zip(decisions, sent)]


# -- the Python SDK ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async", "stream", "async_stream"])
def test_python_sdk_through_the_proxy_gets_the_policys_speed_and_settles(mode: str, served: Served,
                                                                         emu: Emulator) -> None:
    assert served.ledger is not None
    books = Books(emu, served.ledger)
    fast_headers, fast_usage = python_call(mode, served.url, params(), {"x-policy-interactive": "true"})
    slow_headers, slow_usage = python_call(mode, served.url, params(), {"x-policy-tenant": "acme"})

    assert fast_headers == {"x-policy-speed": "fast", "x-policy-decided-speed": "fast", "x-policy-rule": "waiting",
                            "x-policy-outcome": "allowed", "x-policy-policy": fast_headers["x-policy-policy"]}
    assert fast_headers["x-policy-policy"].startswith("clients@")
    assert (slow_headers["x-policy-speed"], slow_headers["x-policy-rule"]) == ("standard", "default")
    assert (fast_usage.speed, slow_usage.speed) == ("fast", "standard")
    upstream = books.upstream()
    assert [wire(e) for e in upstream] == [("fast", True), ("standard", False)]
    assert [e["stream"] for e in upstream] == [mode.endswith("stream")] * 2
    # The context headers are the proxy's: they never reach the upstream.
    assert not [h for e in upstream for h in e["headers"] if h.lower().startswith("x-policy-")]
    books.settled()


# -- the TypeScript SDK ------------------------------------------------------------------------------------


def test_typescript_sdk_with_and_without_streaming(served: Served, emu: Emulator) -> None:
    assert served.ledger is not None
    books = Books(emu, served.ledger)
    modes = ["create", "stream", "create_stream"]
    contexts = [{"x-policy-interactive": "true"}, {"x-policy-latency-slo-ms": "60000"}]
    results = ts_calls(served.url, [{"mode": m, "params": params(), "headers": h} for m in modes for h in contexts])

    for result, (mode, headers) in zip(results, [(m, h) for m in modes for h in contexts]):
        fast = "x-policy-interactive" in headers
        assert result["status"] == 200, result
        assert result["headers"]["x-policy-speed"] == ("fast" if fast else "standard"), (mode, result)
        assert result["headers"]["x-policy-rule"] == ("waiting" if fast else "default"), (mode, result)
        assert result["usage"]["speed"] == ("fast" if fast else "standard")
        assert result["usage"]["output_tokens"] == 16 and result["text"]
        assert result["events"] is None if mode == "create" else result["events"] > 3
    upstream = books.upstream()
    assert [wire(e) for e in upstream] == [("fast", True), ("standard", False)] * 3
    assert [e["stream"] for e in upstream] == [False, False, True, True, True, True]
    books.settled()


def test_typescript_sdk_finds_the_proxy_in_anthropic_base_url_and_the_beta_surface_keeps_its_betas(
        served: Served, emu: Emulator) -> None:
    """Set up as Claude Code is (ANTHROPIC_BASE_URL, ANTHROPIC_API_KEY), on the beta surface, with betas of its own:
    the fast-mode beta is added beside the caller's."""
    assert served.ledger is not None
    books = Books(emu, served.ledger)
    body = {**params(), "betas": ["context-management-2025-06-27"]}
    results = ts_calls(None, [{"mode": "beta_create", "params": body, "headers": {"x-policy-interactive": "true"}},
                              {"mode": "beta_create", "params": body, "headers": {}}],
                       env={"ANTHROPIC_BASE_URL": served.url, "ANTHROPIC_API_KEY": API_KEY})
    assert [(r["status"], r["headers"]["x-policy-speed"], r["usage"]["speed"]) for r in results] == [
        (200, "fast", "fast"), (200, "standard", "standard")]
    fast, slow = books.upstream()
    assert fast["headers"]["anthropic-beta"].split(",") == ["context-management-2025-06-27", "fast-mode-2026-02-01"]
    assert slow["headers"]["anthropic-beta"].split(",") == ["context-management-2025-06-27"]
    assert (fast["body"]["speed"], "speed" in slow["body"]) == ("fast", False)
    books.settled()


def test_a_stream_the_typescript_sdk_leaves_early_is_settled_at_the_worst_case(served: Served, emu: Emulator) -> None:
    """The client aborts after a few events: the proxy stops relaying, and the policy's on_incomplete_stream
    (worst_case: max_tokens of output) settles the reservation, at or above what the emulator billed."""
    assert served.ledger is not None
    books = Books(emu, served.ledger)
    emu.configure(standard_otps=200, output_tokens=120, delta_tokens=1)  # 0.6 s of output: time to leave
    try:
        [result] = ts_calls(served.url, [{"mode": "stream_abort", "abort_after": 4,
                                          "params": {**params(), "max_tokens": 150}, "headers": {}}])
        [entry] = wait_until(lambda: [e for e in books.upstream() if e["usage"] is not None], "the emulator's bill")
    finally:
        emu.configure(standard_otps=None, output_tokens=16, delta_tokens=4)
    assert result["status"] == 200 and result["events"] == 4 and result["headers"]["x-policy-speed"] == "standard"
    assert 0 < entry["usage"]["output_tokens"] < 120  # billed for what was generated before the client left
    worst = actual(CATALOG.model("claude-opus-5"), {**entry["usage"], "output_tokens": 150, "speed": "standard"})

    def counted() -> int:
        return ledger_spent(books.ledger) - books.spent0 if ledger_held(books.ledger) <= books.held0 else 0

    assert wait_until(counted, "the abandoned stream's settlement") == worst
    assert worst > emu.bill_micro() - books.bill0 > 0


def test_typescript_sdk_count_tokens_passes_through_undecided(served: Served, emu: Emulator) -> None:
    seen = len(emu.requests())
    [result] = ts_calls(served.url, [{"mode": "count_tokens", "params": params(),
                                      "headers": {"x-policy-interactive": "true"}}])
    assert result["status"] == 200 and result["usage"]["input_tokens"] > 0, result
    assert result["headers"] == {}  # nothing decided, nothing reserved
    [entry] = emu.requests()[seen:]
    assert entry["path"] == "/v1/messages/count_tokens" and "speed" not in entry["body"]
    assert not [h for h in entry["headers"] if h.lower().startswith("x-policy-")]


def test_typescript_sdk_sees_the_proxys_refusal_as_an_api_error(served: Served, emu: Emulator) -> None:
    """A context header the policy cannot read comes back as an Anthropic-shaped 400 the SDK raises, unsent."""
    seen = len(emu.requests())
    [result] = ts_calls(served.url, [{"mode": "create", "params": params(),
                                      "headers": {"x-policy-latency-slo-ms": "soon"}}])
    assert result["status"] == 400 and result["error"]["type"] == "invalid_request_error", result
    assert result["error"]["name"] == "BadRequestError"
    assert len(emu.requests()) == seen


# -- the same decisions, whoever asks ----------------------------------------------------------------------


def test_the_proxy_decides_as_the_in_process_middleware_for_every_client(served: Served, emu: Emulator,
                                                                         policy_path: Path) -> None:
    expected = in_process(emu, policy_path)
    # The middleware itself decides as the policy says (so both agreeing on something else fails too).
    assert [d for d, _ in expected] == [want for _, _, want in CASES]
    assert {w for _, w in expected} == {("fast", True), ("fast", False), ("standard", False)}  # opus 5.5: no beta

    got: dict[str, list[tuple[tuple[str, str, str], tuple[str, bool]]]] = {}
    for mode in ("sync", "stream"):
        seen = len(emu.requests())
        answers = [python_call(mode, served.url, body, context_headers(context)) for body, context, _ in CASES]
        sent = emu.requests()[seen:]
        assert all(h["x-policy-speed"] == u.speed for h, u in answers)
        got[f"python-{mode}"] = [(decided(h), wire(e)) for (h, _), e in zip(answers, sent)]
    for mode in ("create", "stream", "create_stream"):
        seen = len(emu.requests())
        results = ts_calls(served.url, [{"mode": mode, "params": body, "headers": context_headers(context)}
                                        for body, context, _ in CASES])
        sent = emu.requests()[seen:]
        assert all(r["status"] == 200 and r["headers"]["x-policy-speed"] == r["usage"]["speed"] for r in results)
        got[f"typescript-{mode}"] = [(decided(r["headers"]), wire(e)) for r, e in zip(results, sent)]

    for client, decisions in got.items():
        assert decisions == expected, client


# -- curl and httpx ----------------------------------------------------------------------------------------


def curl(url: str, *, body: Any = None, headers: dict[str, str] | None = None, stream: bool = False
         ) -> tuple[int, dict[str, str], str]:
    """One POST with curl: (status, headers lower-cased, body text)."""
    args = [command("curl", "curl"), "-sS", "--max-time", "30", "-D", "-", "-X", "POST", url,
            "-H", "content-type: application/json", "--data-binary", "@-"]
    if stream:
        args.append("-N")
    for name, value in (headers or {}).items():
        args += ["-H", f"{name}: {value}"]
    done = subprocess.run(args, input=json.dumps(body).encode(), capture_output=True, timeout=60)
    assert done.returncode == 0, f"curl failed ({done.returncode}): {done.stderr.decode(errors='replace')}"
    head, _, text = done.stdout.decode().partition("\r\n\r\n")
    status_line, *lines = head.split("\r\n")
    fields = dict(line.split(":", 1) for line in lines)
    return int(status_line.split()[1]), {k.strip().lower(): v.strip() for k, v in fields.items()}, text


MESSAGES_HEADERS = {"x-api-key": API_KEY, "anthropic-version": ANTHROPIC_VERSION}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_curl_messages_request_through_the_proxy(stream: bool, either: Served, emu: Emulator) -> None:
    """A plain HTTP client gets the decision in headers; with auth on, the Messages path still wants only the
    client's own API key (passed on upstream), not the decision API's token. The stream goes as Claude Code sends
    its requests: to /v1/messages?beta=true, with a beta of its own."""
    seen = len(emu.requests())
    beta = {"anthropic-beta": "context-management-2025-06-27"} if stream else {}
    status, headers, text = curl(either.url + "/v1/messages" + ("?beta=true" if stream else ""),
                                 body={**params(), "stream": stream}, stream=stream,
                                 headers={**MESSAGES_HEADERS, **beta, "x-policy-tenant": "acme",
                                          "x-policy-label-team": "search"})
    assert status == 200, text
    assert decided(headers) == ("fast", "search-team", "allowed") and headers["x-policy-speed"] == "fast"
    if stream:
        assert headers["content-type"].startswith("text/event-stream")
        events = [line[len("event: "):] for line in text.splitlines() if line.startswith("event: ")]
        assert events[0] == "message_start" and events[-1] == "message_stop"
        [delta] = [json.loads(line[len("data: "):]) for line in text.splitlines()
                   if line.startswith("data: ") and '"message_delta"' in line]
        assert delta["usage"]["output_tokens"] == 16
    else:
        assert json.loads(text)["usage"]["speed"] == "fast"
    [entry] = wait_until(lambda: emu.requests()[seen:], "the emulator's record")
    assert wire(entry) == ("fast", True) and entry["headers"]["x-api-key"] == "<redacted>"
    assert entry["query"] == ("beta=true" if stream else "")
    assert entry["headers"]["anthropic-beta"].split(",") == [*beta.values(), "fast-mode-2026-02-01"]


class DecisionClient:
    """The decision API over curl or httpx: post(path, body, token) -> (status, JSON)."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind, self.url = kind, url

    def post(self, path: str, body: Any, token: str | None = None) -> tuple[int, Any]:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        if self.kind == "curl":
            status, _, text = curl(self.url + path, body=body, headers=headers)
            return status, json.loads(text)
        response = httpx.post(self.url + path, json=body, headers=headers, timeout=30)
        return response.status_code, response.json()


@pytest.mark.parametrize("kind", ["curl", "httpx"])
def test_decision_api_round_trip(kind: str, either: Served, emu: Emulator) -> None:
    """decide, call the emulator with what was decided (as a service calling Anthropic itself does), settle with the
    response's usage; release a second decision. With auth on, each verb wants the token (401 without)."""
    api = DecisionClient(kind, either.url)
    token = either.token
    held0 = ledger_held(either.ledger) if either.ledger is not None else 0
    request = {"params": params(), "context": {"interactive": True, "tenant": "acme"}}
    if token:
        for wrong in (None, "not-the-token"):
            status, body = api.post("/v1/decide", request, wrong)
            assert status == 401 and body["error"]["code"] == "unauthorized", body
    status, decision = api.post("/v1/decide", request, token)
    assert status == 200, decision
    assert decision["speed"] == "fast" and decision["decision"]["rule"] == "waiting"
    assert decision["params"]["speed"] == "fast" and "fast-mode" in decision["headers"]["anthropic-beta"]
    assert decision["expires_in_s"] > 0

    bill0 = emu.bill_micro()
    sent = httpx.post(emu.url + "/v1/messages", json=decision["params"],
                      headers={**MESSAGES_HEADERS, **decision["headers"]}, timeout=30)
    assert sent.status_code == 200 and sent.json()["usage"]["speed"] == "fast"
    billed = emu.bill_micro() - bill0
    assert billed > 0

    settle = {"decision_id": decision["decision_id"], "usage": sent.json()["usage"]}
    if token:
        status, body = api.post("/v1/settle", settle)
        assert status == 401 and body["error"]["code"] == "unauthorized", body  # and the decision is still open
    status, settled = api.post("/v1/settle", settle, token)
    assert status == 200, settled
    assert settled["speed"] == "fast" and round(settled["cost_usd"] * 1_000_000) == billed
    assert (settled["input_tokens"], settled["output_tokens"]) == (sent.json()["usage"]["input_tokens"], 16)
    status, again = api.post("/v1/settle", settle, token)
    assert status == 404 and again["error"]["code"] == "unknown_decision"

    status, other = api.post("/v1/decide", {"params": params(), "context": {"tenant": "batch"}}, token)
    assert status == 200 and other["speed"] == "standard" and "speed" not in other["params"] and other["headers"] == {}
    if token:
        status, body = api.post("/v1/release", {"decision_id": other["decision_id"]})
        assert status == 401, body
    status, released = api.post("/v1/release", {"decision_id": other["decision_id"]}, token)
    assert status == 200 and released == {"decision_id": other["decision_id"], "released": True}
    status, again = api.post("/v1/release", {"decision_id": other["decision_id"]}, token)
    assert status == 404 and again["error"]["code"] == "unknown_decision"
    if either.ledger is not None:
        assert ledger_held(either.ledger) <= held0


def test_decision_api_errors_keep_their_shape(served_auth: Served) -> None:
    """Bad bodies are refused in the decision API's own error shape, after the token is checked."""
    api = DecisionClient("httpx", served_auth.url)
    refused: list[tuple[str, dict[str, Any], str]] = [
        ("/v1/decide", {"params": params(), "context": {"latency_slo_ms": "soon"}}, "invalid_context"),
        ("/v1/decide", {"prams": params()}, "invalid_body"),
        ("/v1/settle", {"decision_id": "no-such-decision", "usage": None}, "unknown_decision"),
    ]
    for path, body, code in refused:
        status, answer = api.post(path, body, TOKEN)
        assert status in (400, 404) and answer["error"]["code"] == code, answer
        assert set(answer) == {"error"} and set(answer["error"]) == {"code", "message"}
