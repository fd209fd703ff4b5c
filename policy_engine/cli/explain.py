"""`policy-engine explain`: one decision, taken apart.

The decision is made by the engine itself, with probes in place of the rule
programs (`testing.runner.traced`); the probes hand back the activation the rules
saw, so the values shown are the ones the engine used. Rules after the deciding one
are evaluated on that same activation to show what they would have said.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import pydantic

from ..cel import CelError
from ..errors import PolicyEngineError
from . import EXIT_OK, UsageError

_ABSENT = object()


def _read(path: str, what: str) -> Any:
    """A JSON or YAML mapping, read with the policy loader's limits (size, alias bombs, nesting)."""
    from ..errors import PolicyError
    from ..load import read_yaml

    try:
        text = sys.stdin.buffer.read() if path == "-" else None
        document = read_yaml(path if path != "-" else "<stdin>", text=text)  # JSON is YAML: one reader for both
    except PolicyError as exc:
        raise UsageError(f"cannot use the {what} file:\n{exc.format()}") from None
    if document.problems:
        raise UsageError(f"cannot use the {what} file:\n" + "\n".join(d.format(document.source) for d in document.problems))
    if not isinstance(document.data, dict):
        raise UsageError(f"the {what} file {path} must hold a mapping, got {type(document.data).__name__}")
    return document.data


