"""The catalog: packaged data, lookups, rate cards, user overrides and their diagnostics."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from pathlib import Path

import pydantic
import pytest
import yaml

from policy_engine.catalog import (
    DEFAULT_CATALOG_PATH,
    Catalog,
    ModelEntry,
    RateCard,
    estimate,
    load_catalog,
)
from policy_engine.errors import PolicyError, PricingError

OPUS = "claude-opus-4-6"
LATER_OPUS = ("claude-opus-4-8", "claude-opus-5", "claude-opus-5-5")
PRICE_KEYS = {"tiers", "input", "output", "multiplier", "write_5m", "write_1h", "read", "multipliers", "discount"}


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture(scope="module")
def opus(catalog: Catalog) -> ModelEntry:
    return catalog.model(OPUS)


def write(tmp_path: Path, text: str, name: str = "catalog.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- the packaged file -------------------------------------------------------------------


def test_packaged_file_starts_with_the_schema_modeline() -> None:
    first = DEFAULT_CATALOG_PATH.read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=../../schemas/catalog.schema.json"


def test_packaged_catalog_validates_and_holds_the_expected_models(catalog: Catalog) -> None:
    assert catalog.version == 2 and catalog.currency == "USD"
    models = catalog.providers["anthropic"].models
    assert {OPUS, *LATER_OPUS, "claude-sonnet-4-6", "claude-fable-5-2", "claude-mythos-5-2", "claude-opus-4-7"} <= set(models)
    assert set(catalog.platforms) == {"claude_api", "claude_platform_aws", "bedrock", "vertex", "foundry"}
    # loading again returns the shared, immutable instance
    assert load_catalog() is catalog


def _sourced_blocks(node: object, path: tuple = ()):
    """Every mapping that holds a price key, with the path of the block that must carry provenance."""
    if isinstance(node, dict):
        if PRICE_KEYS & set(node) and not {"above_input_tokens"} & set(node):
            yield path, node
        for key, value in node.items():
            yield from _sourced_blocks(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _sourced_blocks(value, (*path, i))


def test_every_price_in_the_packaged_file_has_as_of_and_source() -> None:
    data = yaml.safe_load(DEFAULT_CATALOG_PATH.read_text())
    blocks = list(_sourced_blocks(data))
    priced = {path[3] for path, _ in blocks if path[:3] == ("providers", "anthropic", "models")}
    assert {"claude-opus-5-5", "claude-opus-5", "claude-fable-5-2", "claude-sonnet-5-5", OPUS} <= priced
    for path, block in blocks:
        assert isinstance(block.get("as_of"), date), path
        assert isinstance(block.get("source"), str) and block["source"].strip(), path
        assert block.get("source_kind") in {"primary", "secondary", "unverified", "assumption"}, path


def test_opus_4_6_is_fully_sourced(opus: ModelEntry) -> None:
    assert opus.display_name == "Claude Opus 4.6"
    assert opus.fast.supported and opus.fast.beta_header == "fast-mode-2026-02-01"
    # fast requests now run at standard speed and price
    assert (opus.fast.retired_on, opus.fast.after_retirement) == (date(2026, 6, 29), "standard")
    assert opus.fast.fast_with_batch is False and opus.fast.fast_with_priority_tier is False
    assert opus.fast.pricing is not None and opus.fast.pricing.source_kind == "primary"
    assert [(t.above_input_tokens, t.input, t.output) for t in opus.fast.pricing.tiers or []] == [
        (0, Decimal(30), Decimal(150)),
        (200_000, Decimal(60), Decimal(225)),
    ]
    # standard: one sourced tier only, no invented long-context rate
    assert opus.standard is not None and opus.standard.source_kind == "primary"
    assert [(t.above_input_tokens, t.input, t.output) for t in opus.standard.tiers] == [(0, Decimal(5), Decimal(25))]
    assert opus.cache is not None
    assert (opus.cache.write_5m, opus.cache.write_1h, opus.cache.read) == (Decimal("1.25"), Decimal(2), Decimal("0.1"))
    assert opus.data_residency is not None and opus.data_residency.multipliers["us"] == Decimal("1.1")
    assert opus.batch is not None and opus.batch.discount == Decimal("0.5")
    t = opus.throughput
    assert t is not None and t.assumption is True
    assert (t.standard_otps, t.fast_otps, t.ttft_s) == (60, 150, 1.5)


def test_later_opus_models_are_fast_at_2x_over_the_full_context(catalog: Catalog) -> None:
    for name in LATER_OPUS:
        m = catalog.model(name)
        assert m.fast.supported is True
        assert m.fast.pricing is not None and m.fast.pricing.multiplier == 2
        assert m.fast.pricing.source_kind in ("primary", "secondary")  # read on Anthropic's page, or a copy of it
        standard, fast = m.rates("standard", 300_000), m.rates("fast", 300_000)
        # every token type, cache included, over 200K too
        assert (fast.input, fast.output, fast.cache_write_5m, fast.cache_write_1h, fast.cache_read) == (
            2 * standard.input, 2 * standard.output, 2 * standard.cache_write_5m, 2 * standard.cache_write_1h,
            2 * standard.cache_read)
    # generally available without the beta on Opus 5.5; the launch beta on Opus 5 and 4.8
    assert catalog.model("claude-opus-5-5").fast.beta_header is None
    assert catalog.model("claude-opus-5").fast.beta_header == "fast-mode-2026-02-01"
    assert catalog.model("claude-opus-4-8").fast.retired_on == date(2026, 12, 1)
    assert catalog.model("claude-opus-4-8").fast.after_retirement == "error"


def test_a_price_no_source_gives_stays_unknown(catalog: Catalog) -> None:
    assert catalog.model("claude-mythos-preview").standard is None
    with pytest.raises(PricingError, match="standard price is unknown"):
        catalog.model("claude-mythos-preview").rates("standard", 1000)
    mythos = catalog.model("claude-mythos-5-2")  # fast mode, but no page gives its fast price
    assert mythos.fast.supported and mythos.fast.pricing is None
    with pytest.raises(PricingError, match="fast-mode price is unknown"):
        mythos.rates("fast", 1000)


def test_sonnet_is_a_realistic_unsupported_model(catalog: Catalog) -> None:
    sonnet = catalog.model("claude-sonnet-4-6")
    assert sonnet.fast.supported is False
    with pytest.raises(PricingError, match='does not support fast mode'):
        sonnet.rates("fast", 10)
    # the gap the February catalog had: Sonnet 4.6 is priced on Anthropic's own pages now
    assert estimate(sonnet, speed="standard", input_tokens=1_000_000, max_tokens=1_000_000) == 18_000_000


def test_models_are_frozen(opus: ModelEntry) -> None:
    with pytest.raises(pydantic.ValidationError):
        opus.display_name = "x"  # type: ignore[misc]


def test_json_schema_forbids_unknown_keys_and_has_descriptions() -> None:
    schema = Catalog.model_json_schema(mode="validation")
    defs = schema["$defs"]
    assert defs["ModelEntry"]["additionalProperties"] is False
    assert "description" in defs["PriceTier"]["properties"]["above_input_tokens"]
    # a price may be written as a number or a decimal string
    kinds = {s.get("type") for s in defs["PriceTier"]["properties"]["input"]["anyOf"]}
    assert {"number", "string"} <= kinds


# --- lookups -----------------------------------------------------------------------------


def test_unknown_model_suggests_the_close_name(catalog: Catalog) -> None:
    with pytest.raises(PricingError) as info:
        catalog.model("claude-opus-4.6")
    assert "did you mean 'claude-opus-4-6'?" in str(info.value)
    assert catalog.find("claude-opus-4.6") is None
    assert catalog.find(OPUS) is catalog.model(OPUS)


def test_unknown_provider(catalog: Catalog) -> None:
    with pytest.raises(PricingError, match="unknown provider 'antropic'.*did you mean 'anthropic'"):
        catalog.model(OPUS, provider="antropic")
    assert catalog.find(OPUS, provider="openai") is None


def test_model_knows_its_id_and_provider(opus: ModelEntry) -> None:
    assert (opus.id, opus.provider) == (OPUS, "anthropic")


# --- rate cards --------------------------------------------------------------------------


def test_rate_cards_are_integer_pico_dollars_per_token(opus: ModelEntry) -> None:
    # $5/MTok = 5e-6 $/token = 5_000_000 pico-dollars per token
    assert opus.rates("standard", 1) == RateCard(
        input=5_000_000, output=25_000_000, cache_write_5m=6_250_000, cache_write_1h=10_000_000,
        cache_read=500_000, speed="standard", above_input_tokens=0, inference_geo=None,
    )
    # fast above 200K, US-only: 60 x 1.1 = 66; 225 x 1.1 = 247.5; 5m write 60 x 1.25 x 1.1 = 82.5
    card = opus.rates("fast", 200_001, "us")
    assert (card.input, card.output, card.cache_write_5m, card.cache_write_1h, card.cache_read) == (
        66_000_000, 247_500_000, 82_500_000, 132_000_000, 6_600_000,
    )


def test_tier_threshold_is_strictly_above_200k(opus: ModelEntry) -> None:
    assert opus.rates("fast", 200_000).input == 30_000_000
    assert opus.rates("fast", 200_001).input == 60_000_000
    assert opus.rates("fast", 0).input == 30_000_000
    # standard has one tier: no long-context rate is invented
    assert opus.rates("standard", 900_000).input == 5_000_000


def test_rate_cards_are_cached(opus: ModelEntry) -> None:
    assert opus.rates("fast", 5, "us") is opus.rates("fast", 7, "us")


def test_unknown_geo_and_speed(opus: ModelEntry) -> None:
    with pytest.raises(PricingError, match="inference_geo 'eu'.*known: global, us"):
        opus.rates("standard", 1, "eu")
    with pytest.raises(PricingError, match="unknown speed 'turbo'"):
        opus.rates("turbo", 1)  # type: ignore[arg-type]


# --- user files --------------------------------------------------------------------------

OVERRIDE = """\
providers:
  anthropic:
    models:
      claude-opus-4-6:
        fast:
          pricing:            # just the fast price: 6x over the whole context window
            multiplier: 6
            as_of: 2026-12-01
            source: our enterprise agreement
      claude-opus-4-8:
        standard:
          tiers: [{above_input_tokens: 0, input: 5, output: 25}]
          as_of: 2026-12-01
          source: our invoice
        fast:
          pricing: {multiplier: 2, as_of: 2026-12-01, source: our invoice}
        cache: {write_5m: 1.25, write_1h: 2, read: 0.1, as_of: 2026-12-01, source: our invoice}
      my-opus:
        display_name: Our proxied Opus
        aliases: [opus-proxy]
        standard:
          tiers: [{above_input_tokens: 0, input: "2.5", output: "12.5"}]
          as_of: 2026-12-01
          source: proxy price list
        cache: {write_5m: "1.25", write_1h: "2", read: "0.1", as_of: 2026-12-01, source: proxy price list}
  openai:
    display_name: OpenAI
    models: {}
