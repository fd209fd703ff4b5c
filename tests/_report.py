"""A small policy for the report and review tests: two rules and two budgets (a per-tenant hourly
premium cap that downgrades, an org-wide daily cap that rejects), with limits the test chooses, so
the tests do not depend on the example policies in policies/."""

from __future__ import annotations

from pathlib import Path

POLICY = """\
version: 1
name: {policy_name}
default: standard
on_error: standard
rules:
  - name: interactive-fast
    when: has(context.interactive) && context.interactive
    speed: fast
    reason: someone is waiting
  - name: batch-standard
    when: "true"
    speed: standard
    reason: nobody is waiting
budgets:
  - name: tenant_premium
    key: "has(context.tenant) ? context.tenant : 'untagged'"
    window: hour
    limit_usd: {premium}
    counts: premium
    on_exceed: downgrade
  - name: org_daily
    window: day
    limit_usd: {daily}
    counts: all
    on_exceed: reject
"""


def report_policy(directory: Path, name: str, premium: int = 5, daily: int = 400, policy_name: str = "report-test") -> Path:
    path = directory / name
    path.write_text(POLICY.format(premium=premium, daily=daily, policy_name=policy_name), encoding="utf-8")
    return path