def lookup(activation: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted reference (`request.model`, `vars.x`); `_ABSENT` when missing."""
    node: Any = activation
    for part in path.split("."):
        try:
            node = node[part]
        except CelError as exc:
            return exc
        except (KeyError, TypeError, IndexError):
            return _ABSENT
    return node


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "<absent>"
    if isinstance(value, CelError):
        return f"<error: {value}>"
    if isinstance(value, datetime):
        return value.isoformat()
    try:
        return json.dumps(value, default=str, sort_keys=True)
    except (TypeError, ValueError):
        return repr(value)


def _jsonable(value: Any) -> Any:
    if value is _ABSENT:
        return None
    if isinstance(value, CelError):
        return {"error": str(value)}
    return json.loads(json.dumps(value, default=str))


def case_from_args(args: argparse.Namespace) -> Any:
    """The --request, --context, --state, --now and --input-tokens options as one test case."""
    from ..policy import TestCase

    request = _read(args.request, "request")
    context = _read(args.context, "context") if args.context else {}
    state = _read(args.state, "state") if args.state else {}
    raw: dict[str, Any] = {"name": args.verb, "request": request, "context": context, "state": state, "expect": {}}
    if args.now:
        raw["now"] = args.now
    if args.input_tokens is not None:
        raw["input_tokens"] = args.input_tokens
    try:
        return TestCase.model_validate(raw)
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False))
        raise UsageError(f"invalid input: {problems}") from None


def check_state(compiled: Any, case: Any, where: str) -> None:
    """A --state budget the policy does not have would be silently ignored: refuse it (exit 2)."""
    from ..errors import did_you_mean

    names = [b.spec.name for b in compiled.budgets]
    for name in case.state.budgets:
        if name not in names:
            hint = did_you_mean(name, names)
            have = f"its budgets: {', '.join(names)}" if names else "it has no budgets"
            raise UsageError(f"--state sets budget '{name}', which policy {compiled.name} ({where}) does not have; "
                             f"{hint or have}")


def explain(args: argparse.Namespace) -> int:
    from ..catalog import format_usd
    from ..compile import compile_file
    from ..testing.runner import run_traced
    from .commands import _catalog

    case = case_from_args(args)
    compiled = compile_file(args.policy)
    check_state(compiled, case, args.policy)
    catalog = _catalog(args)
    result, trace = run_traced(compiled, case, catalog)
    decision = result.decision
    if decision is None:
        raise PolicyEngineError(result.failures[0] if result.failures else "no decision")
    activation = trace.activation
    rules = []
    for rule in compiled.rules:
        entry: dict[str, Any] = {"name": rule.name, "speed": rule.speed, "when": rule.when.source}
        if rule.index in trace.rules:
            value = trace.rules[rule.index]
            entry["evaluated"] = True
        elif activation is not None:
            try:
                value = rule.when.evaluate(activation)
            except CelError as exc:
                value = exc
            entry["evaluated"] = False
        else:
            value = None
            entry["evaluated"] = False
        entry["outcome"] = ("error" if isinstance(value, CelError) else "matched" if value is True
                            else "not matched" if value is False else "not evaluated")
        if isinstance(value, CelError):
            entry["error"] = str(value)
        entry["decided"] = decision.rule == rule.name
        entry["read"] = {ref: lookup(activation, ref) for ref in sorted(rule.when.references)} if activation is not None else {}
        rules.append(entry)
    variables = {name: lookup(activation, f"vars.{name}") for name, _ in compiled.variables} if activation is not None else {}
    budgets = dict(activation.get("budgets", {})) if activation is not None else {}
    estimates = {"input_tokens": decision.input_tokens, "input_tokens_exact": decision.input_tokens_exact,
                 "max_tokens": decision.max_tokens,
                 "standard_usd": None if decision.estimate_standard_micro is None else format_usd(decision.estimate_standard_micro),
                 "fast_usd": None if decision.estimate_fast_micro is None else format_usd(decision.estimate_fast_micro)}
    throughput = dict(activation.get("throughput", {})) if activation is not None else {}
    limit = compiled.per_request_micro
    data = {
        "policy": {"name": compiled.name, "version": compiled.version, "file": args.policy},
        "decision": {"speed": decision.speed, "rule": decision.rule, "outcome": decision.outcome,
                     "reasons": decision.reasons, "errors": decision.errors, "forced_by": decision.forced_by},
        "rules": [dict(r, read={k: _jsonable(v) for k, v in r["read"].items()}) for r in rules],
        "variables": {k: _jsonable(v) for k, v in variables.items()},
        "guardrails": decision.guardrails,
        "ceilings": {"per_request_usd": None if limit is None else format_usd(limit), "applied": decision.ceilings,
                     "on_exceed": compiled.policy.ceilings.on_exceed},
        "budgets": {k: _jsonable(v) for k, v in budgets.items()},
        "estimates": estimates,
        "throughput": _jsonable(throughput),
    }
    if args.format == "json":
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return EXIT_OK
    out = [f"policy {compiled.name} @{compiled.version} ({args.policy})",
           f"decision: {decision.speed if decision.outcome != 'rejected' else 'REJECTED'} by {decision.rule} ({decision.outcome})"]
    out += [f"  - {reason}" for reason in decision.reasons]
    out += [f"  ! {error}" for error in decision.errors]
    out.append("rules (first match wins):")
    if not rules:
        out.append("  (none)")
    for number, r in enumerate(rules, 1):
        mark = "  <- decided" if r["decided"] else "" if r["evaluated"] else "  (not reached)"
        out.append(f"  {number}. {r['name']} -> {r['speed']}: {r['outcome'].upper() if r['outcome'] == 'matched' else r['outcome']}{mark}")
        out.append(f"       when: {' '.join(r['when'].split())}")
        if r.get("error"):
            out.append(f"       error: {r['error']}")
        for ref, value in r["read"].items():
            out.append(f"       {ref} = {_show(value)}")
    if variables:
        out.append("variables:")
        out += [f"  {name} = {_show(value)}" for name, value in variables.items()]
    out.append("guardrails: " + (", ".join(decision.guardrails) if decision.guardrails else "none applied"))
    out.append(f"ceilings: per request {'none' if limit is None else format_usd(limit) + ' (' + data['ceilings']['on_exceed'] + ')'}"
               + (f"; applied: {', '.join(decision.ceilings)}" if decision.ceilings else "; none applied"))
    if budgets:
        out.append("budgets (before this request):")
        for name, b in budgets.items():
            out.append(f"  {name}: spent ${b['spent_usd']:.6f} of ${b['limit_usd']:.6f}, remaining ${b['remaining_usd']:.6f} "
                       f"({100 * b['fraction_left']:.1f}% left)")
    out.append(f"estimates: input {decision.input_tokens} tokens ({'exact' if decision.input_tokens_exact else 'estimated upper bound'}), "
               f"max_tokens {decision.max_tokens}; worst case standard {estimates['standard_usd'] or 'unpriced'}, "
               f"fast {estimates['fast_usd'] or 'unpriced'}")
    if throughput:
        out.append("throughput: " + ", ".join(f"{k} {v:g}" for k, v in throughput.items()))
    sys.stdout.write("\n".join(out) + "\n")
    return EXIT_OK
