"""The model and price catalog, and exact request costs.

    from policy_engine.catalog import load_catalog, estimate, actual, format_usd

    catalog = load_catalog()                      # packaged catalog.yaml
    opus = catalog.model("claude-opus-4-6")
    worst = estimate(opus, speed="fast", input_tokens=250_000, max_tokens=10_000)
    format_usd(worst)                             # "$17.25"

Money is exact: prices are Decimals in the YAML, turned at load into integer pico-dollars
per token (`RateCard`); a request's cost is an integer number of pico-dollars rounded up
once to the micro-dollar; sums of costs are exact integer sums.
"""

from __future__ import annotations

from ._cost import (
    ITERATION_KINDS,
    MICRO_PER_USD,
    IterationCounts,
    UsageCounts,
    UsageError,
    actual,
    cost_of_counts,
    cost_with_rates,
    estimate,
    estimate_with_rates,
    fallback_credit_status,
    format_usd,
    parse_iterations,
    parse_usage,
    to_usd,
)
from ._load import DEFAULT_CATALOG_PATH, load_catalog
from ._models import (
    FAST_MODE_BETA,
    PLATFORMS,
    AfterRetirement,
    BatchPricing,
    CacheMultipliers,
    Catalog,
    DataResidency,
    FastMode,
    FastPricing,
    ModelEntry,
    ModelPlatform,
    PlatformEntry,
    PlatformId,
    PriceTier,
    ProviderEntry,
    SourceKind,
    StandardPricing,
    Throughput,
)
from ._rates import PICO_PER_MICRO, PICO_PER_USD_PER_MTOK, SPEEDS, RateCard, Speed

__all__ = [
    "DEFAULT_CATALOG_PATH",
    "ITERATION_KINDS",
    "IterationCounts",
    "FAST_MODE_BETA",
    "PLATFORMS",
    "AfterRetirement",
    "ModelPlatform",
    "PlatformEntry",
    "PlatformId",
    "MICRO_PER_USD",
    "PICO_PER_MICRO",
    "PICO_PER_USD_PER_MTOK",
    "SPEEDS",
    "BatchPricing",
    "CacheMultipliers",
    "Catalog",
    "DataResidency",
    "FastMode",
    "FastPricing",
    "ModelEntry",
    "PriceTier",
    "ProviderEntry",
    "RateCard",
    "SourceKind",
    "Speed",
    "StandardPricing",
    "Throughput",
    "UsageCounts",
    "UsageError",
    "actual",
    "cost_of_counts",
    "cost_with_rates",
    "estimate",
    "estimate_with_rates",
    "fallback_credit_status",
    "format_usd",
    "load_catalog",
    "parse_iterations",
    "parse_usage",
    "to_usd",
]
