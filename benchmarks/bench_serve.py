#!/usr/bin/env python3
"""What `policy-engine serve` adds to each request, against the local emulator.

    python benchmarks/bench_serve.py [--requests N] [--rounds R] [--concurrency C] [--no-accel]

Three processes: the emulator (no token delay), one `policy-engine serve` in front of it
(policies/default.yaml, the in-memory ledger) and this client, which talks to both over
persistent httpx connections. A `direct` request goes to the emulator as the proxy would
put it on the wire (`speed: "fast"` and the fast-mode beta, set by hand); a `proxied` one
goes through the server with its context in `x-policy-*` headers (interactive, a latency
SLO that standard speed misses), so the server decides fast, reserves the premium,
forwards, and settles from the response. Both cause the same upstream traffic; the
difference is the proxy's hop and its work. Direct and proxied requests are interleaved
one for one, alternating which goes first, so machine noise hits both alike.

Measured:
1. non-streaming requests: p50/p99 latency direct and proxied, and what the proxy adds;
2. streams: time to the first byte of the body (the first SSE event) direct and proxied,
   and the whole stream;
3. throughput: requests/s with C requests in flight (one asyncio client), blocks of
   direct and proxied requests alternating; on this 2-core machine the client, the proxy
   and the emulator share the cores, so it is a system figure, not the proxy's ceiling;
4. the decision API: POST /v1/decide then /v1/settle, one round trip each, p50/p99.

The machine is shared: rounds 1 and 2 are repeated R times; every round is printed and
the figures below them are the round whose direct p50 was fastest (the least disturbed).
Targets (issue 17): at most +1 ms at p50 non-streaming, and a stream's first byte at most
1 ms later than direct (p50). uvicorn uses httptools and uvloop when they are installed (the
`serve` extra); `--no-accel` hides them from the server process to compare.
Last line: `serve: +X ms p50 (target 1 ms), TTFB +Y ms (target 1 ms), proxied/direct p50 ratio Z`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench_middleware import CONTEXT, PARAMS, POLICY, percentile, round_arguments  # noqa: E402 - the same request and policy
from policy_engine.decide import FAST_BETA  # noqa: E402

COMMON = {"x-api-key": "bench", "anthropic-version": "2023-06-01", "content-type": "application/json"}
DIRECT_HEADERS = {**COMMON, "anthropic-beta": FAST_BETA}
PROXIED_HEADERS = {**COMMON, "x-policy-interactive": "true", "x-policy-latency-slo-ms": str(CONTEXT["latency_slo_ms"])}
DIRECT_BODY = json.dumps({**PARAMS, "speed": "fast"}).encode()
PROXIED_BODY = json.dumps(PARAMS).encode()
DIRECT_STREAM = json.dumps({**PARAMS, "speed": "fast", "stream": True}).encode()
PROXIED_STREAM = json.dumps({**PARAMS, "stream": True}).encode()


def ms(ns: int) -> float:
    return ns / 1e6


class Process:
    """A child process whose stderr is drained by a thread (a full pipe would stall it), with the first
    line matching `ready` awaited."""

    def __init__(self, command: list[str], ready: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        cwd=ROOT, env=env)
        self.lines: list[str] = []
        found, self.url = threading.Event(), ""

        def drain() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.lines.append(line)
                match = re.search(ready, line)
                if match and not found.is_set():
                    self.url = match.group(1)
                    found.set()
            found.set()

        threading.Thread(target=drain, daemon=True).start()
        if not found.wait(60) or not self.url:
            self.stop()
            raise SystemExit(f"{command[2:4]} did not start:\n{''.join(self.lines)}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_emulator() -> Process:
    # A wrapper rather than the emulator's main(): no token delay, and a listen backlog for the throughput
    # figure's bursts of new connections (the stdlib server's 5 drops some, which costs a 1 s SYN retry).
    code = ("import sys, threading, http.server; http.server.ThreadingHTTPServer.request_queue_size = 1024; "
            "from policy_engine.testing.emulator import Emulator; "
            "e = Emulator(port=0, standard_otps=None, fast_input_tokens_per_minute=10**12, "
            "fast_output_tokens_per_minute=10**12).start(); "
            "print('emulator listening on', e.url, file=sys.stderr, flush=True); threading.Event().wait()")
    return Process([sys.executable, "-c", code], r"listening on (http://\S+)")


def start_server(upstream: str, no_accel: bool) -> Process:
    env = dict(os.environ)
    if no_accel:
        # Modules that fail to import hide the real ones: uvicorn's "auto" then picks h11 and asyncio.
        hide = Path(tempfile.mkdtemp(prefix="bench-serve-noaccel-"))
        for name in ("httptools", "uvloop"):
            (hide / f"{name}.py").write_text("raise ImportError('hidden by bench_serve.py --no-accel')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(hide), env.get("PYTHONPATH", "")])
    return Process([sys.executable, "-m", "policy_engine", "serve", str(POLICY), "--listen", "127.0.0.1:0",
                    "--upstream", upstream, "--allow-http-upstream"], r"listening on (http://\S+)", env=env)


class Side:
    """Where one side's requests go."""

    def __init__(self, name: str, base: str, body: bytes, stream_body: bytes, headers: dict[str, str]) -> None:
        self.name, self.url, self.body, self.stream_body, self.headers = name, base + "/v1/messages", body, stream_body, headers


