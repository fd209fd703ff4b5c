"""The money guarantee end to end: the real anthropic SDK with `FastModePolicy`, against the emulator, whose
own bill (`bill_micro()`) is the oracle. With the packaged policies' defaults, an invalid context, an unpriced
model, a stream cut short or closed early and a client timeout each leave the ledger at or above the bill."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
import yaml

from policy_engine.catalog import load_catalog
from policy_engine.decide import Engine, load
from policy_engine.errors import InvalidContext
from policy_engine.integrations.anthropic import FastModePolicy, policy_context
from policy_engine.testing.emulator import Emulator
from tests._emulator import event_count, messages_params

ROOT = Path(__file__).resolve().parent.parent
PACKAGED = sorted((ROOT / "policies").glob("*.yaml"))
NEW_MODEL = "claude-newcomer-1"
EMULATOR_CATALOG = f"""\
version: 1
providers:
  anthropic:
    models:
      {NEW_MODEL}:
        standard:
          tiers: [{{above_input_tokens: 0, input: 3, output: 15}}]
          as_of: 2026-12-01
          source: test
        fast: {{supported: false}}
        cache: {{write_5m: "1.25", write_1h: "2", read: "0.1", as_of: 2026-12-01, source: test}}
"""
"""The emulator serves (and bills) a model the engine's catalog has never heard of."""