"""


def test_extend_overrides_only_the_fast_price(tmp_path: Path) -> None:
    cat = load_catalog(write(tmp_path, OVERRIDE))
    opus = cat.model(OPUS)
    assert opus.fast.pricing is not None and opus.fast.pricing.multiplier == 6
    assert opus.fast.pricing.tiers is None and opus.fast.pricing.source == "our enterprise agreement"
    # the rest of the model is the packaged data
    assert opus.fast.beta_header == "fast-mode-2026-02-01" and opus.fast.supported
    assert opus.standard is not None and opus.standard.tiers[0].input == 5
    assert opus.data_residency is not None and opus.throughput is not None
    # 250K in + 10K out at a flat 6x: 0.25 x 30 + 0.01 x 150 = 7.50 + 1.50 = $9.00
    assert estimate(opus, speed="fast", input_tokens=250_000, max_tokens=10_000) == 9_000_000
    # the packaged catalog is untouched
    assert estimate(load_catalog().model(OPUS), speed="fast", input_tokens=250_000, max_tokens=10_000) == 17_250_000


def test_extend_fills_in_a_later_model_and_adds_new_ones(tmp_path: Path) -> None:
    cat = load_catalog(write(tmp_path, OVERRIDE))
    o48 = cat.model("claude-opus-4-8")
    assert o48.fast.beta_header == "fast-mode-2026-02-01"  # kept from the packaged entry
    # 1M in fast at 2 x $5 = $10
    assert estimate(o48, speed="fast", input_tokens=1_000_000, max_tokens=0) == 10_000_000
    mine = cat.model("opus-proxy")
    assert mine is cat.model("my-opus") and mine.fast.supported is False
    # 1M in + 1M out at $2.50 / $12.50 = $15
    assert estimate(mine, speed="standard", input_tokens=1_000_000, max_tokens=1_000_000) == 15_000_000
    assert "openai" in cat.providers and cat.find("claude-sonnet-4-6") is not None


def test_replace_keeps_only_the_user_file(tmp_path: Path) -> None:
    only_mine = OVERRIDE[: OVERRIDE.index("      claude-opus-4-6:")] + OVERRIDE[OVERRIDE.index("      my-opus:"):]
    cat = load_catalog(write(tmp_path, only_mine), extend=False)
    assert cat.find("my-opus") is not None and cat.find("opus-proxy") is not None
    assert cat.find("claude-sonnet-4-6") is None and cat.find(OPUS) is None
    assert set(cat.providers) == {"anthropic", "openai"}


def test_replace_does_not_borrow_from_the_packaged_entry(tmp_path: Path) -> None:
    # Extending, the opus-4-8 entry inherits `fast.supported: true`; replacing, it must say so.
    path = write(tmp_path, OVERRIDE[: OVERRIDE.index("      claude-opus-4-6:")] + OVERRIDE[OVERRIDE.index("      claude-opus-4-8:"):])
    with pytest.raises(PolicyError) as info:
        load_catalog(path, extend=False)
    [d] = info.value.diagnostics
    assert (d.line, d.col, d.code) == (10, 11, "PE012") and "'supported'" in d.message


def test_replace_with_an_incomplete_model_reports_the_missing_key(tmp_path: Path) -> None:
    path = write(tmp_path, "providers:\n  anthropic:\n    models:\n      m1:\n        display_name: M\n")
    with pytest.raises(PolicyError) as info:
        load_catalog(path, extend=False)
    [d] = info.value.diagnostics
    assert (d.file, d.line, d.col, d.code) == (str(path), 5, 9, "PE012")  # the model's mapping
    assert "standard" in d.message


BAD = """\
providers:
  anthropic:
    models:
      claude-opus-4-6:
        fast:
          pricing:
            multipler: 6
            as_of: 2026-12-01
            source: typo
        cache:
          write_5m: lots
          write_1h: 2
          read: 0.1
          as_of: 2026-12-01
          source: x
