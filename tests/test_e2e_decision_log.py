"""Issue 16's loop end to end: production traffic through the real SDK and `FastModePolicy` writes a decision
log against the emulator; `diff` replays that log with a changed policy; and each side's decisions equal what
deciding the original requests (the params and context the callers sent) gives under that policy."""

from __future__ import annotations

import itertools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import anthropic
import pytest

from policy_engine.compile import compile_file
from policy_engine.decide import Engine, load
from policy_engine.decisionlog import DecisionLog, JsonlFile
from policy_engine.integrations.anthropic import FastModePolicy, policy_context
from policy_engine.simulate import Outcome, diff, iter_log, open_log
from policy_engine.testing.emulator import Emulator
from tests._emulator import emulator  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "policies" / "default.yaml"


def traffic() -> list[tuple[dict[str, Any], dict[str, Any], bool]]:
    """(params, context, stream) of a varied day: waiting or not, tight and loose SLOs, models with and without
    fast mode, short and long answers, conversations."""
    calls = []
    shapes = itertools.product((True, False), (2_000, 9_000, 40_000, None), ("claude-opus-5-5", "claude-opus-5",
                                                                                 "claude-sonnet-4-6"), (300, 2_048))
    for number, (interactive, slo, model, max_tokens) in enumerate(shapes):
        context: dict[str, Any] = {"interactive": interactive, "tenant": f"t{number % 3}"}
        if slo is not None:
            context["latency_slo_ms"] = slo
        if number % 4 == 0:
            context["conversation_id"] = f"c{number % 8}"
        params = {"model": model, "max_tokens": max_tokens,
                  "messages": [{"role": "user", "content": f"request {number}: summarise the incident"}]}
        calls.append((params, context, number % 3 == 0))
    return calls


def decide_originals(policy: Path, calls: list[tuple[dict[str, Any], dict[str, Any], bool]],
                     records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Decide and settle the original requests in order, at their logged times, billed their logged usage."""
    engine = Engine([compile_file(str(policy))])
    decided = []
    for (params, context, stream), record in zip(calls, records):
        now = datetime.fromisoformat(record["ts"].replace("Z", "+00:00"))
        decision = engine.decide({**params, "stream": stream} if stream else params, context, now=now,
                                 account=record["features"]["account"])
        engine.settle(decision, {**record["usage"], "speed": decision.speed})
        decided.append((decision.speed, decision.rule))
    return decided


def test_diff_over_the_middlewares_decision_log_equals_deciding_the_original_requests(
        tmp_path: Path, emulator: Emulator) -> None:
    changed = tmp_path / "changed.yaml"  # standard is now assumed half as fast: more requests miss their SLO
    changed.write_text(DEFAULT.read_text().replace("throughput.est_standard_s * 1000.0", "throughput.est_standard_s * 2000.0"))
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(JsonlFile(path), hash_context=())
    # observe=False: live latency rules use the catalog's throughput, as the replay does (see the README).
    client = anthropic.Anthropic(base_url=emulator.url, api_key="sk-test",
                                 middleware=[FastModePolicy(load(DEFAULT, decision_log=log), observe=False)])
    calls = traffic()
    for params, context, stream in calls:
        with policy_context(**context):
            if stream:
                with client.messages.stream(**params) as live:
                    live.until_done()
            else:
                client.messages.create(**params)
    log.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"] for r in records] == ["settled"] * len(calls)

    pairs: list[tuple[Outcome, Outcome]] = []
    with open_log(str(path)) as stream:
        report = diff(compile_file(str(DEFAULT)), compile_file(str(changed)), iter_log(stream),
                      on_outcome=lambda a, b: pairs.append((a, b)))
    assert report.old.invalid == 0 and len(pairs) == len(calls)
    old_replayed = [(a.speed, a.rule) for a, _ in pairs]
    new_replayed = [(b.speed, b.rule) for _, b in pairs]
    assert old_replayed == [(r["decision"]["speed"], r["decision"]["rule"]) for r in records]  # what production did
    assert old_replayed == decide_originals(DEFAULT, calls, records)
    assert new_replayed == decide_originals(changed, calls, records)
    assert report.changed > 0  # the change matters: the test compares decisions that differ
    assert {speed for speed, _ in old_replayed} == {"fast", "standard"}