def check(client: httpx.Client, direct: Side, proxied: Side) -> None:
    """Both sides are served fast, and the proxy decided so."""
    d = client.post(direct.url, content=direct.body, headers=direct.headers)
    p = client.post(proxied.url, content=proxied.body, headers=proxied.headers)
    assert d.status_code == p.status_code == 200, (d.text, p.text)
    assert d.json()["usage"]["speed"] == p.json()["usage"]["speed"] == "fast"
    assert p.headers["x-policy-speed"] == "fast" and p.headers["x-policy-outcome"] == "allowed", p.headers


def call(client: httpx.Client, side: Side) -> int:
    started = time.perf_counter_ns()
    response = client.post(side.url, content=side.body, headers=side.headers)
    took = time.perf_counter_ns() - started
    assert response.status_code == 200, response.text
    return took


def stream(client: httpx.Client, side: Side) -> tuple[int, int]:
    """(ns to the first byte of the body, ns to its end)."""
    started = time.perf_counter_ns()
    with client.stream("POST", side.url, content=side.stream_body, headers=side.headers) as response:
        chunks = response.iter_raw()
        first = next(chunks)
        first_at = time.perf_counter_ns()
        tail = b"".join(chunks)
    ended = time.perf_counter_ns()
    assert response.status_code == 200 and (first + tail).rstrip().endswith(b'{"type":"message_stop"}'), tail[-200:]
    return first_at - started, ended - started


class Round:
    """One round's interleaved samples (ns): non-streaming latency, stream first byte and end, per side."""

    def __init__(self) -> None:
        self.calls: dict[str, list[int]] = {"direct": [], "proxied": []}
        self.ttfb: dict[str, list[int]] = {"direct": [], "proxied": []}
        self.streams: dict[str, list[int]] = {"direct": [], "proxied": []}

    def p(self, what: str, side: str, q: float = 0.5) -> float:
        return ms(int(percentile(getattr(self, what)[side], q)))

    def added(self, what: str, q: float = 0.5) -> float:
        return self.p(what, "proxied", q) - self.p(what, "direct", q)


def interleaved(client: httpx.Client, sides: list[Side], requests: int) -> Round:
    result = Round()
    gc.collect()
    for i in range(requests):
        for side in sides if i % 2 else sides[::-1]:  # each side goes first half of the time
            result.calls[side.name].append(call(client, side))
        for side in sides[::-1] if i % 2 else sides:
            first, whole = stream(client, side)
            result.ttfb[side.name].append(first)
            result.streams[side.name].append(whole)
        if i % 100 == 99:
            gc.collect()  # collections land between pairs, not inside one side's timing
    return result


