"""The catalog's data model (pydantic v2). Field descriptions become the JSON Schema."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from policy_engine.errors import PricingError, did_you_mean

from ._rates import SPEEDS, RateCard, Speed, pico_per_token, tier_card

SourceKind = Literal["primary", "secondary", "unverified", "assumption"]

Price = Annotated[
    Decimal,
    Field(ge=0, allow_inf_nan=False, description="US dollars per million tokens ($/MTok), exact decimal."),
]
Multiplier = Annotated[
    Decimal,
    Field(gt=0, allow_inf_nan=False, description="A factor applied to a $/MTok rate, exact decimal."),
]
TokenCount = Annotated[int, Field(strict=True, ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Sourced(_Strict):
    """Provenance every price block carries."""

    as_of: date = Field(description="Date the figures were known to be current (YYYY-MM-DD).")
    source: str = Field(min_length=1, description="Where the figures come from: a page, a document, a contract.")
    source_kind: SourceKind | None = Field(
        default=None,
        description=(
            "How much to trust `source`: primary (the provider's own page), secondary (a public page "
            "found later), unverified (third-party report), assumption (a default of ours)."
        ),
    )


class PriceTier(_Strict):
    """Rates that apply when a request's total input tokens exceed `above_input_tokens`."""

    above_input_tokens: TokenCount = Field(
        description=(
            "The tier applies when total input tokens (input + cache writes + cache reads) are strictly "
            "greater than this. The first tier of a list must be 0."
        )
    )
    input: Price = Field(description="Input tokens, $/MTok.")
    output: Price = Field(description="Output tokens, $/MTok.")


def _check_tiers(tiers: list[PriceTier]) -> None:
    if tiers[0].above_input_tokens != 0:
        raise ValueError("the first tier must have above_input_tokens: 0")
    for before, after in zip(tiers, tiers[1:]):
        if after.above_input_tokens <= before.above_input_tokens:
            raise ValueError("tiers must be listed by strictly increasing above_input_tokens")


class StandardPricing(_Sourced):
    """Standard-speed rates of a model, by input-size tier."""

    tiers: list[PriceTier] = Field(min_length=1, description="Price tiers, by increasing above_input_tokens.")

    @model_validator(mode="after")
    def _tiers_ordered(self) -> StandardPricing:
        _check_tiers(self.tiers)
        return self


class FastPricing(_Sourced):
    """Fast-mode rates: either a multiplier on the standard tiers or explicit tiers (exactly one)."""

    multiplier: Multiplier | None = Field(
        default=None, description="Fast rate = standard rate x multiplier, for every standard tier."
    )
    tiers: list[PriceTier] | None = Field(
        default=None, min_length=1, description="Explicit fast-mode tiers; replaces the multiplier."
    )

    @model_validator(mode="after")
    def _one_of(self) -> FastPricing:
        if (self.multiplier is None) == (self.tiers is None):
            raise ValueError("fast pricing needs exactly one of `multiplier` or `tiers`")
        if self.tiers is not None:
            _check_tiers(self.tiers)
        return self


class FastMode(_Strict):
    """Whether and how a model supports `speed: "fast"`."""

    supported: bool = Field(description='Whether the model accepts `speed: "fast"`.')
    beta_header: str | None = Field(
        default=None, description="Value to send in `anthropic-beta` with fast requests, e.g. fast-mode-2026-02-01."
    )
    fast_with_batch: bool = Field(default=False, description="Whether fast mode is available with the Batch API.")
    fast_with_priority_tier: bool = Field(
        default=False, description="Whether fast mode is available with Priority Tier."
    )
    pricing: FastPricing | None = Field(default=None, description="Fast-mode prices; null means unknown.")
    unverified: str | None = Field(
        default=None, description="Unverified reports about fast pricing, for humans only; never used as a price."
    )
    as_of: date | None = Field(default=None, description="Date the support claim was known current.")
    source: str | None = Field(default=None, description="Where the support claim comes from.")


class CacheMultipliers(_Sourced):
    """Prompt-caching multipliers on the input rate of the speed and tier in use."""

    write_5m: Multiplier = Field(description="5-minute cache write, x input rate (1.25 on Anthropic).")
    write_1h: Multiplier = Field(description="1-hour cache write, x input rate (2 on Anthropic).")
    read: Multiplier = Field(description="Cache read (hit), x input rate (0.1 on Anthropic).")


class DataResidency(_Sourced):
    """Multipliers by `inference_geo`, applied to every rate (they stack on fast pricing)."""

    multipliers: dict[str, Multiplier] = Field(
        min_length=1, description='By inference_geo value, e.g. {global: 1, us: 1.1}.'
    )


