"""The catalog's data model (pydantic v2). Field descriptions become the JSON Schema."""

from __future__ import annotations

from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from policy_engine.errors import PricingError, did_you_mean

from ._rates import SPEEDS, RateCard, Speed, pico_per_token, tier_card

SourceKind = Literal["primary", "secondary", "unverified", "assumption"]
PlatformId = Literal["claude_api", "claude_platform_aws", "bedrock", "vertex", "foundry"]
"""Where requests go: the Claude API itself (the SDK's `Anthropic`), Claude Platform on AWS
(`AnthropicAWS`), or a cloud that resells it (`AnthropicBedrock`, `AnthropicVertex`,
`AnthropicFoundry`)."""
PLATFORMS: tuple[PlatformId, ...] = ("claude_api", "claude_platform_aws", "bedrock", "vertex", "foundry")
AfterRetirement = Literal["error", "standard"]
FAST_MODE_BETA = "fast-mode-2026-02-01"
"""The beta header fast mode needed at launch; catalog v1 files imply it for every fast model."""

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
    conflicts: list[str] = Field(
        default_factory=list,
        description=(
            "Where sources disagree: each other figure and its source. The block holds the higher "
            "figure, so that a budget never under-counts."
        ),
    )


class _Claimed(_Strict):
    """Provenance of a claim that is not a price (fast availability, a platform's facts): optional."""

    as_of: date | None = Field(default=None, description="Date the facts were known current.")
    source: str | None = Field(default=None, description="Where the facts come from.")
    source_kind: SourceKind | None = Field(default=None, description="How much to trust `source` (as for prices).")

    def _price_needs_source(self, price: Decimal | None, default: Decimal | None) -> None:
        if price is not None and price != default and not self.source:
            raise ValueError("a `price_multiplier` is a price: give its `source` and `as_of`")


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


class FastMode(_Claimed):
    """Whether and how a model supports `speed: "fast"`, and over which dates."""

    supported: bool = Field(description='Whether the model accepts `speed: "fast"` (on some dates at least).')
    beta_header: str | None = Field(
        default=None,
        description=(
            "Value to send in `anthropic-beta` with fast requests, e.g. fast-mode-2026-02-01; null: fast mode "
            "is generally available and needs no beta header (catalog v1 files imply fast-mode-2026-02-01)."
        ),
    )
    available_from: date | None = Field(
        default=None, description="First UTC day fast mode works on this model; null: since before the catalog knew it."
    )
    retired_on: date | None = Field(
        default=None, description="First UTC day fast mode no longer works on this model; null: no retirement known."
    )
    after_retirement: AfterRetirement | None = Field(
        default=None,
        description=(
            "What a fast request does from `retired_on`: `error` (the API refuses it) or `standard` (served and "
            "billed at standard speed). Required with `retired_on`."
        ),
    )
    retirement_source: str | None = Field(
        default=None, description="Where the retirement date and behaviour come from (default: `source`)."
    )
    fast_with_batch: bool = Field(default=False, description="Whether fast mode is available with the Batch API.")
    fast_with_priority_tier: bool = Field(
        default=False, description="Whether fast mode is available with Priority Tier."
    )
    pricing: FastPricing | None = Field(default=None, description="Fast-mode prices; null means unknown.")
    unverified: str | None = Field(
        default=None, description="Unverified reports about fast pricing, for humans only; never used as a price."
    )
    quota: str | None = Field(default=None, description="How fast requests are rate-limited here, for humans.")

    @model_validator(mode="after")
    def _window_ordered(self) -> FastMode:
        if self.retired_on is not None:
            if self.after_retirement is None:
                raise ValueError(
                    "a retirement needs its behaviour: add `after_retirement: error` (the API refuses fast requests) "
                    "or `after_retirement: standard` (they are served and billed at standard)"
                )
            if self.available_from is not None and self.retired_on <= self.available_from:
                raise ValueError(
                    f"the fast-mode window ends ({self.retired_on}) before it starts ({self.available_from}): "
                    "`retired_on` must be after `available_from`"
                )
        elif self.after_retirement is not None:
            raise ValueError("`after_retirement` needs `retired_on`, the first day fast mode no longer works")
        return self

    def window(self) -> tuple[float, float]:
        """(first, last+1) POSIX seconds of fast availability: -inf/inf where no date is known."""
        return (_epoch(self.available_from, float("-inf")), _epoch(self.retired_on, float("inf")))

    def status(self, at: float) -> tuple[str, str]:
        """(state, why) at POSIX time `at`: `available`, `unsupported`, `not_yet`, `retired_error` or
        `retired_standard`, with a sentence naming the date and the source for all but `available`."""
        if not self.supported:
            return "unsupported", "does not support fast mode"
        start, end = self.window()
        if at < start:
            return "not_yet", f"fast mode is available from {self.available_from} ({self.source or 'catalog'})"
        if at >= end:
            source = self.retirement_source or self.source or "catalog"
            if self.after_retirement == "standard":
                return "retired_standard", (f"fast mode was retired on {self.retired_on}: fast requests are served and "
                                            f"billed at standard, so the premium buys nothing ({source})")
            return "retired_error", f"fast mode was retired on {self.retired_on}: fast requests return an error ({source})"
        return "available", ""