"""


def test_bad_override_points_at_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, BAD)
    with pytest.raises(PolicyError) as info:
        load_catalog(path)
    found = {(d.line, d.col, d.code): d for d in info.value.diagnostics}
    unknown = found[(7, 13, "PE010")]
    assert unknown.file == str(path) and "multipler" in unknown.message
    assert unknown.hint == "did you mean 'multiplier'?"
    wrong_type = found[(11, 21, "PE011")]
    assert "write_5m" in wrong_type.message
    # the formatted error quotes the offending line of the user's file
    assert "multipler: 6" in str(info.value)


def test_yaml_syntax_error_in_override(tmp_path: Path) -> None:
    path = write(tmp_path, "providers:\n  anthropic: [\n")
    with pytest.raises(PolicyError) as info:
        load_catalog(path)
    assert info.value.diagnostics[0].file == str(path)
    assert info.value.diagnostics[0].line >= 2


def test_override_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="must be a mapping"):
        load_catalog(write(tmp_path, "- a\n- b\n"))


def test_fast_pricing_needs_exactly_one_form(tmp_path: Path) -> None:
    text = (
        "providers:\n  anthropic:\n    models:\n      claude-opus-4-6:\n        fast:\n          pricing:\n"
        "            multiplier: 6\n            tiers: [{above_input_tokens: 0, input: 1, output: 1}]\n"
        "            as_of: 2026-12-01\n            source: x\n"
    )
    with pytest.raises(PolicyError, match="exactly one of `multiplier` or `tiers`") as info:
        load_catalog(write(tmp_path, text))
    assert info.value.diagnostics[0].line == 7  # the pricing block's mapping


def test_tiers_must_start_at_zero_and_increase(tmp_path: Path) -> None:
    text = (
        "providers:\n  anthropic:\n    models:\n      m:\n        standard:\n"
        "          tiers: [{above_input_tokens: 0, input: 1, output: 1}, {above_input_tokens: 0, input: 2, output: 2}]\n"
        "          as_of: 2026-12-01\n          source: x\n"
    )
    with pytest.raises(PolicyError, match="strictly increasing"):
        load_catalog(write(tmp_path, text))


def test_a_price_below_one_pico_dollar_per_token_is_refused(tmp_path: Path) -> None:
    # 0.0000005 $/MTok = 0.5 pico-dollar per token: it cannot be an integer rate
    text = (
        "providers:\n  anthropic:\n    models:\n      m:\n        standard:\n"
        "          tiers: [{above_input_tokens: 0, input: \"0.0000005\", output: 1}]\n"
        "          as_of: 2026-12-01\n          source: x\n"
        "        cache: {write_5m: 1.25, write_1h: 2, read: 0.1, as_of: 2026-12-01, source: x}\n"
    )
    with pytest.raises(PolicyError, match="not a whole number of pico-dollars per token") as info:
        load_catalog(write(tmp_path, text))
    assert info.value.diagnostics[0].line == 5  # the model's mapping


def test_a_float_written_in_yaml_is_read_as_its_decimal(tmp_path: Path) -> None:
    # 1.1 as a YAML float must become Decimal("1.1"), not 1.100000000000000088817841970012523...
    text = (
        "providers:\n  anthropic:\n    models:\n      claude-opus-4-6:\n        data_residency:\n"
        "          multipliers: {us: 1.1, global: 1}\n          as_of: 2026-12-01\n          source: x\n"
    )
    cat = load_catalog(write(tmp_path, text))
    assert cat.model(OPUS).data_residency.multipliers["us"] == Decimal("1.1")  # type: ignore[union-attr]
    assert cat.model(OPUS).rates("standard", 1, "us").input == 5_500_000


def test_duplicate_alias_is_refused(tmp_path: Path) -> None:
    text = (
        "providers:\n  anthropic:\n    models:\n      m:\n        aliases: [claude-opus-4-6]\n"
        "        standard: null\n"
    )
    with pytest.raises(PolicyError, match="already the name of another model"):
        load_catalog(write(tmp_path, text))


def test_missing_override_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_catalog(tmp_path / "nope.yaml")
