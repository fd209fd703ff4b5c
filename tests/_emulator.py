"""Shared pieces of the runtime tests: the local emulator, policies and engines, telemetry counts.

Imported by the test modules (not a conftest, so other suites are not affected).
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from policy_engine.decide import Engine, load
from policy_engine.testing.emulator import Emulator


def event_count(telemetry: Any, event: str) -> float:
    """How many `policy_engine.events` of this name the test caused (conftest's `telemetry` fixture)."""
    points = telemetry.metrics().get("policy_engine.events", [])
    return sum(p.value for p in points if p.attributes.get("policy_engine.event") == event)


POLICY_ALWAYS_FAST = """
version: 1
name: always-fast
default: fast
{extra}
"""


def write_policy(tmp_path: Path, extra: str = "", name: str = "policy.yaml") -> Path:
    """A policy whose default is fast, plus `extra` YAML (budgets, on_fast_rate_limited, ...)."""
    path = tmp_path / name
    path.write_text(POLICY_ALWAYS_FAST.format(extra=textwrap.dedent(extra)))
    return path


def engine_for(tmp_path: Path, extra: str = "", **options: Any) -> Engine:
    return load(write_policy(tmp_path, extra), **options)


def started(**options: Any) -> Iterator[Emulator]:
    """A running emulator for a fixture: fast output (no artificial token delay), no minimum cache size."""
    emu = Emulator(standard_otps=None, min_cache_tokens=0, **options)
    emu.start()
    try:
        yield emu
    finally:
        emu.close()


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    """A fresh emulator per test, serving the Claude API."""
    yield from started()


def messages_params(text: str = "Hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "claude-opus-5", "max_tokens": 64, "messages": [{"role": "user", "content": text}], **extra}