def _epoch(day: date | None, default: float) -> float:
    if day is None:
        return default
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp()


def _scaled(tier: dict[str, Any], m: Decimal) -> dict[str, Any]:
    return {**tier, "input": tier["input"] * m, "output": tier["output"] * m}


class PlatformEntry(_Claimed):
    """One platform requests can go through, and how fast mode is asked for there."""

    display_name: str = Field(description="Human name, e.g. Amazon Bedrock.")
    fast_request: Literal["speed", "model_id"] = Field(
        default="speed",
        description='How a request asks for fast mode: `speed` (`speed: "fast"` in the body) or `model_id` (a '
                    "separate fast model id, sent without `speed`: Microsoft Foundry).",
    )
    beta_header_name: str = Field(default="anthropic-beta", description="Header that carries beta names.")
    rate_limit_headers: str | None = Field(
        default=None, description="Prefix of the fast rate-limit response headers, e.g. `anthropic-fast-`; null: none known."
    )
    data_residency: bool = Field(
        default=False, description="Whether `inference_geo` (and its multipliers) applies on this platform."
    )
    price_multiplier: Multiplier = Field(
        default=Decimal(1), description="Factor on every catalog rate for requests through this platform."
    )
    all_models: bool = Field(
        default=False,
        description="Every catalog model is offered here under its Claude API id and blocks (a model's own "
                    "`platforms.<id>` entry still overrides); false: only the models that list this platform.",
    )
    fast_mode: bool = Field(
        default=True, description="Whether fast mode exists on this platform at all; false overrides every model."
    )
    quota: str | None = Field(default=None, description="How fast requests are rate-limited here, for humans.")
    notes: str | None = Field(default=None, description="Free text for humans.")

    @model_validator(mode="after")
    def _priced_with_source(self) -> PlatformEntry:
        self._price_needs_source(self.price_multiplier, Decimal(1))
        return self


class ModelPlatform(_Claimed):
    """How one model is offered on one platform (other than the Claude API, which the model's own
    blocks describe). Absent blocks inherit the model's."""

    model_id: str = Field(min_length=1, description="The model's id on this platform.")
    aliases: list[str] = Field(default_factory=list, description="Other ids of the model on this platform.")
    fast: FastMode | None = Field(
        default=None, description="Fast mode on this platform; absent: as on the Claude API. Use `{supported: false}` for none."
    )
    fast_model_id: str | None = Field(
        default=None, description="Id of the separate fast variant (platforms whose `fast_request` is `model_id`)."
    )
    price_multiplier: Multiplier | None = Field(
        default=None, description="Factor on every rate of this model here; absent: the platform's."
    )
    throughput: Throughput | None = Field(
        default=None, description="Speed figures on this platform (e.g. measured by `policy-engine calibrate`); "
                                  "absent: the model's."
    )

    @model_validator(mode="after")
    def _priced_with_source(self) -> ModelPlatform:
        self._price_needs_source(self.price_multiplier, None)
        return self


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
    samples: int | None = Field(default=None, ge=0, description="Requests the measured figures were fitted from "
                                                              "(`policy-engine calibrate`).")
    observed_from: datetime | None = Field(default=None, description="First request of the measurement (UTC).")
    observed_to: datetime | None = Field(default=None, description="Last request of the measurement (UTC).")


