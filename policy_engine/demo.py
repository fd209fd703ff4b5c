"""`make demo`: the main job, end to end, on this machine with no network.

Loads the example policies, runs their embedded tests, decides, applies and
settles a handful of realistic requests with the default policy, then sends a few
through the real anthropic SDK with the middleware, against the local emulator.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .catalog import format_usd
from .check import plural
from .compile import compile_file
from .decide import load
from .errors import CeilingExceeded
from .testing.runner import run_policy_tests

POLICIES = Path(__file__).resolve().parent.parent / "policies"

REQUESTS = [
    ("chat on Opus 5.5, a person waiting, tight SLO (fast, no beta header)", {
        "model": "claude-opus-5-5", "max_tokens": 4096, "stream": True,
        "messages": [{"role": "user", "content": "Refactor this module to use dependency injection."}],
    }, {"interactive": True, "latency_slo_ms": 20_000, "tenant": "acme", "conversation_id": "c-1"}),
    ("same conversation, next turn (sticky)", {
        "model": "claude-opus-5-5", "max_tokens": 512,
        "messages": [{"role": "user", "content": "Now add tests."}],
    }, {"interactive": True, "latency_slo_ms": 60_000, "tenant": "acme", "conversation_id": "c-1"}),
    ("an agent on Opus 5 (fast, with the fast-mode beta header)", {
        "model": "claude-opus-5", "max_tokens": 8192,
        "messages": [{"role": "user", "content": "Fix the failing test."}],
    }, {"interactive": True, "latency_slo_ms": 30_000, "tenant": "acme"}),
    ("Opus 4.8, whose fast mode was retired on 2026-12-01", {
        "model": "claude-opus-4-8", "max_tokens": 4096,
        "messages": [{"role": "user", "content": "Refactor this module."}],
    }, {"interactive": True, "latency_slo_ms": 20_000}),
    ("nightly batch summarization", {
        "model": "claude-opus-5-5", "max_tokens": 4096,
        "messages": [{"role": "user", "content": "Summarize yesterday's tickets."}],
    }, {"interactive": False, "tenant": "acme"}),
    ("a model without fast mode (Sonnet 5.5)", {
        "model": "claude-sonnet-5-5", "max_tokens": 2048,
        "messages": [{"role": "user", "content": "Hello"}],
    }, {"interactive": True, "latency_slo_ms": 1_000}),
    ("an enormous request: the $10 per-request ceiling keeps it standard", {
        "model": "claude-opus-5-5", "max_tokens": 128_000,
        "messages": [{"role": "user", "content": "Write the whole book. " * 150_000}],
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
        print(f"  {path.name:20} {compiled.name:14} @{compiled.version}  {plural(len(compiled.rules), 'rule')}, "
              f"{plural(len(compiled.budgets), 'budget')}, tests {passed}/{len(results)} passed")
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
    print("\n== 3. the same through the anthropic SDK, with one line of middleware, against the local emulator")
    failed += _sdk_round_trip()
    print()
    return 1 if failed else 0


def _sdk_round_trip() -> int:
    """Real SDK, real HTTP, the emulator standing in for Anthropic's servers."""
    try:
        import anthropic
    except ImportError:
        print("  skipped: the anthropic SDK is not installed (pip install anthropic)")
        return 0
    import httpx

    from .integrations.anthropic import FastModePolicy, policy_context
    from .testing.emulator import running

    engine = load(POLICIES / "default.yaml")
    with running(output_tokens=400) as base_url:
        client = anthropic.Anthropic(base_url=base_url, api_key="demo-key", middleware=[FastModePolicy(engine)])
        calls = [
            ("interactive, 20 s SLO", {"interactive": True, "latency_slo_ms": 20_000, "conversation_id": "demo-1"}, False),
            ("interactive, streamed, next turn", {"interactive": True, "latency_slo_ms": 20_000, "conversation_id": "demo-1"}, True),
            ("background", {"interactive": False}, False),
        ]
        for title, context, stream in calls:
            with policy_context(**context):
                params = {"model": "claude-opus-5-5", "max_tokens": 2048,
                          "messages": [{"role": "user", "content": "Explain fast mode in one paragraph."}]}
                if stream:
                    with client.messages.stream(**params) as events:
                        message = events.get_final_message()
                else:
                    message = client.messages.create(**params)
            usage = message.usage
            print(f"  {title:34} ran at {getattr(usage, 'speed', None) or 'standard':8} "
                  f"in={usage.input_tokens} out={usage.output_tokens}")
        received = httpx.get(f"{base_url}/_emulator/requests").json()["requests"]
        fast_on_wire = sum(1 for r in received if r.get("speed") == "fast")
        print(f"  the emulator received {len(received)} requests, {fast_on_wire} of them at fast speed")
    spent = sum(engine.ledger.totals().values())
    print(f"  fast premium settled in the ledger: {format_usd(spent)} (budget daily_fast_premium, limit $200)")
    return 0


def _money(micro: int | None) -> str:
    return "unpriced" if micro is None else format_usd(micro)


if __name__ == "__main__":
    sys.exit(main())
