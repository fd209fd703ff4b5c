"""`make demo`: the main job, end to end, on this machine with no network.

Loads the example policies, runs their embedded tests, then decides, applies and
settles a handful of realistic requests with the default policy, printing each
decision and the budget it spent.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .catalog import format_usd
from .compile import compile_file
from .decide import load
from .errors import CeilingExceeded
from .testing.runner import run_policy_tests

POLICIES = Path(__file__).resolve().parent.parent / "policies"

REQUESTS = [
    ("chat, a person waiting, tight SLO", {
        "model": "claude-opus-4-6", "max_tokens": 4096, "stream": True,
        "messages": [{"role": "user", "content": "Refactor this module to use dependency injection."}],
    }, {"interactive": True, "latency_slo_ms": 20_000, "tenant": "acme", "conversation_id": "c-1"}),
    ("same conversation, next turn (sticky)", {
        "model": "claude-opus-4-6", "max_tokens": 512,
        "messages": [{"role": "user", "content": "Now add tests."}],
    }, {"interactive": True, "latency_slo_ms": 60_000, "tenant": "acme", "conversation_id": "c-1"}),
    ("nightly batch summarization", {
        "model": "claude-opus-4-6", "max_tokens": 4096,
        "messages": [{"role": "user", "content": "Summarize yesterday's tickets."}],
    }, {"interactive": False, "tenant": "acme"}),
    ("a model without fast mode", {
        "model": "claude-sonnet-4-6", "max_tokens": 2048,
        "messages": [{"role": "user", "content": "Hello"}],
    }, {"interactive": True, "latency_slo_ms": 1_000}),
    ("an enormous request", {
        "model": "claude-opus-4-6", "max_tokens": 128_000,
        "messages": [{"role": "user", "content": "Write the whole book. " * 20_000}],
    }, {"interactive": True, "latency_slo_ms": 1_000}),
]


def main() -> int:
    print("== 1. load, check and compile the example policies")
    failed = 0
    for path in sorted(POLICIES.glob("*.yaml")):
        compiled = compile_file(str(path))
        results = run_policy_tests(compiled)
        passed = sum(r.passed for r in results)
        failed += len(results) - passed
        print(f"  {path.name:20} {compiled.name:14} @{compiled.version}  {len(compiled.rules)} rules, "
              f"{len(compiled.budgets)} budgets, tests {passed}/{len(results)} passed")
        for result in results:
            if not result.passed:
                print("    " + result.describe().replace("\n", "\n    "))

    print("\n== 2. decide -> apply -> (response) -> settle with policies/default.yaml")
    engine = load(POLICIES / "default.yaml")
    for title, params, context in REQUESTS:
        print(f"\n  {title}")
        try:
            decision = engine.decide(params, context)
        except CeilingExceeded as exc:
            print(f"    REJECTED before sending: {exc}")
            continue
        wire = decision.apply(params)
        print(f"    speed={decision.speed} rule={decision.rule} outcome={decision.outcome}")
        for reason in decision.reasons:
            print(f"      - {reason}")
        print(f"    worst case: standard {_money(decision.estimate_standard_micro)}, fast {_money(decision.estimate_fast_micro)}"
              f"; sent speed={wire.get('speed', 'standard')} betas={wire.get('betas', [])}")
        # Stand-in for the API's answer: the usage a real response would report.
        usage = {"input_tokens": decision.input_tokens // 2, "output_tokens": params["max_tokens"] // 4, "speed": decision.speed}
        settled = engine.settle(decision, usage)
        print(f"    settled at {settled.speed}: {format_usd(settled.cost_micro)}")
    print()
    return 1 if failed else 0


def _money(micro: int | None) -> str:
    return "unpriced" if micro is None else format_usd(micro)


if __name__ == "__main__":
    sys.exit(main())
