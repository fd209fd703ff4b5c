#!/usr/bin/env python3
"""decide() + settle() latency with policies/default.yaml, against celpy and a hand-written policy.

    python benchmarks/bench_decide.py [--rounds N] [--profile]

Three pipelines run on the same corpus of realistic requests (a short chat, a
50K-token document, a tool-use loop, a streamed multi-turn conversation), in the
same process, interleaved round by round so machine noise hits them alike:

* engine: `Engine.decide()` then `Engine.settle()`, input tokens estimated, no
  OpenTelemetry SDK installed (the API's no-op path);
* celpy: the same Engine pipeline with every CEL program of the policy evaluated by
  celpy's interpreter (`celpy.Environment().program(ast)`) on the same activations,
  converted with `policy_engine.cel.celpy_values.to_celpy`;
* hand-written: a plain Python function of the same policy doing the same work:
  features (token estimate, throughput, costs from the catalog), the three rules,
  the per-request ceiling, the premium budget reserved and settled in a MemoryLedger.

Each decide+settle pair is timed with perf_counter_ns. Budgets never run out: each
round gets a fresh ledger. Targets (issue 4): p50 <= 20 us, >= 100x celpy, <= 5x of
hand-written. The last line is `decide: p50 X us, Nx faster than celpy, Mx of hand-written`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import random
import sys
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policy_engine.catalog import actual, estimate, load_catalog  # noqa: E402
from policy_engine.compile import CompiledPolicy, compile_file  # noqa: E402
from policy_engine.cel.celpy_values import from_celpy, to_celpy  # noqa: E402
from policy_engine.decide import Engine  # noqa: E402
from policy_engine.ledger import MemoryLedger, Scope, window_bounds  # noqa: E402
from policy_engine.tokens import estimate_input_tokens  # noqa: E402

POLICY = ROOT / "policies" / "default.yaml"
OPUS = "claude-opus-5"  # fast mode works today (Opus 4.6's was retired on 2026-06-29)

# --------------------------------------------------------------------------- corpus

_WORDS = ("the of and to in is that for it as with was on be by this are from at or an have not which but all "
          "service latency request budget model policy cache token stream window tenant reserve settle").split()


def _prose(rng: random.Random, words: int) -> str:
    out, line = [], []
    for i in range(words):
        w = rng.choice(_WORDS)
        line.append(w.capitalize() if not line else w)
        if len(line) > 12 and rng.random() < 0.2:
            out.append(" ".join(line) + ".")
            line = []
        if i % 180 == 179:
            out.append("\n\n")
    out.append(" ".join(line) + ".")
    return " ".join(out)


def corpus(seed: int = 7) -> list[tuple[str, Callable[[int], dict[str, Any]], dict[str, Any], Callable[[str], dict[str, Any]]]]:
    """(kind, params_for(iteration), context, usage_for(speed)) for each realistic request.

    What a real caller sends again is the same object every time (system prompts, tool
    definitions, a conversation's earlier turns, the document being asked about); what a
    real caller sends new is new text in every iteration (the question, the tool result,
    the conversation's latest turn), so no estimate of it is ever reused.
    """
    rng = random.Random(seed)
    chat = {
        "model": OPUS, "max_tokens": 1024,
        "system": "You are a helpful assistant for an engineering team. Answer briefly.",
        "messages": [{"role": "user", "content": "How do I make this Python function faster without changing what it returns?"}],
    }
    document = {
        "model": OPUS, "max_tokens": 2048,
        "messages": [{"role": "user", "content": [
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": _prose(rng, 37_000)},
             "title": "Quarterly operations report", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "List the three biggest risks this report mentions, with a quote for each."},
        ]}],
    }
    tools = [
        {"name": "search_tickets", "description": "Full-text search over support tickets.",
         "input_schema": {"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
                          "required": ["query"]}},
        {"name": "get_ticket", "description": "Fetch one ticket with its comments.",
         "input_schema": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}},
        {"name": "update_ticket", "description": "Set the status or assignee of a ticket.",
         "input_schema": {"type": "object", "properties": {"id": {"type": "string"},
                                                           "status": {"type": "string", "enum": ["open", "pending", "closed"]},
                                                           "assignee": {"type": "string"}}, "required": ["id"]}},
    ]
    tool_use = {
        "model": OPUS, "max_tokens": 4096, "tools": tools, "tool_choice": {"type": "auto"},
        "system": "You triage support tickets. Use the tools; never guess ticket contents.",
        "messages": [
            {"role": "user", "content": "Close every ticket about the login outage that has been resolved."},
            {"role": "assistant", "content": [
                {"type": "text", "text": "I'll search for the login outage tickets first."},
                {"type": "tool_use", "id": "toolu_01", "name": "search_tickets", "input": {"query": "login outage", "limit": 20}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01",
                                          "content": '[{"id": "T-1042", "status": "pending"}, {"id": "T-1043", "status": "open"}]'}]},
        ],
    }
    turns = []
    for i in range(6):
        turns.append({"role": "user" if i % 2 == 0 else "assistant", "content": _prose(rng, 60 + 25 * i)})
    streaming = {"model": OPUS, "max_tokens": 8192, "stream": True, "messages": turns,
                 "system": [{"type": "text", "text": "You are a code reviewer.", "cache_control": {"type": "ephemeral"}}]}

    def usage(inp: int, out: int, cache_read: int = 0) -> Callable[[str], dict[str, Any]]:
        return lambda speed: {"input_tokens": inp, "output_tokens": out, "cache_read_input_tokens": cache_read,
                              "cache_creation_input_tokens": 0, "speed": speed}

    def chat_for(i: int) -> dict[str, Any]:
        question = chat["messages"][0]["content"]
        return {**chat, "messages": [{"role": "user", "content": f"({i}) {question}"}]}

    def document_for(i: int) -> dict[str, Any]:
        doc, question = document["messages"][0]["content"]
        return {**document, "messages": [{"role": "user", "content": [doc, {"type": "text", "text": f"({i}) {question['text']}"}]}]}

    def tool_use_for(i: int) -> dict[str, Any]:
        *earlier, result = tool_use["messages"]
        block = {**result["content"][0], "content": f'[{{"id": "T-{i}", "status": "pending"}}]'}
        return {**tool_use, "messages": [*earlier, {"role": "user", "content": [block]}]}

    def streaming_for(i: int) -> dict[str, Any]:
        *earlier, latest = streaming["messages"]
        return {**streaming, "messages": [*earlier, {"role": "user", "content": f"({i}) {latest['content']}"}]}

    return [
        ("chat", chat_for, {"interactive": True, "latency_slo_ms": 8000, "tenant": "acme"}, usage(40, 350)),
        ("document", document_for, {"interactive": True, "latency_slo_ms": 30_000, "tenant": "acme"}, usage(120, 900, 49_000)),
        ("tool use", tool_use_for, {"interactive": False, "tenant": "globex"}, usage(900, 220)),
        ("streaming", streaming_for, {"interactive": True, "latency_slo_ms": 60_000, "tenant": "hooli",
                                      "conversation_id": "conv-7"}, usage(1500, 1200, 1000)),
    ]


# --------------------------------------------------------------------------- celpy: the same programs, interpreted


class CelpyPolicy:
    """Every CEL program of one policy, compiled by celpy, and the activation conversion they share.

    The engine hands each program the same activation dict during one decision; it is
    converted to celpy values once (`to_celpy`) and the policy's
    variables are evaluated by celpy in declaration order (each sees the ones before it),
    as the engine's LazyVars would.
    """

    def __init__(self, compiled: CompiledPolicy) -> None:
        import celpy

        self.env = celpy.Environment()
        self.variables = [(name, self.env.program(self.env.compile(p.source))) for name, p in compiled.variables]
        self._last: tuple[Any, dict[str, Any]] | None = None

    def program(self, source: str) -> CelpyProgram:
        return CelpyProgram(self, self.env.program(self.env.compile(source)))

    def converted(self, activation: Mapping[str, Any]) -> dict[str, Any]:
        last = self._last
        if last is not None and last[0] is activation:
            return last[1]
        import celpy
        from celpy import celtypes

        out: dict[str, Any] = {}
        for name, value in activation.items():
            if name == "vars":
                continue
            out[name] = to_celpy(value)
        values: dict[str, Any] = {}
        for name, runner in self.variables:
            out["vars"] = celpy.celtypes.MapType({celtypes.StringType(k): v for k, v in values.items()})
            result = runner.evaluate(out)
            if not isinstance(result, celpy.CELEvalError):
                values[name] = result  # a failing variable is absent: rules reading it fail, as in the engine
        out["vars"] = celtypes.MapType({celtypes.StringType(k): v for k, v in values.items()})
        self._last = (activation, out)
        return out


class CelpyProgram:
    """A `cel.Program` stand-in whose `evaluate` runs celpy's interpreter."""

    def __init__(self, policy: CelpyPolicy, runner: Any) -> None:
        self.policy = policy
        self.runner = runner

    def evaluate(self, activation: Mapping[str, Any]) -> Any:
        import celpy

        from policy_engine.cel import CelEvaluationError

        try:
            result = self.runner.evaluate(self.policy.converted(activation))
        except celpy.CELEvalError as exc:
            raise CelEvaluationError(str(exc)) from None
        if isinstance(result, celpy.CELEvalError):
            raise CelEvaluationError(str(result))
        return from_celpy(result)


def celpy_policy(compiled: CompiledPolicy) -> CompiledPolicy:
    """The same compiled policy with every Program replaced by a celpy-interpreted one."""
    interpreted = CelpyPolicy(compiled)

    def swap(program: Any) -> Any:
        return None if program is None else interpreted.program(program.source)

    rules = tuple(dataclasses.replace(r, when=swap(r.when), reason_expr=swap(r.reason_expr)) for r in compiled.rules)
    budgets = tuple(dataclasses.replace(b, key=swap(b.key)) for b in compiled.budgets)
    variables = tuple((name, swap(p)) for name, p in compiled.variables)
    return dataclasses.replace(compiled, rules=rules, budgets=budgets, variables=variables,
                               stickiness_key=swap(compiled.stickiness_key))


# --------------------------------------------------------------------------- hand-written


class HandWritten:
    """policies/default.yaml written by hand in Python: same features, rules, ceiling, budget and ledger."""

    def __init__(self, ledger: MemoryLedger) -> None:
        self.catalog = load_catalog()
        self.ledger = ledger
        self.ids = 0
        self.conversations: dict[str, tuple[str, int, float]] = {}
        self._scope: tuple[float, Scope] | None = None

    def scope(self, now: datetime) -> Scope:
        cached = self._scope
        ts = now.timestamp()
        if cached is None or ts >= cached[0]:
            window, _, end = window_bounds("day", "UTC", now)
            cached = self._scope = (end.timestamp(), Scope("daily_fast_premium", "global", window, 200_000_000, end.timestamp()))
        return cached[1]

    def decide(self, params: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        now = datetime.now(timezone.utc)
        epoch = now.timestamp()
        tokens = estimate_input_tokens(params).upper
        model = self.catalog.find(params["model"])
        max_tokens = params["max_tokens"]
        cache = any("cache_control" in b for m in params["messages"] if isinstance(m["content"], list) for b in m["content"]) \
            or (isinstance(params.get("system"), list) and any("cache_control" in b for b in params["system"]))
        std = estimate(model, speed="standard", input_tokens=tokens, max_tokens=max_tokens, cache_control=cache)
        fast = estimate(model, speed="fast", input_tokens=tokens, max_tokens=max_tokens, cache_control=cache)
        t = model.throughput
        standard_ms = (t.ttft_s + max_tokens / t.standard_otps) * 1000.0
        convo = context.get("conversation_id")
        sticky = self.conversations.get(convo) if convo else None
        if sticky is not None and epoch - sticky[2] <= 600:
            speed, rule = sticky[0], "sticky"
        elif not context.get("interactive", False):
            speed, rule = "standard", "nobody-waiting"
        elif tokens > 150_000 and max_tokens <= 1024:
            speed, rule = "standard", "input-bound"
        elif params["model"].startswith("claude-opus") and "latency_slo_ms" in context and standard_ms > context["latency_slo_ms"]:
            speed, rule = "fast", "interactive-misses-slo"
        else:
            speed, rule = "standard", "default"
        if speed == "fast" and fast > 10_000_000:
            speed = "standard"
        scope = self.scope(now)
        self.ids += 1
        rid = f"h-{self.ids}"
        result = self.ledger.reserve(rid, [(scope, fast - std if speed == "fast" else 0)], ttl_s=600)
        if not result.ok:
            speed = "standard"
            self.ledger.reserve(rid, [(scope, 0)], ttl_s=600)
        if convo:
            self.conversations[convo] = (speed, tokens, epoch)
        return {"speed": speed, "rule": rule, "rid": rid, "scope": scope, "model": model}

    def settle(self, decision: dict[str, Any], usage: dict[str, Any]) -> int:
        model = decision["model"]
        cost = actual(model, usage)
        premium = cost - actual(model, {**usage, "speed": "standard"}) if usage["speed"] == "fast" else 0
        self.ledger.settle(decision["rid"], [(decision["scope"], premium)])
        return cost


# --------------------------------------------------------------------------- timing


_iteration = iter(range(1, 1 << 62))


def _run(decide: Callable[[Any, Any], Any], settle: Callable[[Any, Any], Any], items: list[Any], reps: int,
         out: dict[str, list[int]]) -> None:
    clock = time.perf_counter_ns
    for _ in range(reps):
        for kind, make, context, usage in items:
            params = make(next(_iteration))  # built outside the timed region
            start = clock()
            d = decide(params, context)
            settle(d, usage(d.speed if hasattr(d, "speed") else d["speed"]))
            out[kind].append(clock() - start)


def _pct(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds (default 12)")
    parser.add_argument("--reps", type=int, default=250, help="passes over the corpus per round for the engine (default 250)")
    parser.add_argument("--profile", action="store_true", help="cProfile the engine pipeline instead")
    args = parser.parse_args()
    from policy_engine import _mypyc  # after the imports above: it names the compiled modules they loaded

    print(f"build: {_mypyc.checked_build('this would measure')}", flush=True)

    from opentelemetry import trace

    assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider", "benchmark must run without an OTel SDK"
    catalog = load_catalog()
    compiled = compile_file(str(POLICY))
    interpreted = celpy_policy(compiled)
    items = corpus()
    kinds = [k for k, *_ in items]

    def engine_for(policy: CompiledPolicy) -> Engine:
        return Engine([policy], catalog, ledger=MemoryLedger())

    # Sanity: the three pipelines agree on every request of the corpus.
    e, c, h = engine_for(compiled), engine_for(interpreted), HandWritten(MemoryLedger())
    for kind, make, context, _ in items:
        params = make(0)
        de, dc, dh = e.decide(params, context), c.decide(params, context), h.decide(params, context)
        assert (de.speed, de.rule) == (dc.speed, dc.rule) == (dh["speed"], dh["rule"]), (kind, de.reasons, dc.reasons, dh)
        assert de.reasons == dc.reasons, (de.reasons, dc.reasons)

    if args.profile:
        import cProfile
        import pstats

        times: dict[str, list[int]] = {k: [] for k in kinds}
        profiler = cProfile.Profile()
        for _ in range(8):
            engine = engine_for(compiled)  # a fresh ledger every 250 passes: the budget never runs out
            profiler.runcall(_run, engine.decide, engine.settle, items, 250, times)
        profiler.dump_stats("/tmp/bench_decide.prof")
        pstats.Stats("/tmp/bench_decide.prof").sort_stats("tottime").print_stats(30)
        return

    results: dict[str, dict[str, list[int]]] = {name: {k: [] for k in kinds} for name in ("engine", "celpy", "hand")}
    gc.collect()
    for _ in range(args.rounds):
        engine = engine_for(compiled)
        _run(engine.decide, engine.settle, items, args.reps, results["engine"])
        slow = engine_for(interpreted)
        _run(slow.decide, slow.settle, items, max(1, args.reps // 100), results["celpy"])
        hand = HandWritten(MemoryLedger())
        _run(hand.decide, hand.settle, items, args.reps, results["hand"])

    import timeit

    machine = min(timeit.repeat("sum(range(1000))", number=2000, repeat=5)) / 2000 * 1e6
    print(f"decide+settle with {POLICY.relative_to(ROOT)}, {args.rounds} interleaved rounds, no OpenTelemetry SDK")
    print(f"machine speed: sum(range(1000)) takes {machine:.1f} us here (a recent desktop CPU: about 5-10 us)")
    print(f"{'request':<12}{'engine p50':>12}{'p99':>9}{'celpy p50':>12}{'hand p50':>10}")
    for kind in kinds:
        e_, c_, h_ = (results[n][kind] for n in ("engine", "celpy", "hand"))
        print(f"{kind:<12}{_pct(e_, .5):>10.1f}us{_pct(e_, .99):>7.1f}us{_pct(c_, .5):>10.0f}us{_pct(h_, .5):>8.1f}us")
    every = {n: [t for k in kinds for t in results[n][k]] for n in results}
    p50, p99 = _pct(every["engine"], .5), _pct(every["engine"], .99)
    celpy_p50, hand_p50 = _pct(every["celpy"], .5), _pct(every["hand"], .5)
    print(f"{'all':<12}{p50:>10.1f}us{p99:>7.1f}us{celpy_p50:>10.0f}us{hand_p50:>8.1f}us")
    print(f"engine p99 {p99:.1f} us; celpy p50 {celpy_p50:.0f} us; hand-written p50 {hand_p50:.1f} us "
          f"(samples: engine {len(every['engine'])}, celpy {len(every['celpy'])}, hand {len(every['hand'])})")
    print(f"decide: p50 {p50:.1f} us, {celpy_p50 / p50:.0f}x faster than celpy, {p50 / hand_p50:.1f}x of hand-written")


if __name__ == "__main__":
    main()
