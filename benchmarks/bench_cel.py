"""Benchmark: policy_engine.cel compiled programs vs celpy's interpreter vs hand-written Python.

Run:  .venv/bin/python benchmarks/bench_cel.py  [--quick]

The last line printed is:
    cel: Nx faster than celpy interpreter, Mx of hand-written python
(geometric means over all expressions; M = our time / hand-written time).
"""

from __future__ import annotations

import datetime as dt
import math
import sys
import timeit
import warnings
from zoneinfo import ZoneInfo

warnings.filterwarnings("ignore")

import celpy  # noqa: E402

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


def main() -> None:
    from policy_engine import _mypyc  # after the imports above: it names the compiled modules they loaded

    print(f"build: {_mypyc.checked_build('this would measure')}", flush=True)
    quick = "--quick" in sys.argv
    n_fast, n_celpy = (2_000, 50) if quick else (20_000, 300)
    env = celpy.Environment(runner_class=celpy.InterpretedRunner)
    celpy_act = {k: to_celpy(v) for k, v in ACT.items()}
    speedups, ratios = [], []
    print(f"{'expression':<70} {'cel µs':>8} {'celpy µs':>9} {'python µs':>9} {'vs celpy':>9} {'vs py':>6}")
    for src, hand in CASES:
        prog = compile(src, DECLS)
        runner = env.program(env.compile(src))
        mine, theirs, expected = prog.evaluate(ACT), from_celpy(runner.evaluate(celpy_act)), hand(ACT)
        if not (mine == expected == theirs and type(mine) is type(expected)):
            raise SystemExit(f"result mismatch for {src!r}: cel={mine!r} celpy={theirs!r} python={expected!r}")
        t_cel = per_call_us(prog.evaluate, ACT, n_fast)
        t_celpy = per_call_us(runner.evaluate, celpy_act, n_celpy)
        t_py = per_call_us(hand, ACT, n_fast)
        speedups.append(t_celpy / t_cel)
        ratios.append(t_cel / t_py)
        label = src if len(src) <= 70 else src[:67] + "..."
        print(f"{label:<70} {t_cel:8.3f} {t_celpy:9.1f} {t_py:9.3f} {t_celpy / t_cel:8.0f}x {t_cel / t_py:5.2f}x")
    geo = lambda xs: math.exp(sum(map(math.log, xs)) / len(xs))  # noqa: E731
    print(f"{len(CASES)} expressions")
    print(f"cel: {geo(speedups):.1f}x faster than celpy interpreter, {geo(ratios):.1f}x of hand-written python")


if __name__ == "__main__":
    main()