@pytest.fixture(params=[p.name for p in PACKAGED])
def packaged(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A packaged policy as shipped (its on_invalid_context, on_unpriced_model, on_incomplete_stream untouched),
    plus a budget counting all spend keyed by tenant, so the ledger holds every dollar to compare with the bill."""
    data = yaml.safe_load((ROOT / "policies" / request.param).read_text())
    data.pop("tests", None)
    data.setdefault("budgets", []).append(
        {"name": "all_spend", "key": "context.tenant", "window": "day", "limit_usd": 1000, "counts": "all"})
    path = tmp_path / request.param
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Emulator]:
    catalog = tmp_path / "emulator-catalog.yaml"
    catalog.write_text(EMULATOR_CATALOG)
    with Emulator(standard_otps=None, min_cache_tokens=0, catalog=load_catalog(catalog)) as emu:
        yield emu


def all_spend(engine: Engine) -> int:
    return sum(v for k, v in engine.ledger.totals().items() if k.startswith("all_spend\x1f"))  # type: ignore[attr-defined]


def all_spend_keys(engine: Engine) -> set[str]:
    return {k.split("\x1f")[1] for k in engine.ledger.totals() if k.startswith("all_spend\x1f")}  # type: ignore[attr-defined]


def bill_when_logged(emulator: Emulator, requests: int = 1) -> int:
    """The emulator's bill once it has logged `requests` requests (one the client left finishes on its own)."""
    for _ in range(200):
        if len(emulator.requests()) >= requests:
            break
        time.sleep(0.02)
    return emulator.bill_micro()


def client_for(emulator: Emulator, engine: Engine, **options: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=emulator.url, api_key="sk-test", middleware=[FastModePolicy(engine)], **options)


INTERACTIVE = {"interactive": True, "latency_slo_ms": 1_000, "tenant": "acme"}


@pytest.mark.parametrize("context", [
    {**INTERACTIVE, "tennant": "acme"},  # a typo'd key
    {**INTERACTIVE, "user": 5150},  # a wrongly typed value
    {**INTERACTIVE, "tenant": 42},  # the budget's own key wrongly typed: the shared <key-error> bucket
])
def test_an_invalid_context_is_metered(packaged: Path, emulator: Emulator, telemetry: Any, context: dict[str, Any]) -> None:
    engine = load(packaged)
    client = client_for(emulator, engine)
    with policy_context(**context):
        for _ in range(3):
            message = client.messages.create(**messages_params("Summarise the quarter", model="claude-opus-5"))
            assert message.usage.speed == "standard"  # decided at standard, never fast on a broken context
    assert all_spend(engine) >= emulator.bill_micro() > 0
    assert all_spend(engine) == emulator.bill_micro()  # every response completed: exactly the bill
    if context["tenant"] == 42:
        assert all_spend_keys(engine) == {"<key-error>"}
    assert event_count(telemetry, "policy_engine.invalid_context") == 3


def test_an_invalid_context_under_reject_sends_nothing(packaged: Path, emulator: Emulator) -> None:
    text = packaged.read_text().replace("\nbudgets:", "\non_invalid_context: reject\nbudgets:", 1)
    packaged.write_text(text)
    engine = load(packaged)
    with policy_context(**INTERACTIVE, tennant="acme"), pytest.raises(InvalidContext):
        client_for(emulator, engine).messages.create(**messages_params())
    assert emulator.requests() == [] and all_spend(engine) == 0


def test_an_unpriced_model_is_metered_conservatively(packaged: Path, emulator: Emulator, telemetry: Any) -> None:
    engine = load(packaged)
    assert engine.catalog.find(NEW_MODEL) is None  # the engine cannot price it; the emulator bills it
    client = client_for(emulator, engine)
    with policy_context(**INTERACTIVE):
        for _ in range(3):
            client.messages.create(**messages_params("Draft the release notes", model=NEW_MODEL, max_tokens=200))
    assert all_spend(engine) >= emulator.bill_micro() > 0
    assert event_count(telemetry, "policy_engine.unpriced_model") == 3


def test_an_unpriced_model_allowed_unmetered_is_counted_in_a_metric(packaged: Path, emulator: Emulator,
                                                                    telemetry: Any) -> None:
    packaged.write_text(packaged.read_text().replace("\nbudgets:", "\non_unpriced_model: allow_unmetered\nbudgets:", 1))
    engine = load(packaged)
    with policy_context(**INTERACTIVE):
        client_for(emulator, engine).messages.create(**messages_params(model=NEW_MODEL))
    assert all_spend(engine) == 0 < emulator.bill_micro()  # the documented, explicit exception
    assert event_count(telemetry, "policy_engine.unmetered") == 1


def test_a_stream_closed_early_is_settled_at_or_above_the_bill(packaged: Path, emulator: Emulator,
                                                               telemetry: Any) -> None:
    emulator.configure(standard_otps=400, output_tokens=120, delta_tokens=1)
    engine = load(packaged)
    with policy_context(**INTERACTIVE):
        stream = client_for(emulator, engine).messages.create(stream=True, **messages_params(max_tokens=150))
        for seen, _ in enumerate(stream):
            if seen >= 5:
                break
        stream.close()
    assert all_spend(engine) >= bill_when_logged(emulator) > 0
    [settle] = telemetry.spans("policy_engine.settle")
    assert settle.attributes["policy_engine.incomplete_stream"] == "worst_case"
    assert settle.attributes["gen_ai.usage.output_tokens"] == 150


def test_a_stream_the_server_finishes_after_the_client_left_is_covered(packaged: Path, tmp_path: Path,
                                                                      telemetry: Any) -> None:
    # disconnect_billing="complete": a server that generates the whole answer anyway bills all of it.
    catalog = tmp_path / "emulator-catalog.yaml"
    catalog.write_text(EMULATOR_CATALOG)
    with Emulator(standard_otps=400, output_tokens=120, delta_tokens=1, min_cache_tokens=0,
                  disconnect_billing="complete", catalog=load_catalog(catalog)) as emulator:
        engine = load(packaged)
        with policy_context(**INTERACTIVE):
            stream = client_for(emulator, engine).messages.create(stream=True, **messages_params(max_tokens=150))
            next(iter(stream))
            stream.close()
        assert all_spend(engine) >= bill_when_logged(emulator) > 0


def test_a_client_timeout_is_settled_at_or_above_the_bill(packaged: Path, emulator: Emulator) -> None:
    # The server got the request and answers after the client gave up: it bills; the SDK does not retry.
    emulator.inject(None, hang_s=0.6)
    engine = load(packaged)
    with policy_context(**INTERACTIVE), pytest.raises(anthropic.APITimeoutError):
        client_for(emulator, engine, timeout=0.2, max_retries=0).messages.create(**messages_params())
    assert all_spend(engine) >= bill_when_logged(emulator) > 0


def test_observed_settles_what_the_client_read_below_the_bill(packaged: Path, emulator: Emulator,
                                                              telemetry: Any) -> None:
    # The opt-out, explicitly chosen: the ledger counts what reached the client, which can be less.
    packaged.write_text(packaged.read_text().replace("\nbudgets:", "\non_incomplete_stream: observed\nbudgets:", 1))
    emulator.configure(standard_otps=400, output_tokens=120, delta_tokens=1, disconnect_billing="complete")
    engine = load(packaged)
    with policy_context(**INTERACTIVE):
        stream = client_for(emulator, engine).messages.create(stream=True, **messages_params(max_tokens=150))
        next(iter(stream))
        stream.close()
    [settle] = telemetry.spans("policy_engine.settle")
    assert settle.attributes["policy_engine.incomplete_stream"] == "observed"
    assert 0 < all_spend(engine) < bill_when_logged(emulator)


def test_a_timed_out_attempt_the_sdk_retries_is_charged_besides_the_answer(packaged: Path, emulator: Emulator,
                                                                          telemetry: Any) -> None:
    # Both attempts reach the server, and it bills both: the first at worst case beside the reservation,
    # the second at its usage.
    emulator.inject(None, hang_s=0.6)
    engine = load(packaged)
    with policy_context(**INTERACTIVE):
        message = client_for(emulator, engine, timeout=0.3, max_retries=1).messages.create(**messages_params())
    assert message.usage.output_tokens > 0
    assert all_spend(engine) >= bill_when_logged(emulator, requests=2) > 0
    assert len([e for e in emulator.bill() if e["request"] in (0, 1)]) == 2  # the oracle billed both attempts
    assert event_count(telemetry, "policy_engine.attempt_charged") == 1