ModelPlatform.model_rebuild()


class ModelEntry(_Strict):
    """One model of one provider: limits, prices, multipliers and throughput defaults."""

    display_name: str | None = Field(default=None, description="Human name, e.g. Claude Opus 4.6.")
    family: str | None = Field(default=None, description="Model family, e.g. opus, sonnet, haiku, fable, mythos.")
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
    platforms: dict[PlatformId, ModelPlatform] = Field(
        default_factory=dict,
        description="The model on other platforms than the Claude API (which the blocks above describe), by platform id.",
    )

    _id: str = PrivateAttr(default="?")
    _provider: str = PrivateAttr(default="?")
    _platform: str = PrivateAttr(default="claude_api")
    _wire_id: str | None = PrivateAttr(default=None)
    _fast_model_id: str | None = PrivateAttr(default=None)
    _cards: dict[tuple[str, str | None], tuple[tuple[int, RateCard], ...]] = PrivateAttr(default_factory=dict)
    _unavailable: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def id(self) -> str:
        """The model id (its key in the catalog)."""
        return self.__pydantic_private__["_id"]  # as in rates(): the private __getattr__ costs ~3 us a read

    @property
    def provider(self) -> str:
        return self._provider

    @property
    def platform(self) -> str:
        """The platform this entry prices (`claude_api` for the model's own blocks)."""
        return self.__pydantic_private__["_platform"]

    @property
    def wire_id(self) -> str:
        """The model's id on its platform (the catalog id on the Claude API)."""
        return self.__pydantic_private__["_wire_id"] or self.__pydantic_private__["_id"]

    @property
    def fast_model_id(self) -> str | None:
        """The separate fast variant's id, where the platform asks for fast mode by model id."""
        return self.__pydantic_private__["_fast_model_id"]

    def on_platform(self, platform: PlatformEntry, platform_id: str) -> ModelEntry | None:
        """This model as offered on `platform`: its blocks with the platform's fast mode and prices.

        None when the model lists no entry for that platform (it is not offered there)."""
        offer = self.platforms.get(platform_id)  # type: ignore[call-overload]
        if offer is None:
            if not platform.all_models:
                return None
            offer = ModelPlatform(model_id=self._id)
        data = self.model_dump(exclude={"platforms"}, exclude_none=False)
        if not platform.fast_mode:
            data["fast"] = {"supported": False, "as_of": platform.as_of, "source": platform.source,
                            "source_kind": platform.source_kind}
        elif offer.fast is not None:
            data["fast"] = offer.fast.model_dump()
        m = offer.price_multiplier if offer.price_multiplier is not None else platform.price_multiplier
        if m != 1:
            if data["standard"] is not None:
                data["standard"]["tiers"] = [_scaled(t, m) for t in data["standard"]["tiers"]]
            pricing = data["fast"].get("pricing")
            if pricing is not None and pricing.get("tiers") is not None:
                pricing["tiers"] = [_scaled(t, m) for t in pricing["tiers"]]
        if not platform.data_residency:
            data["data_residency"] = None
        data["aliases"] = [*offer.aliases, *([offer.fast_model_id] if offer.fast_model_id else [])]
        if offer.throughput is not None:
            data["throughput"] = offer.throughput.model_dump()
        variant = ModelEntry.model_validate(data)
        variant._id, variant._provider, variant._platform = self._id, self._provider, platform_id
        variant._wire_id, variant._fast_model_id = offer.model_id, offer.fast_model_id
        return variant

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
    """Platforms, providers, their models and prices. Load with `load_catalog()`."""

    version: Literal[1, 2] = Field(default=2, description="Catalog format version (1 still loads).")
    currency: Literal["USD"] = Field(default="USD", description="Currency of every price.")
    platforms: dict[PlatformId, PlatformEntry] = Field(
        default_factory=dict, description="How each platform asks for fast mode, and its price multiplier."
    )
    providers: dict[str, ProviderEntry] = Field(default_factory=dict, description="Providers by id, e.g. anthropic.")

    _offers: dict[tuple[str, str], dict[str, ModelEntry]] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _v1_betas(cls, data: Any) -> Any:
        """Catalog v1 had no generally available fast mode: every fast model implied the launch beta.
        (The caller's data is not modified: the mappings on the way to each fast block are copied.)"""
        if not isinstance(data, dict) or data.get("version", 2) != 1 or not isinstance(data.get("providers"), dict):
            return data

        def with_beta(model: Any) -> Any:
            fast = model.get("fast") if isinstance(model, dict) else None
            if isinstance(fast, dict) and fast.get("supported") and "beta_header" not in fast:
                return {**model, "fast": {**fast, "beta_header": FAST_MODE_BETA}}
            return model

        providers = {}
        for name, provider in data["providers"].items():
            if isinstance(provider, dict) and isinstance(provider.get("models"), dict):
                provider = {**provider, "models": {k: with_beta(m) for k, m in provider["models"].items()}}
            providers[name] = provider
        return {**data, "providers": providers}

    @model_validator(mode="after")
    def _name_models(self) -> Catalog:
        for provider_id, provider in self.providers.items():
            for model_id, entry in provider.models.items():
                entry._id = model_id
                entry._provider = provider_id
            self._offers[(provider_id, "claude_api")] = provider.__pydantic_private__["_index"]
            for platform_id in PLATFORMS[1:]:
                self._offers[(provider_id, platform_id)] = self._platform_index(provider, platform_id)
        return self

    def _platform_index(self, provider: ProviderEntry, platform_id: str) -> dict[str, ModelEntry]:
        platform = self.platforms.get(platform_id) or PlatformEntry(display_name=platform_id)  # type: ignore[call-overload]
        index: dict[str, ModelEntry] = {}
        for entry in provider.models.values():
            variant = entry.on_platform(platform, platform_id)
            if variant is None:
                continue
            for name in (entry._id, variant.wire_id, *variant.aliases):
                index.setdefault(name, variant)
        return index

    def platform(self, platform_id: str) -> PlatformEntry:
        """What the catalog says of a platform (a bare default entry when it says nothing)."""
        found = self.platforms.get(platform_id)  # type: ignore[call-overload]
        if found is None and platform_id not in PLATFORMS:
            raise PricingError(_unknown_platform(platform_id))
        return found or PlatformEntry(display_name=platform_id)

    def find(self, name: str, provider: str = "anthropic", platform: str = "claude_api") -> ModelEntry | None:
        """The model called `name` (id, alias or platform id) at `provider` on `platform`, or None."""
        index = self.__pydantic_private__["_offers"].get((provider, platform))
        return None if index is None else index.get(name)

    def model(self, name: str, provider: str = "anthropic", platform: str = "claude_api") -> ModelEntry:
        """The model called `name` at `provider` on `platform`; PricingError with a hint if unknown."""
        p = self.providers.get(provider)
        if p is None:
            hint = did_you_mean(provider, list(self.providers))
            raise PricingError(
                f"unknown provider {provider!r} in the catalog" + (f"; {hint}" if hint else "")
                + f" (known: {', '.join(sorted(self.providers)) or 'none'})"
            )
        if platform not in PLATFORMS:
            raise PricingError(_unknown_platform(platform))
        entry = self.find(name, provider, platform)
        if entry is None:
            index = self.__pydantic_private__["_offers"][(provider, platform)]
            hint = did_you_mean(name, list(index))
            where = "" if platform == "claude_api" else f" on platform {platform!r}"
            raise PricingError(
                f"unknown model {name!r} for provider {provider!r}{where}" + (f"; {hint}" if hint else "")
                + " (add it to your catalog file to price it)"
            )
        return entry


def _unknown_platform(platform_id: str) -> str:
    hint = did_you_mean(platform_id, list(PLATFORMS))
    return f"unknown platform {platform_id!r}" + (f"; {hint}" if hint else "") + f" (known: {', '.join(PLATFORMS)})"
