"""Today's catalog (December 2026), decided and priced model by model and platform by platform.

Each model of the reference section ("The API as of December 2026") is decided by a policy that
asks for fast on every interactive request, so only the catalog's dates, platforms and prices
stand between it and fast mode. Figures are per MTok from the catalog's sources.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from policy_engine import load
from policy_engine.catalog import estimate, load_catalog
from policy_engine.decide import FAST_BETA, Engine

TODAY = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)
EAGER = """\
version: 1
name: eager
default: standard
rules:
  - name: wants-fast
    when: context.interactive
    speed: fast
"""
CHAT: dict[str, Any] = {"max_tokens": 1000, "messages": [{"role": "user", "content": "Hi"}]}
WAITING = {"interactive": True}


@pytest.fixture()
def eager(tmp_path: Path) -> Engine:
    path = tmp_path / "eager.yaml"
    path.write_text(EAGER)
    return load(path)


def decide(engine: Engine, model: str, when: datetime = TODAY, platform: str | None = None, **extra: Any) -> Any:
    return engine.decide({**CHAT, "model": model, **extra}, WAITING, now=when, input_tokens=1000, platform=platform)


# --- the Claude API ----------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "beta", "std", "fast"), [
    # model, beta header, standard and fast worst case of 1000 in + 1000 out (micro-dollars)
    ("claude-opus-5-5", None, 1000 * 4 + 1000 * 20, 1000 * 8 + 1000 * 40),
    ("claude-fable-5-2", None, 1000 * 8 + 1000 * 40, 1000 * 16 + 1000 * 80),
    ("claude-opus-5", FAST_BETA, 1000 * 5 + 1000 * 25, 1000 * 10 + 1000 * 50),
])
def test_todays_fast_models_go_fast_with_the_header_the_catalog_says(eager: Engine, model: str, beta: str | None,
                                                                     std: int, fast: int) -> None:
    d = decide(eager, model)
    assert (d.speed, d.outcome, d.guardrails) == ("fast", "allowed", [])
    assert d.fast_beta == beta
    assert (d.estimate_standard_micro, d.estimate_fast_micro) == (std, fast)
    wire = d.apply({**CHAT, "model": model})
    assert wire["speed"] == "fast"
    assert wire.get("betas", []) == ([beta] if beta else [])
    headers = d.apply_headers({"anthropic-beta": "files-api-2025-04-14"})
    assert headers["anthropic-beta"] == ("files-api-2025-04-14," + beta if beta else "files-api-2025-04-14")


def test_mythos_5_2_has_fast_mode_but_no_fast_price_so_it_stays_standard(eager: Engine) -> None:
    d = decide(eager, "claude-mythos-5-2")
    assert (d.speed, d.guardrails) == ("standard", ["unpriced"])
    assert d.estimate_standard_micro == 1000 * 8 + 1000 * 40 and d.estimate_fast_micro is None


@pytest.mark.parametrize("model", ["claude-sonnet-5-5", "claude-sonnet-4-6", "claude-haiku-5-5", "claude-haiku-4-5",
                                   "claude-fable-5-1", "claude-opus-4-5"])
def test_sonnet_haiku_and_older_models_never_go_fast_and_are_priced(eager: Engine, model: str) -> None:
    d = decide(eager, model)
    assert (d.speed, d.guardrails) == ("standard", ["unsupported_model"])
    assert d.estimate_standard_micro is not None and d.estimate_standard_micro > 0


@pytest.mark.parametrize(("model", "last_day", "first_day_gone", "why"), [
    ("claude-opus-4-8", datetime(2026, 11, 30, 12, tzinfo=timezone.utc), datetime(2026, 12, 1, 12, tzinfo=timezone.utc),
     "fast requests return an error"),
    ("claude-opus-4-7", datetime(2026, 7, 23, 12, tzinfo=timezone.utc), datetime(2026, 7, 24, 12, tzinfo=timezone.utc),
     "fast requests return an error"),
    ("claude-opus-4-6", datetime(2026, 6, 28, 12, tzinfo=timezone.utc), datetime(2026, 6, 29, 12, tzinfo=timezone.utc),
     "served and billed at standard, so the premium buys nothing"),
])
def test_a_retired_model_goes_fast_the_day_before_and_never_after(eager: Engine, model: str, last_day: datetime,
                                                                  first_day_gone: datetime, why: str) -> None:
    before = decide(eager, model, last_day)
    assert (before.speed, before.guardrails, before.fast_beta) == ("fast", [], FAST_BETA)
    after = decide(eager, model, first_day_gone)
    assert (after.speed, after.outcome, after.guardrails, after.forced_by) == ("standard", "downgraded", ["retired"], "retired")
    reason = next(r for r in after.reasons if r.startswith("guardrail retired:"))
    retired_on = load_catalog().model(model).fast.retired_on
    assert str(retired_on) in reason and why in reason
    assert "code.claude.com" in reason or "release notes" in reason or "platform.claude.com" in reason  # the source


def test_fast_mode_is_not_assumed_before_it_became_available(eager: Engine) -> None:
    d = decide(eager, "claude-opus-5", datetime(2026, 7, 1, tzinfo=timezone.utc))
    assert (d.speed, d.guardrails) == ("standard", ["unsupported_model"])
    assert any("available from 2026-07-24" in r for r in d.reasons)


def test_a_fast_request_to_a_served_standard_model_settles_at_standard(eager: Engine) -> None:
    # Decided fast the day before Opus 4.6's retirement, answered after it: the response says standard.
    d = decide(eager, "claude-opus-4-6", datetime(2026, 6, 28, 23, 59, tzinfo=timezone.utc))
    assert d.speed == "fast"
    settlement = eager.settle(d, {"input_tokens": 1000, "output_tokens": 500, "speed": "standard"})
    assert settlement.speed == "standard"
    assert settlement.cost_micro == 1000 * 5 + 500 * 25  # standard rates, not $30 / $150


def test_model_features_say_what_the_catalog_says_at_the_decision_time(tmp_path: Path) -> None:
    path = tmp_path / "probe.yaml"
    path.write_text(
        "version: 1\nname: probe\ndefault: standard\nrules:\n  - name: probe\n    when: 'true'\n    speed: standard\n"
        "    reason:\n      expr: >-\n"
        "        model.id + ' ' + model.family + ' ' + string(model.known) + ' ' + string(model.fast_available) + ' ' +\n"
        "        string(model.fast_priced) + ' ' + string(model.fast_needs_beta) + ' ' +\n"
        "        (has(model.fast_multiplier) ? string(model.fast_multiplier) : '-') + ' ' +\n"
        "        (has(model.fast_retires_in_days) ? string(int(model.fast_retires_in_days)) : '-') + ' ' + request.platform\n")
    engine = load(path)

    def probe(model: str, when: datetime = TODAY, platform: str | None = None) -> str:
        return decide(engine, model, when, platform).reasons[0].removeprefix("probe: ")

    assert probe("claude-opus-5-5") == "claude-opus-5-5 opus true true true false 2 - claude_api"
    assert probe("claude-opus-5") == "claude-opus-5 opus true true true true 2 - claude_api"
    assert probe("claude-opus-4-8", datetime(2026, 11, 20, 12, tzinfo=timezone.utc)) == (
        "claude-opus-4-8 opus true true true true 2 10 claude_api")  # retires in 10.5 days
    assert probe("claude-opus-4-8") == "claude-opus-4-8 opus true false true true 2 -1 claude_api"
    assert probe("claude-opus-4-6", datetime(2026, 3, 2, tzinfo=timezone.utc)) == (
        "claude-opus-4-6 opus true true true true 6 119 claude_api")  # until 2026-06-29
    assert probe("claude-sonnet-5-5") == "claude-sonnet-5-5 sonnet true false false false - - claude_api"
    assert probe("claude-opus-9") == "claude-opus-9  false false false false - - claude_api"
    assert probe("claude-fable-5-2", platform="vertex") == "claude-fable-5-2 fable true true true false 2 - vertex"
    assert probe("claude-opus-5-5", platform="vertex") == "claude-opus-5-5 opus true false false false - - vertex"


# --- other platforms -----------------------------------------------------------------------------


def test_vertex_offers_fast_on_fable_5_2_only_and_charges_the_regional_premium(eager: Engine) -> None:
    fable = decide(eager, "claude-fable-5-2", platform="vertex")
    assert (fable.speed, fable.platform, fable.fast_beta) == ("fast", "vertex", None)
    # $8 / $40 x 1.1 (regional endpoints), fast 2x: the higher figure, since the endpoint is not known
    assert fable.estimate_standard_micro == 1000 * 8.8 + 1000 * 44
    assert fable.estimate_fast_micro == 2 * fable.estimate_standard_micro
    opus = decide(eager, "claude-opus-5-5", platform="vertex")
    assert (opus.speed, opus.guardrails) == ("standard", ["unsupported_model"])
    assert any("on vertex" in r for r in opus.reasons)


def test_bedrock_and_claude_platform_on_aws_have_no_fast_mode(eager: Engine) -> None:
    for platform, model in (("bedrock", "anthropic.claude-opus-5-5"), ("bedrock", "claude-opus-5-5"),
                            ("claude_platform_aws", "claude-opus-5-5")):
        d = decide(eager, model, platform=platform)
        assert (d.speed, d.guardrails) == ("standard", ["unsupported_model"]), (platform, model)
        assert d.estimate_standard_micro is not None
    assert decide(eager, "claude-opus-5-5", platform="claude_platform_aws").estimate_standard_micro == 1000 * 4 + 1000 * 20
    assert decide(eager, "anthropic.claude-opus-5-5", platform="bedrock").estimate_standard_micro == round(1.1 * (1000 * 4 + 1000 * 20))


def test_foundry_sends_fast_as_the_fast_model_id_without_speed(eager: Engine) -> None:
    d = decide(eager, "claude-opus-5-5", platform="foundry")
    assert (d.speed, d.fast_model) == ("fast", "claude-opus-5-5-fast")
    wire = d.apply({**CHAT, "model": "claude-opus-5-5", "speed": "fast"})
    assert wire["model"] == "claude-opus-5-5-fast" and "speed" not in wire and "betas" not in wire
    assert d.apply_headers({}) == {}  # no beta header: the deployment sets the speed
    # A caller that names the fast deployment but is decided standard is sent to the standard one.
    s = eager.decide({**CHAT, "model": "claude-opus-5-5-fast"}, {"interactive": False}, now=TODAY, platform="foundry")
    assert s.speed == "standard" and s.apply({**CHAT, "model": "claude-opus-5-5-fast"})["model"] == "claude-opus-5-5"


def test_an_unknown_platform_is_a_clear_error(eager: Engine) -> None:
    from policy_engine.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="unknown platform 'azure'; expected one of claude_api"):
        decide(eager, "claude-opus-5-5", platform="azure")
    with pytest.raises(ValueError, match="unknown platform 'gcp'"):
        Engine(list(eager.policies.values()), platform="gcp")


# --- prices ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "rates"), [
    # (input, output, 5m write, 1h write, cache read) per MTok at standard speed, from the catalog's sources
    ("claude-opus-5-5", (4, 20, 5, 8, 0.2)),
    ("claude-opus-5", (5, 25, 6.25, 10, 0.5)),
    ("claude-opus-4-8", (5, 25, 6.25, 10, 0.5)),
    ("claude-opus-4-6", (5, 25, 6.25, 10, 0.5)),
    ("claude-fable-5-2", (8, 40, 10, 16, 0.2)),
    ("claude-mythos-5-2", (8, 40, 10, 16, 0.2)),
    ("claude-fable-5-1", (10, 50, 12.5, 20, 0.25)),
    ("claude-sonnet-5-5", (2, 10, 2.5, 4, 0.2)),
    ("claude-sonnet-4-6", (3, 15, 3.75, 6, 0.3)),
    ("claude-haiku-5-5", (0.1, 0.5, 0.125, 0.2, 0.01)),
    ("claude-haiku-4-5", (1, 5, 1.25, 2, 0.1)),
])
def test_standard_rates_per_model(model: str, rates: tuple[float, ...]) -> None:
    card = load_catalog().model(model).rates("standard", 1000)
    per_mtok = tuple(x / 1_000_000 for x in (card.input, card.output, card.cache_write_5m, card.cache_write_1h, card.cache_read))
    assert per_mtok == pytest.approx(rates)


def test_haiku_5_5_prompts_over_100k_bill_every_rate_at_5x() -> None:
    haiku = load_catalog().model("claude-haiku-5-5")
    assert estimate(haiku, speed="standard", input_tokens=100_000, max_tokens=1000) == 100_000 * 0.1 + 1000 * 0.5
    assert estimate(haiku, speed="standard", input_tokens=100_001, max_tokens=1000) == 50_001 + 2_500  # rounded up once


def test_fast_is_a_multiplier_over_the_full_context_cache_and_residency_included() -> None:
    opus = load_catalog().model("claude-opus-5-5")
    standard, fast = opus.rates("standard", 900_000, "us"), opus.rates("fast", 900_000, "us")
    assert fast.input == 2 * standard.input == round(4 * 1.1 * 2 * 1_000_000)
    assert (fast.cache_write_5m, fast.cache_write_1h, fast.cache_read) == (
        2 * standard.cache_write_5m, 2 * standard.cache_write_1h, 2 * standard.cache_read)