class BatchPricing(_Sourced):
    """Batch API discount (informational: the cost functions price interactive requests)."""

    discount: Decimal = Field(
        ge=0, lt=1, allow_inf_nan=False, description="Fraction taken off standard rates: 0.5 = 50% off."
    )


class Throughput(_Strict):
    """Speed figures used by latency rules. Configurable defaults, not measurements."""

    standard_otps: float | None = Field(default=None, gt=0, description="Output tokens per second, standard speed.")
    fast_otps: float | None = Field(default=None, gt=0, description="Output tokens per second, fast mode.")
    ttft_s: float | None = Field(default=None, ge=0, description="Time to first token, seconds (same for both speeds).")
    assumption: bool = Field(default=True, description="True when the figures are defaults rather than measured.")
    note: str | None = Field(default=None, description="Where the figures come from.")


class ModelEntry(_Strict):
    """One model of one provider: limits, prices, multipliers and throughput defaults."""

    display_name: str | None = Field(default=None, description="Human name, e.g. Claude Opus 4.6.")
    aliases: list[str] = Field(default_factory=list, description="Other names that resolve to this model.")
    context_window: TokenCount | None = Field(default=None, description="Context window in tokens; null = unknown.")
    max_output_tokens: TokenCount | None = Field(default=None, description="Largest max_tokens; null = unknown.")
    standard: StandardPricing | None = Field(description="Standard-speed prices; null = unknown (must be written).")
    fast: FastMode = Field(
        default_factory=lambda: FastMode(supported=False), description="Fast mode; absent = not supported."
    )
    cache: CacheMultipliers | None = Field(default=None, description="Prompt-caching multipliers; null = unknown.")
    data_residency: DataResidency | None = Field(
        default=None, description="inference_geo multipliers; null = unknown."
    )
    batch: BatchPricing | None = Field(default=None, description="Batch API discount; null = unknown.")
    throughput: Throughput | None = Field(default=None, description="Latency defaults (assumptions).")
    notes: str | None = Field(default=None, description="Free text for humans.")

    _id: str = PrivateAttr(default="?")
    _provider: str = PrivateAttr(default="?")
    _cards: dict[tuple[str, str | None], tuple[tuple[int, RateCard], ...]] = PrivateAttr(default_factory=dict)
    _unavailable: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def id(self) -> str:
        """The model id (its key in the catalog)."""
        return self.__pydantic_private__["_id"]  # as in rates(): the private __getattr__ costs ~3 us a read

    @property
    def provider(self) -> str:
        return self._provider

    @model_validator(mode="after")
    def _build_rate_cards(self) -> ModelEntry:
        """Turn every price into integer pico-dollars per token, per speed, tier and geo."""
        geos: dict[str | None, Decimal] = {None: Decimal(1)}
        if self.data_residency is not None:
            geos.update(self.data_residency.multipliers)
        for speed in SPEEDS:
            tiers, why = self._tiers(speed)
            if tiers is None:
                self._unavailable[speed] = why
                continue
            if self.cache is None:
                self._unavailable[speed] = "its prompt-caching multipliers are unknown (`cache: null`)"
                continue
            c = self.cache
            for geo, g in geos.items():
                cards = []
                for t in tiers:
                    where = f"{speed} tier above {t.above_input_tokens} tokens, geo {geo or 'default'}"
                    card = RateCard(
                        input=pico_per_token(t.input, g, what=f"input ({where})"),
                        output=pico_per_token(t.output, g, what=f"output ({where})"),
                        cache_write_5m=pico_per_token(t.input, c.write_5m, g, what=f"cache write 5m ({where})"),
                        cache_write_1h=pico_per_token(t.input, c.write_1h, g, what=f"cache write 1h ({where})"),
                        cache_read=pico_per_token(t.input, c.read, g, what=f"cache read ({where})"),
                        speed=speed,
                        above_input_tokens=t.above_input_tokens,
                        inference_geo=geo,
                    )
                    cards.append((t.above_input_tokens, card))
                self._cards[(speed, geo)] = tuple(reversed(cards))
        return self

    def _tiers(self, speed: Speed) -> tuple[list[PriceTier] | None, str]:
        if speed == "standard":
            if self.standard is None:
                return None, "its standard price is unknown (`standard: null`)"
            return self.standard.tiers, ""
        if not self.fast.supported:
            return None, 'it does not support fast mode (`speed: "fast"`)'
        p = self.fast.pricing
        if p is None:
            return None, "its fast-mode price is unknown (`fast.pricing: null`)"
        if p.tiers is not None:
            return p.tiers, ""
        if self.standard is None:
            return None, "its fast price is a multiplier of the standard price, which is unknown"
        assert p.multiplier is not None
        m = p.multiplier
        return [
            PriceTier(above_input_tokens=t.above_input_tokens, input=t.input * m, output=t.output * m)
            for t in self.standard.tiers
        ], ""

    def rates(self, speed: Speed, input_tokens: int, inference_geo: str | None = None) -> RateCard:
        """The rate card for a request at `speed` whose TOTAL input tokens are `input_tokens`.

        Total input = input_tokens + cache_creation_input_tokens + cache_read_input_tokens:
        the >200K threshold counts every input token, cached or not. A tier applies when the
        total is strictly above its `above_input_tokens` (200_000 exactly is still <=200K).
        `inference_geo` None means no data-residency multiplier.

        Raises PricingError when fast mode is unsupported, a needed price is unknown, or the
        geo has no multiplier. Cards are precomputed: this is one dict lookup and a short scan.
        """
        return tier_card(self.rate_table(speed, inference_geo), input_tokens)

    def rate_table(self, speed: Speed, inference_geo: str | None = None) -> tuple[tuple[int, RateCard], ...]:
        """Every tier's card at `speed` and `inference_geo`, highest `above_input_tokens` first.

        `rates()` is the first card whose threshold the total input is strictly above (the
        last card otherwise). For callers that price many requests of one model and geo.
        Raises PricingError as `rates()` does.
        """
        # __pydantic_private__ directly: pydantic's private-attribute __getattr__ costs ~2.5 us.
        table = self.__pydantic_private__["_cards"].get((speed, inference_geo))
        if table is None:
            raise self._why_not(speed, inference_geo)
        return table

    def _why_not(self, speed: str, geo: str | None) -> PricingError:
        name = f"{self._provider}/{self._id}"
        if speed not in SPEEDS:
            return PricingError(f"{name}: unknown speed {speed!r}; expected 'standard' or 'fast'")
        if speed in self._unavailable:
            return PricingError(f"cannot price {name} at {speed} speed: {self._unavailable[speed]}")
        known = sorted(self.data_residency.multipliers) if self.data_residency else []
        hint = did_you_mean(str(geo), known) if known else None
        return PricingError(
            f"cannot price {name} with inference_geo {geo!r}: no data-residency multiplier for it"
            + (f" (known: {', '.join(known)})" if known else " (`data_residency` is unknown)")
            + (f"; {hint}" if hint else "")
        )