async def _block(client: httpx.AsyncClient, side: Side, requests: int, concurrency: int) -> float:
    """Requests/s of `requests` non-streaming requests with `concurrency` in flight."""
    left = iter(range(requests))

    async def worker() -> None:
        for _ in left:
            response = await client.post(side.url, content=side.body, headers=side.headers)
            assert response.status_code == 200, response.text

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return requests / (time.perf_counter() - started)


async def throughput(sides: list[Side], requests: int, concurrency: int, blocks: int) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {side.name: [] for side in sides}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        for side in sides:
            await _block(client, side, concurrency * 4, concurrency)  # open the connections, warm up
        for b in range(blocks):
            for side in sides if b % 2 else sides[::-1]:
                gc.collect()
                rates[side.name].append(await _block(client, side, requests, concurrency))
    return rates


def decision_api(client: httpx.Client, base: str, requests: int) -> tuple[list[int], list[int]]:
    """ns of decide+settle (two round trips), and of decide alone."""
    both, decide_only = [], []
    decide_body = json.dumps({"params": PARAMS, "context": CONTEXT}).encode()
    usage = {"input_tokens": 40, "output_tokens": 16, "speed": "fast"}
    headers = {"content-type": "application/json"}
    for i in range(requests):
        started = time.perf_counter_ns()
        decided = client.post(base + "/v1/decide", content=decide_body, headers=headers)
        middle = time.perf_counter_ns()
        answer = decided.json()
        assert decided.status_code == 200 and answer["speed"] == "fast", decided.text
        settled = client.post(base + "/v1/settle", content=json.dumps({"decision_id": answer["decision_id"], "usage": usage}),
                              headers=headers)
        ended = time.perf_counter_ns()
        assert settled.status_code == 200, settled.text
        both.append(ended - started)
        decide_only.append(middle - started)
        if i % 100 == 99:
            gc.collect()
    return both, decide_only


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    round_arguments(parser, "interleaved pairs per round, of non-streaming requests and of streams", 200)
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight for the throughput figure")
    parser.add_argument("--throughput-requests", type=int, default=2_000, help="requests per throughput block")
    parser.add_argument("--decisions", type=int, default=2_000, help="decide+settle round trips timed")
    parser.add_argument("--no-accel", action="store_true", help="hide httptools and uvloop from the server process")
    args = parser.parse_args()
    from policy_engine import _mypyc  # after the imports above: it names the compiled modules they loaded
    import policy_engine.decide  # noqa: F401 - the decision path, as the server imports it

    print(f"build: {_mypyc.checked_build('this would measure')} (the server process imports the same tree)", flush=True)
    accel = [name for name in ("httptools", "uvloop") if importlib.util.find_spec(name) is not None]
    if args.no_accel or not accel:
        print("server: uvicorn with h11 and asyncio" + (" (--no-accel)" if args.no_accel else ""), flush=True)
    else:
        print(f"server: uvicorn with {' and '.join(accel)} (installed, so uvicorn's 'auto' picks them)", flush=True)

    emulator = start_emulator()
    server: Process | None = None
    try:
        server = start_server(emulator.url, args.no_accel)
        direct = Side("direct", emulator.url, DIRECT_BODY, DIRECT_STREAM, DIRECT_HEADERS)
        proxied = Side("proxied", server.url, PROXIED_BODY, PROXIED_STREAM, PROXIED_HEADERS)
        sides = [direct, proxied]
        with httpx.Client(timeout=60) as client:
            check(client, direct, proxied)
            interleaved(client, sides, args.warmup)
            rounds = [interleaved(client, sides, args.requests) for _ in range(args.rounds)]
            decision_api(client, server.url, args.warmup)
            both, decide_only = decision_api(client, server.url, args.decisions)
        rates = asyncio.run(throughput(sides, args.throughput_requests, args.concurrency, blocks=4))
    finally:
        if server is not None:
            server.stop()
        emulator.stop()
    if server.process.returncode not in (0, -15) or "Traceback" in "".join(server.lines):
        print("".join(server.lines), file=sys.stderr)
        raise SystemExit(f"the server failed (exit {server.process.returncode})")

    print(f"requests per side: {args.requests} non-streaming + {args.requests} streams x {args.rounds} rounds "
          f"(interleaved), emulator and server on 127.0.0.1, policy {POLICY.name}, in-memory ledger")
    for number, r in enumerate(rounds, 1):
        print(f"round {number}: non-streaming p50 {r.p('calls', 'direct'):.3f} ms direct, {r.p('calls', 'proxied'):.3f} ms "
              f"proxied: {r.added('calls'):+.3f} ms; stream first byte p50 {r.p('ttfb', 'direct'):.3f} ms direct, "
              f"{r.p('ttfb', 'proxied'):.3f} ms proxied: {r.added('ttfb'):+.3f} ms")
    best = min(rounds, key=lambda r: r.p("calls", "direct"))
    print(f"median over rounds: non-streaming {statistics.median(r.added('calls') for r in rounds):+.3f} ms, "
          f"first byte {statistics.median(r.added('ttfb') for r in rounds):+.3f} ms at p50; below, the least disturbed "
          f"round: {rounds.index(best) + 1} (fastest direct p50)")
    added_p50, added_p99 = best.added("calls"), best.added("calls", 0.99)
    ttfb_added = best.added("ttfb")
    print(f"1. non-streaming: direct p50 {best.p('calls', 'direct'):.3f} ms, p99 {best.p('calls', 'direct', 0.99):.3f} ms; "
          f"proxied p50 {best.p('calls', 'proxied'):.3f} ms, p99 {best.p('calls', 'proxied', 0.99):.3f} ms; "
          f"added p50 {added_p50:+.3f} ms, p99 {added_p99:+.3f} ms")
    print(f"2. streams: first byte direct p50 {best.p('ttfb', 'direct'):.3f} ms, proxied p50 {best.p('ttfb', 'proxied'):.3f} ms "
          f"(added {ttfb_added:+.3f} ms, p99 {best.added('ttfb', 0.99):+.3f} ms); whole stream p50 "
          f"{best.p('streams', 'direct'):.3f} ms direct, {best.p('streams', 'proxied'):.3f} ms proxied "
          f"({best.added('streams'):+.3f} ms)")
    d_rate, p_rate = statistics.median(rates["direct"]), statistics.median(rates["proxied"])
    print(f"3. throughput with {args.concurrency} in flight (median of {len(rates['direct'])} blocks of "
          f"{args.throughput_requests}): direct {d_rate:,.0f} req/s, proxied {p_rate:,.0f} req/s "
          f"({p_rate / d_rate:.2f} of direct; blocks direct {', '.join(f'{r:,.0f}' for r in rates['direct'])}, "
          f"proxied {', '.join(f'{r:,.0f}' for r in rates['proxied'])})")
    print(f"4. decision API: decide+settle p50 {ms(int(statistics.median(both))):.3f} ms, p99 "
          f"{ms(int(percentile(both, 0.99))):.3f} ms (decide alone p50 {ms(int(statistics.median(decide_only))):.3f} ms, "
          f"{args.decisions} round trip pairs)")
    print(f"target: +1 ms or less at p50 non-streaming -> {'met' if added_p50 <= 1 else 'NOT met'}")
    print(f"target: first byte of a stream +1 ms or less at p50 -> {'met' if ttfb_added <= 1 else 'NOT met'}")
    ratio = best.p("calls", "proxied") / best.p("calls", "direct")
    print(f"serve: {added_p50:+.3f} ms p50 (target 1 ms), TTFB {ttfb_added:+.3f} ms (target 1 ms), "
          f"proxied/direct p50 ratio {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
