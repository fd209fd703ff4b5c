"""Benchmark: policy_engine.cel compiled programs vs celpy's interpreter vs hand-written Python,
and what compiling each expression costs.

Run:  .venv/bin/python benchmarks/bench_cel.py  [--quick]

Compile columns: `cold` is a compile with the process-wide caches cleared (parse, check,
generate, CPython's compile of the generated function), the first compile of a source in a
process; `cached` is compiling it again (a reload or lint of an unchanged policy, the same
expression in another rule or file); `celpy` is celpy's own compile (`Environment.compile`
plus `program`) of the same source. Target (issue 15): <= 100 us per typical expression;
"typical" is measured against the packaged policies: a line before the table compares the
lengths of policies/*.yaml's expressions with these cases'.

The last line printed is:
    cel: Nx faster than celpy interpreter, Mx of hand-written python; compile C us cold, K us cached (target 100 us)
(geometric means over all expressions; M = our time / hand-written time).
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
import sys
import time
import timeit
import warnings
from pathlib import Path
from zoneinfo import ZoneInfo

warnings.filterwarnings("ignore")

import celpy  # noqa: E402

from policy_engine.cel import cache  # noqa: E402
from policy_engine.cel.celpy_values import from_celpy, to_celpy  # noqa: E402
from policy_engine.cel import (  # noqa: E402
    BOOL, DOUBLE, INT, STRING, TIMESTAMP, Field, ListType, MapType, ObjectType, compile,
)

S = STRING.with_max(256)
DECLS = {
    "request": ObjectType("Request", {
        "model": S, "max_tokens": INT, "input_tokens": INT, "stream": BOOL, "has_tools": BOOL,
        "betas": ListType(S, max_size=16),
    }),
    "context": ObjectType("Context", {
        "tenant": S, "interactive": BOOL, "latency_slo_ms": INT, "labels": MapType(S, S, max_size=32),
    }),
    "budget": ObjectType("Budget", {"remaining_usd": DOUBLE, "fraction_left": DOUBLE}),
    "ratelimit": ObjectType("RateLimit", {
        "requests_remaining": Field(INT, optional=True), "tokens_remaining": Field(INT, optional=True),
    }),
    "now": TIMESTAMP,
}

ACT = {
    "request": {"model": "claude-opus-4-1", "max_tokens": 4096, "input_tokens": 12000, "stream": True,
                "has_tools": False, "betas": ["fast-mode-2025", "interleaved-thinking", "context-1m"]},
    "context": {"tenant": "acme", "interactive": True, "latency_slo_ms": 800,
                "labels": {"team": "search", "tier": "vip", "env": "prod", "region": "us"}},
    "budget": {"remaining_usd": 42.5, "fraction_left": 0.35},
    "ratelimit": {"requests_remaining": 120},
    "now": dt.datetime(2025, 6, 3, 15, 30, tzinfo=dt.timezone.utc),
}
NY = ZoneInfo("America/New_York")

# (CEL, hand-written Python equivalent over the activation dict)
CASES = [
    ("request.input_tokens > 1000 && context.interactive",
     lambda a: a["request"]["input_tokens"] > 1000 and a["context"]["interactive"]),
    ("request.max_tokens <= 8192", lambda a: a["request"]["max_tokens"] <= 8192),
    ("request.model.startsWith('claude-opus')", lambda a: a["request"]["model"].startswith("claude-opus")),
    ("request.model in ['claude-opus-4-1', 'claude-sonnet-4']",
     lambda a: a["request"]["model"] in ("claude-opus-4-1", "claude-sonnet-4")),
    ("context.tenant in ['acme', 'globex', 'initech']", lambda a: a["context"]["tenant"] in ("acme", "globex", "initech")),
    ("'fast-mode-2025' in request.betas", lambda a: "fast-mode-2025" in a["request"]["betas"]),
    ("request.stream && !request.has_tools", lambda a: a["request"]["stream"] and not a["request"]["has_tools"]),
    ("context.latency_slo_ms < 1000 || request.input_tokens < 2000",
     lambda a: a["context"]["latency_slo_ms"] < 1000 or a["request"]["input_tokens"] < 2000),
    ("budget.remaining_usd * budget.fraction_left > 10.0",
     lambda a: a["budget"]["remaining_usd"] * a["budget"]["fraction_left"] > 10.0),
    ("budget.remaining_usd - 5.0 >= 0.0 && budget.fraction_left > 0.2",
     lambda a: a["budget"]["remaining_usd"] - 5.0 >= 0.0 and a["budget"]["fraction_left"] > 0.2),
    ("context.labels.exists(l, l == 'tier')", lambda a: any(k == "tier" for k in a["context"]["labels"])),
    ("context.labels['tier'] == 'vip'", lambda a: a["context"]["labels"]["tier"] == "vip"),
    ("'tier' in context.labels && context.labels['tier'] == 'vip'",
     lambda a: "tier" in a["context"]["labels"] and a["context"]["labels"]["tier"] == "vip"),
    ("request.betas.exists(b, b.startsWith('fast-mode'))",
     lambda a: any(b.startswith("fast-mode") for b in a["request"]["betas"])),
    ("now.getHours('America/New_York') >= 9 && now.getHours('America/New_York') < 17",
     lambda a: 9 <= a["now"].astimezone(NY).hour < 17),
    ("now.getDayOfWeek() != 0", lambda a: (a["now"].weekday() + 1) % 7 != 0),
    ("has(ratelimit.requests_remaining) && ratelimit.requests_remaining > 100",
     lambda a: "requests_remaining" in a["ratelimit"] and a["ratelimit"]["requests_remaining"] > 100),
    ("has(ratelimit.tokens_remaining) ? ratelimit.tokens_remaining > request.input_tokens : true",
     lambda a: a["ratelimit"]["tokens_remaining"] > a["request"]["input_tokens"] if "tokens_remaining" in a["ratelimit"] else True),
    ("request.input_tokens + request.max_tokens < 200000",
     lambda a: a["request"]["input_tokens"] + a["request"]["max_tokens"] < 200000),
    ("context.interactive ? context.latency_slo_ms : 10000",
     lambda a: a["context"]["latency_slo_ms"] if a["context"]["interactive"] else 10000),
    ("size(request.betas) > 2", lambda a: len(a["request"]["betas"]) > 2),
    ("request.model.contains('opus') && budget.fraction_left > 0.1",
     lambda a: "opus" in a["request"]["model"] and a["budget"]["fraction_left"] > 0.1),
    ("request.model.matches('^claude-(opus|sonnet)')",
     lambda a: a["request"]["model"].startswith(("claude-opus", "claude-sonnet"))),
    ("request.input_tokens / 1000 >= 12", lambda a: int(a["request"]["input_tokens"] / 1000) >= 12),
]


def per_call_us(fn, arg, number):
    t = min(timeit.repeat(lambda: fn(arg), number=number, repeat=3))
    return t / number * 1e6


def cold_compile_us(src: str, rounds: int) -> float:
    """The fastest of `rounds` compiles, each after clearing the parse and program caches."""
    best = math.inf
    for _ in range(rounds):
        cache.clear()
        started = time.perf_counter()
        compile(src, DECLS)
        best = min(best, time.perf_counter() - started)
    return best * 1e6


def celpy_compile_us(env, src: str, rounds: int) -> float:
    return min(timeit.repeat(lambda: env.program(env.compile(src)), number=1, repeat=rounds)) * 1e6


TARGET_COMPILE_US = 100
POLICIES = Path(__file__).resolve().parent.parent / "policies"


def packaged_expressions() -> list[str]:
    """Every CEL expression of the packaged policies (policies/*.yaml): what "typical" is measured against."""
    from policy_engine.load import parse_policy

    return [e for path in sorted(POLICIES.glob("*.yaml")) for e in parse_policy(str(path))[0].expressions()]


def typical_line() -> str:
    """How the cases below compare with the packaged policies' expressions, by length."""
    packaged = [len(s) for s in packaged_expressions()]
    cases = [len(s) for s, _ in CASES]
    return (f"typical: the {len(packaged)} expressions of policies/*.yaml are {statistics.median(packaged):.0f} characters"
            f" long (median; {min(packaged)}-{max(packaged)}), the {len(cases)} cases below {statistics.median(cases):.0f}"
            f" ({min(cases)}-{max(cases)})")


def main() -> None:
    from policy_engine import _mypyc  # after the imports above: it names the compiled modules they loaded

    print(f"build: {_mypyc.checked_build('this would measure')}", flush=True)
    print(typical_line(), flush=True)
    quick = "--quick" in sys.argv
    n_fast, n_celpy = (2_000, 50) if quick else (20_000, 300)
    n_compile = 5 if quick else 30
    env = celpy.Environment(runner_class=celpy.InterpretedRunner)
    celpy_act = {k: to_celpy(v) for k, v in ACT.items()}
    speedups, ratios, colds, hits = [], [], [], []
    print(f"{'':<58} {'compile µs':^26} | {'evaluate µs':^28}")
    print(f"{'expression':<58} {'cold':>7} {'cached':>7} {'celpy':>9} | {'cel':>7} {'celpy':>8} {'python':>7}"
          f" {'vs celpy':>9} {'vs py':>6}")
    for src, hand in CASES:
        t_cold = cold_compile_us(src, n_compile)
        prog = compile(src, DECLS)
        t_hit = per_call_us(lambda s: compile(s, DECLS), src, n_fast // 4)
        t_celpy_compile = celpy_compile_us(env, src, max(3, n_compile // 6))
        colds.append(t_cold)
        hits.append(t_hit)
        runner = env.program(env.compile(src))
        mine, theirs, expected = prog.evaluate(ACT), from_celpy(runner.evaluate(celpy_act)), hand(ACT)
        if not (mine == expected == theirs and type(mine) is type(expected)):
            raise SystemExit(f"result mismatch for {src!r}: cel={mine!r} celpy={theirs!r} python={expected!r}")
        t_cel = per_call_us(prog.evaluate, ACT, n_fast)
        t_celpy = per_call_us(runner.evaluate, celpy_act, n_celpy)
        t_py = per_call_us(hand, ACT, n_fast)
        speedups.append(t_celpy / t_cel)
        ratios.append(t_cel / t_py)
        label = src if len(src) <= 58 else src[:55] + "..."
        print(f"{label:<58} {t_cold:7.0f} {t_hit:7.2f} {t_celpy_compile:9.0f} | {t_cel:7.3f} {t_celpy:8.1f} {t_py:7.3f}"
              f" {t_celpy / t_cel:8.0f}x {t_cel / t_py:5.2f}x")
    geo = lambda xs: math.exp(sum(map(math.log, xs)) / len(xs))  # noqa: E731
    cold, hit = geo(colds), geo(hits)
    verdict = lambda us: "met" if us <= TARGET_COMPILE_US else "NOT met"  # noqa: E731
    print(f"{len(CASES)} expressions")
    print(f"compile (geometric mean): cold {cold:.0f} us (target {TARGET_COMPILE_US} us: {verdict(cold)}), "
          f"cached {hit:.1f} us (target {verdict(hit)}), celpy {geo([celpy_compile_us(env, s, 3) for s, _ in CASES]):.0f} us")
    print(f"cel: {geo(speedups):.1f}x faster than celpy interpreter, {geo(ratios):.1f}x of hand-written python; "
          f"compile {cold:.0f} us cold, {hit:.1f} us cached (target {TARGET_COMPILE_US} us)")


if __name__ == "__main__":
    main()
