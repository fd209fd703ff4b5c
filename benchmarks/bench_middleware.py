#!/usr/bin/env python3
"""What `FastModePolicy` adds to each anthropic SDK request, against the local emulator.

    python benchmarks/bench_middleware.py [--requests N]

Two sync clients of the real SDK talk to one emulator (its own process) over keep-alive connections:
`plain` sends each request as the middleware would put it on the wire (`speed: "fast"`
and the fast-mode beta, set by hand), `policy` sends the caller's request through
`FastModePolicy` with policies/default.yaml (an interactive request with a latency SLO
that standard speed misses, so it goes fast and its premium is reserved and settled).
Both therefore cause the same traffic; the difference is the middleware. Requests are
interleaved one for one (alternating which goes first) so machine noise hits both alike.

The engine's own decide()+settle() is timed separately on the same request, to show how
much of the added time is the decision and how much the SDK plumbing.
The client's CPU time per request is printed too: it is what the middleware costs
when the machine is busy and wall time is not. Target (issue 5): +150 us or less at
p50 (wall). Last line:
`middleware: +X us per request (p50), ratio R`.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import anthropic  # noqa: E402

from policy_engine.decide import FAST_BETA, load  # noqa: E402
from policy_engine.integrations.anthropic import FastModePolicy  # noqa: E402

POLICY = ROOT / "policies" / "default.yaml"
CONTEXT = {"interactive": True, "latency_slo_ms": 5_000}
PARAMS = {
    "model": "claude-opus-4-6",
    "max_tokens": 1024,
    "system": "You are a helpful assistant for an engineering team. Answer briefly.",
    "messages": [{"role": "user", "content": "How do I make this Python function faster without changing what it returns?"}],
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1_000, help="timed requests per client (at least 500)")
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args()
    if args.requests < 500:
        parser.error("--requests must be at least 500")

    # The emulator runs in its own process: in this one it would compete for the GIL with
    # the client being measured.
    server = subprocess.Popen(
        [sys.executable, "-m", "policy_engine.testing.emulator", "--port", "0", "--standard-otps", "0",
         "--fast-input-tpm", str(10**12), "--fast-output-tpm", str(10**12)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert server.stdout is not None
    url = server.stdout.readline().split()[3]
    engine = load(POLICY)
    policy = anthropic.Anthropic(base_url=url, api_key="bench", max_retries=0,
                                 middleware=[FastModePolicy(engine, context=CONTEXT)])
    plain = anthropic.Anthropic(base_url=url, api_key="bench", max_retries=0)
    wire = {**PARAMS, "speed": "fast", "extra_headers": {"anthropic-beta": FAST_BETA}}

    def send_policy() -> None:
        message = policy.messages.create(**PARAMS)
        assert message.usage.speed == "fast"

    def send_plain() -> None:
        plain.messages.create(**wire)

    cpu = {"with": [], "without": []}  # this thread's CPU time: what the client itself spent

    def timed(send: object) -> float:
        started, cpu_started = time.perf_counter_ns(), time.thread_time_ns()
        send()  # type: ignore[operator]
        elapsed = (time.perf_counter_ns() - started) / 1_000
        cpu["with" if send is send_policy else "without"].append((time.thread_time_ns() - cpu_started) / 1_000)
        return elapsed

    for _ in range(args.warmup):
        send_policy()
        send_plain()
    with_policy: list[float] = []
    without: list[float] = []
    gc.collect()
    for i in range(args.requests):
        if i % 2:
            with_policy.append(timed(send_policy))
            without.append(timed(send_plain))
        else:
            without.append(timed(send_plain))
            with_policy.append(timed(send_policy))
        if i % 100 == 99:
            gc.collect()  # collections land between pairs, not inside one side's timing

    # The engine alone, on the same request: the decision's share of the added time.
    engine_times = []
    usage = {"input_tokens": 40, "output_tokens": 16, "speed": "fast"}
    for _ in range(args.requests):
        started = time.perf_counter_ns()
        decision = engine.decide(PARAMS, CONTEXT)
        engine.settle(decision, usage)
        engine_times.append((time.perf_counter_ns() - started) / 1_000)
    server.terminate()
    server.wait(timeout=10)

    p50_with, p50_without = statistics.median(with_policy), statistics.median(without)
    added, ratio = p50_with - p50_without, p50_with / p50_without
    engine_p50 = statistics.median(engine_times)
    print(f"requests per client: {args.requests} (interleaved), emulator on 127.0.0.1, policy {POLICY.name}")
    print(f"without middleware: p50 {p50_without:,.0f} us, p90 {percentile(without, 0.9):,.0f} us")
    print(f"with FastModePolicy: p50 {p50_with:,.0f} us, p90 {percentile(with_policy, 0.9):,.0f} us")
    cpu_with, cpu_without = statistics.median(cpu["with"]), statistics.median(cpu["without"])
    print(f"client CPU per request: p50 {cpu_without:,.0f} us without, {cpu_with:,.0f} us with (+{cpu_with - cpu_without:,.0f} us)")
    print(f"engine decide+settle alone: p50 {engine_p50:,.0f} us; SDK plumbing: ~{added - engine_p50:,.0f} us")
    print(f"target: +150 us or less at p50 -> {'met' if added <= 150 else 'NOT met'}")
    print(f"middleware: +{added:.0f} us per request (p50), ratio {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
