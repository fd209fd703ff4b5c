"""Exact request costs: estimate (worst case, before sending) and actual (from usage).

Every expected figure is computed by hand in the comments, in $/MTok:
cost = tokens / 1_000_000 x rate. 1 micro-dollar = $0.000001.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy_engine.catalog import (
    ModelEntry,
    UsageError,
    actual,
    cost_of_counts,
    estimate,
    format_usd,
    load_catalog,
    parse_usage,
    to_usd,
)
from policy_engine.errors import PricingError


@pytest.fixture(scope="module")
def opus() -> ModelEntry:
    return load_catalog().model("claude-opus-4-6")


# --- the figures from the brief ------------------------------------------------------------


def test_fast_above_200k(opus: ModelEntry) -> None:
    # 250K input > 200K -> $60 / $225: 0.25 x 60 + 0.01 x 225 = 15 + 2.25 = $17.25
    micro = estimate(opus, speed="fast", input_tokens=250_000, max_tokens=10_000)
    assert micro == 17_250_000
    assert to_usd(micro) == Decimal("17.25") and format_usd(micro) == "$17.25"
    assert actual(opus, {"input_tokens": 250_000, "output_tokens": 10_000, "speed": "fast"}) == 17_250_000


def test_fast_and_standard_below_200k(opus: ModelEntry) -> None:
    # fast: 0.1 x 30 + 0.002 x 150 = 3 + 0.30 = $3.30
    assert estimate(opus, speed="fast", input_tokens=100_000, max_tokens=2_000) == 3_300_000
    # standard: 0.1 x 5 + 0.002 x 25 = 0.50 + 0.05 = $0.55
    assert estimate(opus, speed="standard", input_tokens=100_000, max_tokens=2_000) == 550_000
    assert actual(opus, {"input_tokens": 100_000, "output_tokens": 2_000}) == 550_000  # no speed = standard


# --- stacked multipliers ------------------------------------------------------------------


def test_fast_plus_cache_write_1h_plus_us(opus: ModelEntry) -> None:
    # input at the 1h write rate: 30 x 2 x 1.1 = $66/MTok -> 0.1 x 66 = 6.60
    # output: 150 x 1.1 = $165/MTok -> 0.001 x 165 = 0.165           total $6.765
    micro = estimate(opus, speed="fast", input_tokens=100_000, max_tokens=1_000,
                     cache_control=True, cache_ttl="1h", inference_geo="us")
    assert micro == 6_765_000 and format_usd(micro) == "$6.765"
    # the same request, every input token written to the 1h cache, costs exactly the estimate
    usage = {"input_tokens": 0, "output_tokens": 1_000, "speed": "fast", "inference_geo": "us",
             "cache_creation_input_tokens": 100_000,
             "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 100_000}}
    assert actual(opus, usage) == 6_765_000


def test_cache_write_5m_is_the_default_ttl(opus: ModelEntry) -> None:
    # 30 x 1.25 = $37.50/MTok -> 0.1 x 37.5 = 3.75; + 0.002 x 150 = 0.30 -> $4.05
    assert estimate(opus, speed="fast", input_tokens=100_000, max_tokens=2_000, cache_control=True) == 4_050_000


def test_cache_read_at_fast(opus: ModelEntry) -> None:
    # total input 51K (<= 200K): plain 1_000 x $30 = 0.03; read 50_000 x (30 x 0.1 = $3) = 0.15;
    # output 500 x $150 = 0.075                                          total $0.255
    usage = {"input_tokens": 1_000, "cache_read_input_tokens": 50_000, "output_tokens": 500, "speed": "fast"}
    assert actual(opus, usage) == 255_000


def test_above_200k_counts_cache_tokens(opus: ModelEntry) -> None:
    # input 10K + cache write 20K + cache read 180K = 210K > 200K -> $60 / $225 tier:
    # plain 10_000 x 60 = 0.60; write 5m 20_000 x (60 x 1.25 = 75) = 1.50;
    # read 180_000 x (60 x 0.1 = 6) = 1.08; output 1_000 x 225 = 0.225  total $3.405
    # (counting only the 10K uncached tokens would pick the <=200K tier: $1.74)
    usage = {"input_tokens": 10_000, "cache_creation_input_tokens": 20_000,
             "cache_read_input_tokens": 180_000, "output_tokens": 1_000, "speed": "fast"}
    assert actual(opus, usage) == 3_405_000
    # one token less in cache reads: exactly 200K total stays in the lower tier
    # 10_000 x 30 = 0.30; 20_000 x 37.5 = 0.75; 170_000 x 3 = 0.51; 1_000 x 150 = 0.15 -> $1.71
    usage["cache_read_input_tokens"] = 170_000
    assert actual(opus, usage) == 1_710_000


def test_us_geo_from_usage_overrides_the_argument(opus: ModelEntry) -> None:
    # standard, US: input 5.5, 5m write 6.875, 1h write 11, output 27.5 ($/MTok)
    # 100 x 5.5 + 1_000 x 6.875 + 2_000 x 11 + 10 x 27.5 = 550 + 6_875 + 22_000 + 275 = 29_700 micro-$
    usage = {"input_tokens": 100, "output_tokens": 10, "cache_creation_input_tokens": 3_000,
             "cache_creation": {"ephemeral_5m_input_tokens": 1_000, "ephemeral_1h_input_tokens": 2_000},
             "inference_geo": "us"}
    assert actual(opus, usage, inference_geo="global") == 29_700
    # without usage.inference_geo, the argument applies; "global" is 1x:
    # 100 x 5 + 1_000 x 6.25 + 2_000 x 10 + 10 x 25 = 500 + 6_250 + 20_000 + 250 = 27_000
    del usage["inference_geo"]
    assert actual(opus, usage, inference_geo="global") == 27_000
    assert actual(opus, usage, inference_geo="us") == 29_700


def test_split_short_of_the_total_bills_the_rest_at_5m(opus: ModelEntry) -> None:
    # total says 3_000 written, split accounts for 2_000 (1h): the other 1_000 at the 5m rate
    # 1_000 x 6.25 + 2_000 x 10 = 6_250 + 20_000 = 26_250 micro-$
    usage = {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 3_000,
             "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 2_000}}
    assert actual(opus, usage) == 26_250


# --- rounding -----------------------------------------------------------------------------


def test_each_request_rounds_up_once_to_the_micro_dollar(opus: ModelEntry) -> None:
    # a cache read costs $0.50/MTok = 0.5 micro-$ per token
    one = {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 1}
    three = {**one, "cache_read_input_tokens": 3}
    assert actual(opus, one) == 1     # 0.5 -> 1
    assert actual(opus, three) == 2   # 1.5 -> 2 (rounded once, not 3 x 1)
    assert actual(opus, {"input_tokens": 0, "output_tokens": 0}) == 0
    assert estimate(opus, speed="standard", input_tokens=1, max_tokens=0) == 5  # exactly $5/MTok


def test_money_helpers() -> None:
    assert to_usd(1) == Decimal("0.000001")
    assert to_usd(10**30 + 1) == Decimal("1000000000000000000000000.000001")  # no precision loss
    assert format_usd(0) == "$0.00"
    assert format_usd(1) == "$0.000001"
    assert format_usd(3_300_000) == "$3.30"
    assert format_usd(-1_500_000) == "-$1.50"
    assert format_usd(123_456_789) == "$123.456789"
    with pytest.raises(TypeError):
        format_usd(1.5)  # type: ignore[arg-type]


# --- refusals -----------------------------------------------------------------------------


def test_unknown_price_and_unsupported_fast() -> None:
    catalog = load_catalog()
    with pytest.raises(PricingError) as info:
        estimate(catalog.model("claude-mythos-5-2"), speed="fast", input_tokens=1, max_tokens=1)
    assert str(info.value) == (
        "cannot price anthropic/claude-mythos-5-2 at fast speed: its fast-mode price is unknown (`fast.pricing: null`)"
    )
    with pytest.raises(PricingError, match="claude-sonnet-4-6 at fast speed: it does not support fast mode"):
        actual(catalog.model("claude-sonnet-4-6"), {"input_tokens": 1, "output_tokens": 1, "speed": "fast"})


def test_bad_estimate_arguments(opus: ModelEntry) -> None:
    with pytest.raises(UsageError, match="input_tokens must be >= 0"):
        estimate(opus, speed="fast", input_tokens=-1, max_tokens=1)
    with pytest.raises(UsageError, match="max_tokens must be an int"):
        estimate(opus, speed="fast", input_tokens=1, max_tokens=1.0)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="cache_ttl"):
        estimate(opus, speed="fast", input_tokens=1, max_tokens=1, cache_control=True, cache_ttl="24h")


@pytest.mark.parametrize(
    ("usage", "message"),
    [
        ({"output_tokens": 1}, "usage.input_tokens must be an int, got NoneType"),
        ({"input_tokens": -5, "output_tokens": 1}, "usage.input_tokens must be >= 0"),
        ({"input_tokens": 1.0, "output_tokens": 1}, "usage.input_tokens must be an int, got float"),
        ({"input_tokens": "10", "output_tokens": 1}, "got str"),
        ({"input_tokens": True, "output_tokens": 1}, "got bool"),
        ({"input_tokens": 1, "output_tokens": 1, "cache_read_input_tokens": -1}, "cache_read_input_tokens"),
        ({"input_tokens": 1, "output_tokens": 1, "cache_creation": {"ephemeral_1h_input_tokens": "x"}},
         "ephemeral_1h_input_tokens"),
        ({"input_tokens": 1, "output_tokens": 1, "speed": "turbo"}, "usage.speed must be 'standard' or 'fast'"),
        ({"input_tokens": 1, "output_tokens": 1, "inference_geo": 7}, "inference_geo must be a string"),
    ],
)
def test_bad_usage(opus: ModelEntry, usage: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        actual(opus, usage)
    assert issubclass(UsageError, ValueError)


def test_none_usage(opus: ModelEntry) -> None:
    with pytest.raises(UsageError):
        actual(opus, None)


# --- usage shapes -------------------------------------------------------------------------


def test_usage_from_an_attribute_object(opus: ModelEntry) -> None:
    usage = SimpleNamespace(input_tokens=1_000, output_tokens=500, cache_read_input_tokens=50_000,
                            cache_creation_input_tokens=None, cache_creation=None, speed="fast")
    assert actual(opus, usage) == 255_000  # the cache-read figure above


def test_usage_from_the_anthropic_sdk(opus: ModelEntry) -> None:
    anthropic_types = pytest.importorskip("anthropic.types")
    usage = anthropic_types.Usage(
        input_tokens=100, output_tokens=10, cache_creation_input_tokens=3_000, cache_read_input_tokens=None,
        cache_creation=anthropic_types.CacheCreation(ephemeral_5m_input_tokens=1_000, ephemeral_1h_input_tokens=2_000),
        inference_geo="us", speed="standard",
    )
    assert actual(opus, usage) == 29_700  # the US figure above
    counts = parse_usage(usage)
    assert (counts.cache_write_5m_tokens, counts.cache_write_1h_tokens, counts.total_input_tokens) == (1_000, 2_000, 3_100)


# --- properties ---------------------------------------------------------------------------

# The catalog's $/MTok prices for claude-opus-4-6, written out independently of the code.
FAST = {False: (Decimal(30), Decimal(150)), True: (Decimal(60), Decimal(225))}
STANDARD = (Decimal(5), Decimal(25))
CACHE = {"5m": Decimal("1.25"), "1h": Decimal(2), "read": Decimal("0.1")}
GEO = {None: Decimal(1), "global": Decimal(1), "us": Decimal("1.1")}

counts = st.integers(min_value=0, max_value=400_000)


@settings(max_examples=300, deadline=None)
@given(plain=counts, w5=counts, w1=counts, read=counts, out=st.integers(0, 200_000),
       speed=st.sampled_from(["standard", "fast"]), geo=st.sampled_from([None, "global", "us"]))
def test_actual_matches_exact_decimal_arithmetic(opus: ModelEntry, plain: int, w5: int, w1: int, read: int,
                                                 out: int, speed: str, geo: str | None) -> None:
    total = plain + w5 + w1 + read
    rin, rout = FAST[total > 200_000] if speed == "fast" else STANDARD
    g = GEO[geo]
    dollars = (
        plain * rin + w5 * rin * CACHE["5m"] + w1 * rin * CACHE["1h"] + read * rin * CACHE["read"] + out * rout
    ) * g / Decimal(1_000_000)
    expected = int((dollars * 1_000_000).to_integral_value(rounding=ROUND_CEILING))
    usage = {"input_tokens": plain, "output_tokens": out, "cache_read_input_tokens": read,
             "cache_creation_input_tokens": w5 + w1,
             "cache_creation": {"ephemeral_5m_input_tokens": w5, "ephemeral_1h_input_tokens": w1},
             "speed": speed, "inference_geo": geo}
    assert actual(opus, usage) == expected


@settings(max_examples=300, deadline=None)
@given(plain=counts, w5=counts, w1=counts, read=counts, max_tokens=st.integers(0, 200_000),
       used=st.floats(0, 1), speed=st.sampled_from(["standard", "fast"]), geo=st.sampled_from([None, "us"]))
def test_estimate_is_a_worst_case(opus: ModelEntry, plain: int, w5: int, w1: int, read: int, max_tokens: int,
                                  used: float, speed: str, geo: str | None) -> None:
    # Whatever the cache did with the prompt and however much of max_tokens was used, the
    # request never costs more than the estimate made with caching on at the 1h TTL...
    total = plain + w5 + w1 + read
    out = int(max_tokens * used)
    usage = {"input_tokens": plain, "output_tokens": out, "cache_read_input_tokens": read,
             "cache_creation_input_tokens": w5 + w1,
             "cache_creation": {"ephemeral_5m_input_tokens": w5, "ephemeral_1h_input_tokens": w1},
             "speed": speed, "inference_geo": geo}
    worst = estimate(opus, speed=speed, input_tokens=total, max_tokens=max_tokens,  # type: ignore[arg-type]
                     cache_control=True, cache_ttl="1h", inference_geo=geo)
    assert actual(opus, usage) <= worst
    # ...and, with no cache writes, never more than the estimate made with caching off.
    usage.update(cache_creation_input_tokens=0, cache_creation=None, input_tokens=plain + w5 + w1)
    assert actual(opus, usage) <= estimate(opus, speed=speed, input_tokens=total,  # type: ignore[arg-type]
                                           max_tokens=max_tokens, inference_geo=geo)


@given(st.lists(st.integers(0, 10**12), max_size=50))
def test_sums_of_costs_are_exact(values: list[int]) -> None:
    assert to_usd(sum(values)) == sum((to_usd(v) for v in values), Decimal(0))


@settings(max_examples=300, deadline=None)
@given(plain=counts, out=counts, creation=st.one_of(st.none(), counts), read=st.one_of(st.none(), counts),
       speed=st.sampled_from([None, "standard", "fast"]), geo=st.sampled_from([None, "global", "us"]),
       absent=st.sets(st.sampled_from(["cache_creation_input_tokens", "cache_read_input_tokens", "speed", "inference_geo"])))
def test_plain_dict_usage_parses_like_any_other_shape(plain: int, out: int, creation: int | None, read: int | None,
                                                      speed: str | None, geo: str | None, absent: set[str]) -> None:
    # parse_usage reads plain dicts on a shortcut; an attribute object takes the general path.
    usage = {"input_tokens": plain, "output_tokens": out, "cache_creation_input_tokens": creation,
             "cache_read_input_tokens": read, "speed": speed, "inference_geo": geo}
    for key in absent:
        del usage[key]
    as_object = SimpleNamespace(**usage)
    parsed = parse_usage(usage)
    assert parsed == parse_usage(as_object)
    assert parse_usage(parsed) is parsed  # parsed counts pass through (the replay settles them)


@settings(max_examples=200, deadline=None)
@given(plain=counts, w5=counts, read=counts, out=counts, geo=st.sampled_from([None, "us"]))
def test_cost_of_counts_at_another_speed_prices_the_same_usage_there(opus: ModelEntry, plain: int, w5: int, read: int,
                                                                   out: int, geo: str | None) -> None:
    fast = {"input_tokens": plain, "output_tokens": out, "cache_creation_input_tokens": w5,
            "cache_read_input_tokens": read, "speed": "fast", "inference_geo": geo}
    as_standard = cost_of_counts(opus, parse_usage(fast), speed="standard")
    assert as_standard == actual(opus, {**fast, "speed": "standard"})
    assert as_standard < actual(opus, fast) or plain + w5 + read + out == 0