class ProviderEntry(_Strict):
    """One API provider (anthropic now; openai, vercel later) and its models."""

    display_name: str | None = Field(default=None, description="Human name of the provider.")
    models: dict[str, ModelEntry] = Field(default_factory=dict, description="Models by id.")

    _index: dict[str, ModelEntry] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _index_names(self) -> ProviderEntry:
        for model_id, entry in self.models.items():
            self._index[model_id] = entry
        for model_id, entry in self.models.items():
            for alias in entry.aliases:
                if alias in self._index and self._index[alias] is not entry:
                    raise ValueError(f"alias {alias!r} of {model_id!r} is already the name of another model")
                self._index[alias] = entry
        return self

    def names(self) -> list[str]:
        """Every model id and alias."""
        return sorted(self._index)


class Catalog(_Strict):
    """Providers, their models and prices. Load with `load_catalog()`."""

    version: Literal[1] = Field(default=1, description="Catalog format version.")
    currency: Literal["USD"] = Field(default="USD", description="Currency of every price.")
    providers: dict[str, ProviderEntry] = Field(default_factory=dict, description="Providers by id, e.g. anthropic.")

    @model_validator(mode="after")
    def _name_models(self) -> Catalog:
        for provider_id, provider in self.providers.items():
            for model_id, entry in provider.models.items():
                entry._id = model_id
                entry._provider = provider_id
        return self

    def find(self, name: str, provider: str = "anthropic") -> ModelEntry | None:
        """The model called `name` (id or alias) at `provider`, or None."""
        p = self.providers.get(provider)
        return None if p is None else p.__pydantic_private__["_index"].get(name)

    def model(self, name: str, provider: str = "anthropic") -> ModelEntry:
        """The model called `name` (id or alias) at `provider`; PricingError with a hint if unknown."""
        p = self.providers.get(provider)
        if p is None:
            hint = did_you_mean(provider, list(self.providers))
            raise PricingError(
                f"unknown provider {provider!r} in the catalog" + (f"; {hint}" if hint else "")
                + f" (known: {', '.join(sorted(self.providers)) or 'none'})"
            )
        entry = p.__pydantic_private__["_index"].get(name)
        if entry is None:
            hint = did_you_mean(name, list(p._index))
            raise PricingError(
                f"unknown model {name!r} for provider {provider!r}" + (f"; {hint}" if hint else "")
                + " (add it to your catalog file to price it)"
            )
        return entry
