"""Shared fixtures: the default policy, policy variants, fixed clocks, and OpenTelemetry capture.

OpenTelemetry's global providers can be set only once per process, so the `otel`
fixture installs one TracerProvider (with an InMemorySpanExporter) and one
MeterProvider (with a delta-temporality InMemoryMetricReader) the first time any
test asks for it, and every later test reuses them: `telemetry` empties the span
exporter and drains the metric reader before the test, so each test sees only
what it caused. Tests that need spans or metrics should use the `telemetry`
fixture rather than install providers of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from policy_engine import _mypyc

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POLICY = ROOT / "policies" / "default.yaml"
NOON = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc)
"""The decision time most tests use: the middle of a UTC day, far from window edges."""


def pytest_configure(config: pytest.Config) -> None:
    stale = _mypyc.stale_message("the tests would run")
    if stale:
        pytest.exit(stale, returncode=4)


def pytest_report_header(config: pytest.Config) -> str:
    return f"policy_engine: {_mypyc.describe_build()}"


@pytest.fixture()
def policy_variant(tmp_path: Path) -> Callable[..., Path]:
    """`policy_variant((old, new), ...)`: a copy of policies/default.yaml with exact text replacements.

    Each `old` must occur exactly once, so a test fails loudly when the default policy changes under it.
    """
    count = iter(range(1_000_000))

    def make(*replacements: tuple[str, str]) -> Path:
        text = DEFAULT_POLICY.read_text()
        for old, new in replacements:
            assert text.count(old) == 1, f"the default policy no longer contains {old!r} exactly once"
            text = text.replace(old, new)
        path = tmp_path / f"variant-{next(count)}.yaml"
        path.write_text(text)
        return path

    return make


@dataclass
class Telemetry:
    """What the global OpenTelemetry SDK recorded during one test."""

    exporter: Any
    reader: Any

    def spans(self, name: str | None = None) -> list[Any]:
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]

    def metrics(self) -> dict[str, list[Any]]:
        """Metric name -> data points recorded since the last call (delta temporality)."""
        data = self.reader.get_metrics_data()
        points: dict[str, list[Any]] = {}
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    points.setdefault(metric.name, []).extend(metric.data.data_points)
        return points


@pytest.fixture(scope="session")
def otel() -> Telemetry:
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider, UpDownCounter
    from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(tracer_provider)
    delta = AggregationTemporality.DELTA
    reader = InMemoryMetricReader(preferred_temporality={Counter: delta, UpDownCounter: delta, Histogram: delta})
    meter_provider = MeterProvider(metric_readers=[reader])
    metrics.set_meter_provider(meter_provider)
    assert trace.get_tracer_provider() is tracer_provider, (
        "another test installed a global TracerProvider first; use the `telemetry` fixture from tests/conftest.py")
    assert metrics.get_meter_provider() is meter_provider, (
        "another test installed a global MeterProvider first; use the `telemetry` fixture from tests/conftest.py")
    return Telemetry(exporter, reader)


@pytest.fixture()
def telemetry(otel: Telemetry) -> Iterator[Telemetry]:
    otel.exporter.clear()
    otel.reader.get_metrics_data()  # drain: the test sees only its own deltas
    yield otel
    otel.exporter.clear()
