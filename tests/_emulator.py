"""Shared pieces of the runtime tests: the local emulator, engines over real ledgers, and OTel readers.

Imported by the test modules (not a conftest, so other suites are not affected).
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from policy_engine.decide import Engine, load
from policy_engine.testing.emulator import Emulator

_reader: InMemoryMetricReader | None = None


def metric_reader() -> InMemoryMetricReader:
    """The process's in-memory metric reader, installing the SDK provider once if nobody has."""
    global _reader
    if _reader is None:
        provider = metrics.get_meter_provider()
        if isinstance(provider, MeterProvider):
            # Another suite installed the SDK first: reuse its in-memory reader.
            found = [r for r in provider._sdk_config.metric_readers if isinstance(r, InMemoryMetricReader)]
            if not found:
                raise RuntimeError("an SDK MeterProvider without an InMemoryMetricReader is installed")
            _reader = found[0]
        else:
            _reader = InMemoryMetricReader()
            metrics.set_meter_provider(MeterProvider(metric_readers=[_reader]))
    return _reader


def counter_total(name: str, **attributes: Any) -> float:
    """Sum of a counter's points whose attributes include `attributes` (cumulative since start)."""
    data = metric_reader().get_metrics_data()
    total = 0.0
    if data is None:
        return total
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != name:
                    continue
                for point in metric.data.data_points:
                    if all(point.attributes.get(k) == v for k, v in attributes.items()):
                        total += point.value
    return total


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


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    """A fresh emulator per test: fast output (no artificial token delay), no minimum cache size."""
    emu = Emulator(standard_otps=None, min_cache_tokens=0)
    emu.start()
    try:
        yield emu
    finally:
        emu.close()


def messages_params(text: str = "Hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "claude-opus-4-6", "max_tokens": 64, "messages": [{"role": "user", "content": text}], **extra}
