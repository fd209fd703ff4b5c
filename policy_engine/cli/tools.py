"""`policy-engine eval` and `policy-engine bench`: try one expression, time a policy.

Both go through the real engine: `eval` evaluates the expression on the activation a
decision builds for the request (so `request.*`, `cost.*`, `budget(s)`, `ratelimit.*`,
`conversation.*` and `vars.*` hold what a rule would see), and `bench` times
`Engine.decide` itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

from ..errors import PolicyEngineError, PolicyError
from . import EXIT_FINDINGS, EXIT_OK, UsageError

__all__ = ["VERBS", "setup_eval", "setup_bench"]

EVAL_RULE = "eval-probe"


# -- eval -----------------------------------------------------------------------------------


def setup_eval(p: argparse.ArgumentParser) -> None:
    """Type-check and evaluate one CEL expression against a request's features, as `opa eval`.

    Prints the value and its CEL type. The expression sees what a rule sees for the request
    (--request, a JSON or YAML file of Messages API parameters), the caller's context
    (--context) and the budget / rate-limit / conversation state (--state, as a test case's
    `state:`). With --policy it also sees the policy's budgets and variables (`vars.*`).
    Exit 0 when it evaluates, 1 when it does not compile or its evaluation fails (the
    message says where), 2 on usage errors (bad options, unreadable files)."""
    p.add_argument("expression", metavar="EXPR", help="a CEL expression, e.g. 'request.input_tokens > 10000'")
    p.add_argument("--policy", metavar="POLICY", help="policy whose budgets and variables the expression may read")
    from .commands import add_decision_inputs

    add_decision_inputs(p)
    p.set_defaults(run=run_eval)


def _probe_policy(expression: str, base: Any | None) -> tuple[str, bytes]:
    """A policy whose first rule runs on every request and whose variable `name` is the expression."""
    import yaml

    data: dict[str, Any] = {"version": 1, "name": "eval", "default": "standard", "rules": []}
    if base is not None:
        data = {k: v for k, v in base.document.data.items() if k not in ("tests", "stickiness")}
    variables = dict(data.get("variables") or {})
    name = "eval_expression"
    while name in variables:
        name += "_"
    variables[name] = expression
    data["variables"] = variables
    # A rule that always runs first, so the activation is captured before any other rule decides.
    data["rules"] = [{"name": EVAL_RULE, "when": "true", "speed": data.get("default", "standard")},
                     *[r for r in data.get("rules") or [] if not (isinstance(r, dict) and r.get("name") == EVAL_RULE)]]
    return name, yaml.safe_dump(data, sort_keys=False).encode()


def run_eval(args: argparse.Namespace) -> int:
    from .. import cel
    from ..compile import compile_file
    from ..features import declarations
    from ..testing.runner import run_traced
    from .commands import _catalog
    from .explain import _jsonable, _show, case_from_args, check_state, lookup

    case = case_from_args(args)
    base = compile_file(args.policy) if args.policy else None
    if base is not None:
        check_state(base, case, args.policy)
    elif case.state.budgets:
        raise UsageError(f"--state sets budgets ({', '.join(case.state.budgets)}) but no --policy defines them")
    budgets = [b.spec.name for b in base.budgets] if base is not None else []
    variable_types = {n: p.result_type for n, p in base.variables} if base is not None else {}
    try:
        program = cel.compile(args.expression, declarations(budgets, variable_types))
    except cel.CelError as exc:
        _report_eval(args, {"expression": args.expression, "error": str(exc)}, f"<expr>: {exc}")
        return EXIT_FINDINGS
    name, text = _probe_policy(args.expression, base)
    try:
        probe = compile_file(args.policy or "<eval>", text=text)
    except PolicyError as exc:
        _report_eval(args, {"expression": args.expression, "error": exc.format()}, exc.format())
        return EXIT_FINDINGS
    result, trace = run_traced(probe, case, _catalog(args))
    if trace.activation is None:
        why = result.failures[0] if result.failures else "the decision evaluated no rule"
        raise PolicyEngineError(f"cannot evaluate: {why}")
    value = lookup(trace.activation, f"vars.{name}")
    type_name = str(program.result_type)
    if isinstance(value, cel.CelError):
        _report_eval(args, {"expression": args.expression, "type": type_name, "error": str(value)},
                     f"<expr>: evaluation failed: {value}")
        return EXIT_FINDINGS
    data = {"expression": args.expression, "type": type_name, "value": _jsonable(_plain(value))}
    _report_eval(args, data, None, f"{_show(_plain(value))}\ntype: {type_name}")
    return EXIT_OK


def _plain(value: Any) -> Any:
    """CEL values as JSON-like Python: maps and lists of what the activation holds."""
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _report_eval(args: argparse.Namespace, data: dict[str, Any], error: str | None, text: str = "") -> None:
    if args.format == "json":
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    if error is not None:
        print(error, file=sys.stderr)
        return
    sys.stdout.write(text + "\n")


# -- bench ----------------------------------------------------------------------------------


def setup_bench(p: argparse.ArgumentParser) -> None:
    """Time `decide` per request for a policy: p50, p90, p99 and max.

    On a request log (--requests, as `simulate` reads it: each line's request, context,
    input_tokens, batch and ts), or on the policy's own test cases when no log is given.
    Each decision's reservation is released at once, so budgets do not fill up as the run
    goes; the first decisions warm caches and are not counted. Figures depend on the
    machine and its load: a gate on them belongs in a benchmark job, not in unit tests.
    Exit 0 after timing, 1 when no request could be decided, 2 on usage errors."""
    p.add_argument("policy", metavar="POLICY", help="policy file (or git rev:path)")
    p.add_argument("--requests", metavar="LOG", help="request log (.jsonl, .jsonl.gz, or - for stdin); default: the policy's tests")
    p.add_argument("--limit", type=int, metavar="N", help="time at most N requests of the log")
    p.add_argument("--min-samples", type=int, default=2000, metavar="N",
                   help="repeat the requests until at least N decisions are timed (default 2000)")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format (default text)")
    from .commands import _add_catalog

    _add_catalog(p)
    p.set_defaults(run=run_bench)


Call = Callable[[], Any]


def _log_calls(compiled: Any, catalog: Any, path: str, limit: int | None) -> tuple[list[Call], int]:
    """A decide call per log line (one engine, reservations released), and the count of lines that are not records."""
    from ..decide import Engine
    from ..ledger import MemoryLedger
    from ..simulate import LogError, Replayer, iter_log
    from .commands import _open_requests, log_time

    engine = Engine([compiled], catalog, ledger=MemoryLedger())
    parser = Replayer(compiled, catalog)
    calls: list[Call] = []
    invalid = 0
    with _open_requests(path) as stream:
        for number, text in iter_log(stream):
            if limit is not None and len(calls) >= limit:
                break
            try:
                record = parser.parse(number, text)
            except LogError:
                invalid += 1
                continue
            request, context = record.get("request"), record.get("context")
            if not isinstance(request, dict) or (context is not None and not isinstance(context, dict)):
                invalid += 1
                continue
            tokens = record.get("input_tokens") if type(record.get("input_tokens")) is int else None
            calls.append(_decider(engine, request, context, log_time(record.get("ts")), record.get("batch") is True, tokens))
    return calls, invalid


def _decider(engine: Any, request: dict[str, Any], context: Any, now: datetime | None, batch: bool,
             tokens: int | None) -> Call:
    from ..errors import CeilingExceeded

    def call() -> None:
        try:
            decision = engine.decide(request, context, now=now, batch=batch, input_tokens=tokens)
        except CeilingExceeded:
            return  # a rejection reserves nothing
        engine.release(decision)

    return call


def _test_calls(compiled: Any, catalog: Any) -> tuple[list[Call], int]:
    from ..testing.runner import DEFAULT_TEST_TIME, _engine_for

    calls: list[Call] = []
    for case in compiled.policy.tests:
        now = case.now or DEFAULT_TEST_TIME
        now = now if now.tzinfo else now.replace(tzinfo=timezone.utc)
        request = dict(case.request)
        batch = bool(request.pop("batch", False))
        calls.append(_decider(_engine_for(compiled, case, catalog, now), request, case.context, now, batch, case.input_tokens))
    return calls, 0


def _decidable(calls: list[Call]) -> tuple[list[Call], int]:
    """The calls whose request the engine can decide (tried once each), and how many it cannot."""
    kept = []
    for call in calls:
        try:
            call()
        except PolicyEngineError:
            continue
        kept.append(call)
    return kept, len(calls) - len(kept)


def _rounds(calls: list[Call], samples: int) -> Iterator[Call]:
    while True:
        for call in calls:
            yield call
            samples -= 1
        if samples <= 0:
            return


def run_bench(args: argparse.Namespace) -> int:
    from .commands import _catalog, _compiled

    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    if args.min_samples < 1:
        raise UsageError("--min-samples must be at least 1")
    compiled = _compiled(args.policy)
    catalog = _catalog(args)
    source = args.requests or "the policy's tests"
    candidates, invalid = (_log_calls(compiled, catalog, args.requests, args.limit) if args.requests
                           else _test_calls(compiled, catalog))
    calls, undecidable = _decidable(candidates)
    invalid += undecidable
    if not calls:
        print(f"policy-engine bench: no request in {source} could be decided ({invalid} invalid)", file=sys.stderr)
        return EXIT_FINDINGS
    for call in calls[:200]:
        call()  # warm-up: caches of parsed requests, model plans, compiled code
    clock = time.perf_counter_ns
    timings: list[int] = []
    for call in _rounds(calls, max(args.min_samples, len(calls))):
        started = clock()
        call()
        timings.append(clock() - started)
    timings.sort()

    def pct(q: float) -> float:
        return timings[min(len(timings) - 1, int(q * len(timings)))] / 1000

    data = {"policy": compiled.name, "version": compiled.version, "source": source, "requests": len(calls),
            "invalid": invalid, "samples": len(timings),
            "decide_us": {"p50": round(pct(0.50), 2), "p90": round(pct(0.90), 2), "p99": round(pct(0.99), 2),
                          "max": round(timings[-1] / 1000, 2), "mean": round(statistics.fmean(timings) / 1000, 2)}}
    if args.format == "json":
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return EXIT_OK
    us = data["decide_us"]
    lines = [f"policy {compiled.name} @{compiled.version} on {source}: {len(calls):,} requests"
             + (f" ({invalid:,} invalid skipped)" if invalid else "") + f", {len(timings):,} timed decisions",
             f"decide per request: p50 {us['p50']:.1f} us   p90 {us['p90']:.1f} us   p99 {us['p99']:.1f} us   "
             f"max {us['max']:.1f} us   mean {us['mean']:.1f} us"]
    sys.stdout.write("\n".join(lines) + "\n")
    return EXIT_OK


VERBS: dict[str, Callable[[argparse.ArgumentParser], None]] = {"eval": setup_eval, "bench": setup_bench}
