#!/usr/bin/env python3
"""`lint` on generated policies of 1,000 and 3,000 rules: the rule analyses must scale linearly.

    python benchmarks/bench_lint.py [--rules 1000,3000] [--profile]

Each policy mixes the shapes large generated policies have: per-tenant rules (`==` on
context.tenant and request.model with token thresholds), tenant allowlists (`in [...]`),
model prefixes (`startsWith`), opaque conditions (`size(...)`, variables) and rules that an
earlier one covers, plus a handful of embedded tests, so every analysis of `lint` runs:
unreachable and contradictory rules, guardrails, models in the catalog, budget keys, unused
variables, the tests and their coverage. The process-wide compile cache is cleared before
every run: each figure is a cold lint, as in CI.

Target (issue 15): 3,000 rules lint in under 5 s on the project's 2-core machine. Linear
scaling means the 3,000-rule run takes about 3x the 1,000-rule one; the last line is
`lint: 3000 rules in X s (target 5 s), Nx the time of 1000 rules (linear: 3x)`.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policy_engine.catalog import load_catalog  # noqa: E402
from policy_engine.cel import cache  # noqa: E402
from policy_engine.check import lint_file  # noqa: E402

MODELS = ("claude-opus-4-6", "claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-5")


def policy_text(rules: int) -> str:
    out = ["version: 1", f"name: generated-{rules}", "default: standard", "variables:",
           "  long_prompt: request.input_tokens > 100000",
           "  vip: context.labels.exists(k, k == 'tier' && context.labels[k] == 'vip')",
           "rules:"]
    for i in range(rules):
        model = MODELS[i % len(MODELS)]
        shape = i % 6
        if shape == 0:
            when = f'context.tenant == "tenant-{i}" && request.model == "{model}" && request.input_tokens < {1000 + i}'
        elif shape == 1:
            tenants = ", ".join(f'"tenant-{i + k}"' for k in range(5))
            when = f"context.tenant in [{tenants}] && request.max_tokens <= {2048 + i}"
        elif shape == 2:
            when = f'request.model.startsWith("claude-opus") && context.tenant == "tenant-{i}" && !vars.long_prompt'
        elif shape == 3:
            when = f'context.tenant == "tenant-{i - 3}" && request.model == "{MODELS[(i - 3) % len(MODELS)]}" ' \
                   f"&& request.input_tokens < {i - 3 + 500}"  # covered by the rule three before it
        elif shape == 4:
            when = f'vars.vip && size(request.model) > {i % 40} && context.tenant != "tenant-{i}"'
        else:
            when = f'context.tenant == "tenant-{i}" || context.tenant == "tenant-{i}-eu" || context.tenant == "tenant-{i}-us"'
        speed = "fast" if i % 2 == 0 else "standard"
        out += [f"  - name: rule-{i}", f"    when: '{when}'", f"    speed: {speed}", f"    reason: generated rule {i}"]
    out += ["budgets:", "  - name: per_tenant", "    key: \"has(context.tenant) ? context.tenant : 'untagged'\"",
            "    window: day", "    limit_usd: 100", "    counts: premium", "tests:"]
    for t in range(5):
        out += [f"  - name: test-{t}", "    request:", "      model: claude-opus-4-6", "      max_tokens: 1024",
                "      messages: [{role: user, content: hi}]", f"    context: {{tenant: tenant-{t * 6}, interactive: true}}",
                "    input_tokens: 200", "    expect: {rule: " + f"rule-{t * 6}" + "}"]
    return "\n".join(out) + "\n"


def lint_seconds(path: Path, profile: bool) -> tuple[float, int]:
    catalog = load_catalog()
    cache.clear()
    profiler = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    result = lint_file(path, catalog)
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    elapsed = time.perf_counter() - started
    return elapsed, len(result.diagnostics)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rules", default="1000,3000", help="comma-separated rule counts (default 1000,3000)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of each run")
    args = parser.parse_args()
    counts = [int(x) for x in args.rules.split(",")]
    from policy_engine import _mypyc

    print(f"build: {_mypyc.checked_build('this would measure')}", flush=True)
    times: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            path = Path(tmp) / f"rules-{n}.yaml"
            path.write_text(policy_text(n))
            elapsed, findings = lint_seconds(path, args.profile)
            times[n] = elapsed
            print(f"{n:>6} rules: {elapsed:6.2f} s  ({findings} findings, {path.stat().st_size // 1024} KiB)", flush=True)
    big, small = max(counts), min(counts)
    ratio = times[big] / times[small] if big != small else 1.0
    print(f"lint: {big} rules in {times[big]:.2f} s (target 5 s), {ratio:.1f}x the time of {small} rules "
          f"(linear: {big / small:.0f}x)")


if __name__ == "__main__":
    main()
