"""The throughput observer: EWMAs of output speed and TTFT, and the features decisions see."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy_engine.catalog import load_catalog
from policy_engine.decide import load
from policy_engine.observe import DEFAULT_STANDARD_OTPS, ThroughputObserver

CATALOG = load_catalog()
OPUS = CATALOG.model("claude-opus-5")
PARAMS = {"model": "claude-opus-5", "max_tokens": 1_000, "messages": [{"role": "user", "content": "hi"}]}


def test_without_observations_the_catalog_figures_stand() -> None:
    observer = ThroughputObserver()
    assert observer.features(OPUS, 600) == {
        "standard_otps": 60.0, "ttft_s": 1.5, "est_standard_s": 11.5, "fast_otps": 120.0, "est_fast_s": 6.5}
    assert observer.otps("claude-opus-5", "fast") is None and observer.ttft("claude-opus-5") is None


def test_unknown_models_get_the_default_and_no_fast_figures() -> None:
    assert ThroughputObserver().features(None, 120, "mystery") == {
        "standard_otps": DEFAULT_STANDARD_OTPS, "ttft_s": 0.0, "est_standard_s": 2.0}


def test_unsupported_models_never_show_fast_figures() -> None:
    sonnet = CATALOG.model("claude-sonnet-4-6")
    observer = ThroughputObserver()
    observer.observe_stream("claude-sonnet-4-6", "fast", 100, 0.1, 0.1)
    assert "fast_otps" not in observer.features(sonnet, 100)


def test_streams_feed_an_ewma_per_model_and_speed() -> None:
    observer = ThroughputObserver(alpha=0.5)
    observer.observe_stream("claude-opus-5", "fast", 200, ttft_s=0.4, generation_s=1.0)
    assert observer.otps("claude-opus-5", "fast") == 200.0 and observer.ttft("claude-opus-5") == 0.4
    observer.observe_stream("claude-opus-5", "fast", 100, ttft_s=0.6, generation_s=1.0)
    assert observer.otps("claude-opus-5", "fast") == 150.0  # half way to the new sample
    assert observer.ttft("claude-opus-5") == 0.5
    assert observer.otps("claude-opus-5", "standard") is None
    assert observer.samples("claude-opus-5", "fast") == 2
    features = observer.features(OPUS, 300)
    assert features["fast_otps"] == 150.0 and features["est_fast_s"] == 0.5 + 2.0
    assert features["standard_otps"] == 60.0  # not observed yet: the catalog's


def test_features_follow_the_entry_a_name_resolves_to_not_the_name() -> None:
    observer = ThroughputObserver(alpha=1.0)
    observer.observe_stream("claude-opus-5", "fast", 300, ttft_s=0.5, generation_s=1.0)
    assert observer.features(OPUS, 300, "team-model")["fast_otps"] == 300.0
    # The same request name resolved to another entry (say, after a catalog reload): that entry's figures.
    sonnet = CATALOG.model("claude-sonnet-4-6")
    features = observer.features(sonnet, 300, "team-model")
    assert "fast_otps" not in features and features["ttft_s"] == sonnet.throughput.ttft_s
    assert observer.features(OPUS, 300, "team-model")["ttft_s"] == 0.5


def test_short_or_instant_samples_are_ignored() -> None:
    observer = ThroughputObserver(min_output_tokens=16)
    observer.observe_stream("m", "fast", 15, ttft_s=None, generation_s=1.0)
    observer.observe_stream("m", "fast", 500, ttft_s=None, generation_s=0.0)
    observer.observe_response("m", "fast", 3, 1.0)
    assert observer.otps("m", "fast") is None and observer.ttft("m") is None


def test_non_streaming_responses_subtract_the_observed_ttft() -> None:
    observer = ThroughputObserver(alpha=1.0)
    observer.observe_response("m", "standard", 100, 2.0)
    assert observer.otps("m", "standard") == 50.0  # no TTFT known: a lower bound
    observer.observe_stream("m", "standard", 0, ttft_s=1.0, generation_s=None)
    observer.observe_response("m", "standard", 100, 2.0)
    assert observer.otps("m", "standard") == 100.0
    observer.observe_response("m", "standard", 100, 0.5)  # faster than the TTFT: not measurable
    assert observer.otps("m", "standard") == 100.0


def test_alpha_is_validated() -> None:
    with pytest.raises(ValueError, match="alpha"):
        ThroughputObserver(alpha=0)


def test_decisions_use_observed_speeds(tmp_path: Path) -> None:
    policy = tmp_path / "slo.yaml"
    policy.write_text(
        "version: 1\nname: slo\ndefault: standard\nrules:\n"
        "  - name: fast-meets-slo\n"
        "    when: has(throughput.est_fast_s) && throughput.est_fast_s * 1000.0 < double(context.latency_slo_ms)\n"
        "    speed: fast\n")
    observer = ThroughputObserver(alpha=1.0)
    engine = load(policy, throughput=observer)
    context = {"latency_slo_ms": 3_000}
    # Catalog: 1.5 s + 1,000 / 120 = 9.8 s, over the 3 s SLO.
    assert engine.decide(PARAMS, context).speed == "standard"
    observer.observe_stream("claude-opus-5", "fast", 1_000, ttft_s=0.5, generation_s=2.0)
    # Observed: 0.5 s + 1,000 / 500 = 2.5 s.
    decision = engine.decide(PARAMS, context)
    assert (decision.speed, decision.rule) == ("fast", "fast-meets-slo")
    assert load(policy).decide(PARAMS, context).speed == "standard"  # an engine without the observer
