"""Exact request costs in integer micro-dollars.

Rounding, once and only once: a request's cost is summed exactly in pico-dollars
(1e-12 USD, integer rates x integer token counts) and then rounded UP to the next
micro-dollar (1e-6 USD). Sums of request costs (budgets, reports) are exact integer
sums of those micro-dollar amounts; nothing is ever converted to float.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Final, Literal, NamedTuple, SupportsIndex

from ._models import ModelEntry
from ._rates import PICO_PER_MICRO, SPEEDS, RateCard, Speed, tier_card

MICRO_PER_USD: Final = 1_000_000


class UsageError(ValueError):
    """A usage object (or a token count given to `estimate`) is malformed."""


class UsageCounts(NamedTuple):
    """A response's usage, normalised. Every count is a non-negative int."""

    input_tokens: int
    output_tokens: int
    cache_write_5m_tokens: int
    cache_write_1h_tokens: int
    cache_read_tokens: int
    speed: Speed
    inference_geo: str | None

    @property
    def total_input_tokens(self) -> int:
        """input + cache writes + cache reads: what the >200K tier threshold counts."""
        return self.input_tokens + self.cache_write_5m_tokens + self.cache_write_1h_tokens + self.cache_read_tokens


def _ceil_micro(pico: int) -> int:
    return -(-pico // PICO_PER_MICRO)


def _count(name: str, value: Any) -> int:
    if type(value) is not int:  # bool is not a token count, nor are floats or strings
        raise UsageError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise UsageError(f"{name} must be >= 0, got {value}")
    return value


def estimate(
    model: ModelEntry,
    *,
    speed: Speed,
    input_tokens: SupportsIndex,
    max_tokens: SupportsIndex,
    cache_control: bool = False,
    cache_ttl: Literal["5m", "1h"] = "5m",
    inference_geo: str | None = None,
) -> int:
    """Worst-case cost of a request, in integer micro-dollars, before it is sent.

    `input_tokens` (the whole prompt, counted or estimated) are priced at the input rate or,
    when `cache_control` is set, at the cache-write rate of `cache_ttl` ("5m" or "1h"),
    since a cache write costs more than plain input and a read less. `max_tokens` are priced
    at the output rate. The tier is picked by `input_tokens`. Rounded up to the micro-dollar.

    Raises PricingError (unknown price, unsupported fast, unknown geo) and UsageError
    (negative or non-int counts, bad ttl).
    """
    # Counts are typed SupportsIndex, not int: compiled code would refuse a float with a TypeError
    # that names no parameter; the caller gets a UsageError naming it instead.
    input_tokens, max_tokens = _count("input_tokens", input_tokens), _count("max_tokens", max_tokens)
    if cache_control and cache_ttl != "5m" and cache_ttl != "1h":
        raise UsageError(f"cache_ttl must be '5m' or '1h', got {cache_ttl!r}")
    return estimate_with_rates(model.rate_table(speed, inference_geo), input_tokens, max_tokens, cache_control, cache_ttl)


def estimate_with_rates(rates: tuple[tuple[int, RateCard], ...], input_tokens: int, max_tokens: int,
                        cache_control: bool = False, cache_ttl: str = "5m") -> int:
    """`estimate()` on cards already looked up (`ModelEntry.rate_table`), for callers that price
    many requests of one model, speed and geo; the counts are not checked again."""
    card = tier_card(rates, input_tokens)
    if cache_control:
        rate = card.cache_write_1h if cache_ttl == "1h" else card.cache_write_5m
    else:
        rate = card.input
    return -(-(input_tokens * rate + max_tokens * card.output) // PICO_PER_MICRO)


def _getter(obj: Any) -> Any:
    """`name -> value or None` for a mapping or an object with attributes."""
    if type(obj) is dict or isinstance(obj, Mapping):
        return obj.get
    return lambda name: getattr(obj, name, None)


def parse_usage(usage: Mapping[str, Any] | object) -> UsageCounts:
    """Normalise a Messages API `usage` (a dict, or the anthropic SDK's Usage object).

    Reads input_tokens and output_tokens (required), cache_creation_input_tokens,
    cache_read_input_tokens (None or absent = 0), the TTL split
    `cache_creation.{ephemeral_5m_input_tokens, ephemeral_1h_input_tokens}` when present,
    `speed` (absent = "standard") and `inference_geo`.

    Cache writes without a split are billed at the 5-minute rate. If the split adds up to
    less than cache_creation_input_tokens, the difference is billed at the 5-minute rate
    too, so a cost is never under-counted.

    A `UsageCounts` (what this returns) is returned as it is.
    """
    if type(usage) is UsageCounts:
        return usage
    # Built with tuple.__new__, not UsageCounts(...): the NamedTuple's own __new__ is a Python
    # frame, which compiled code would pay on every response.
    if type(usage) is dict:
        # The common shape (a plain dict of ints, no TTL split) in one pass of type checks;
        # anything else, including every malformed usage, takes the general path below.
        get = usage.get
        input_tokens, output_tokens = get("input_tokens"), get("output_tokens")
        creation, read = get("cache_creation_input_tokens", 0), get("cache_read_input_tokens", 0)
        speed, geo = get("speed", "standard"), get("inference_geo")
        if (type(input_tokens) is int and type(output_tokens) is int and type(creation) is int and type(read) is int
                and input_tokens >= 0 and output_tokens >= 0 and creation >= 0 and read >= 0
                and (speed == "standard" or speed == "fast") and type(speed) is str
                and (geo is None or type(geo) is str) and get("cache_creation") is None):
            return tuple.__new__(UsageCounts, (input_tokens, output_tokens, creation, 0, read, speed, geo))
    elif usage is None:
        raise UsageError("usage is missing")
    get = _getter(usage)
    input_tokens = _count("usage.input_tokens", get("input_tokens"))
    output_tokens = _count("usage.output_tokens", get("output_tokens"))
    raw = get("cache_creation_input_tokens")
    creation = 0 if raw is None else _count("usage.cache_creation_input_tokens", raw)
    raw = get("cache_read_input_tokens")
    read = 0 if raw is None else _count("usage.cache_read_input_tokens", raw)
    split = get("cache_creation")
    if split is None:
        write_5m, write_1h = creation, 0
    else:
        sget = _getter(split)
        raw = sget("ephemeral_5m_input_tokens")
        write_5m = 0 if raw is None else _count("usage.cache_creation.ephemeral_5m_input_tokens", raw)
        raw = sget("ephemeral_1h_input_tokens")
        write_1h = 0 if raw is None else _count("usage.cache_creation.ephemeral_1h_input_tokens", raw)
        write_5m += max(0, creation - write_5m - write_1h)
    speed = get("speed")
    if speed is None:
        speed = "standard"
    elif speed not in SPEEDS:
        raise UsageError(f"usage.speed must be 'standard' or 'fast', got {speed!r}")
    geo = get("inference_geo")
    if geo is not None and not isinstance(geo, str):
        raise UsageError(f"usage.inference_geo must be a string, got {type(geo).__name__} {geo!r}")
    return tuple.__new__(UsageCounts, (input_tokens, output_tokens, write_5m, write_1h, read, speed, geo))


ITERATION_KINDS: Final = frozenset(("message", "compaction", "advisor_message", "fallback_message"))
"""The `usage.iterations` entry types the engine prices (the SDK's `BetaIterationsUsageItem`)."""


class IterationCounts(NamedTuple):
    """One `usage.iterations` entry: a billed sampling step, normalised."""

    kind: str
    """`message`, `compaction`, `advisor_message` or `fallback_message`."""
    model: str | None
    """The entry's own model (advisor and fallback entries always carry one); None: the request's model."""
    counts: UsageCounts
    """Its tokens; `speed` is "standard" (entries report none) and `inference_geo` None (the response's holds)."""


def parse_iterations(usage: Mapping[str, Any] | object) -> tuple[IterationCounts, ...] | None:
    """The `usage.iterations` of a response (a dict, or the SDK's BetaUsage), or None when it has none.

    Each entry is one billed sampling step with its own token counts. Its tokens are not
    necessarily in the top-level usage (a compaction entry's never are), so a response with
    iterations is priced from them alone. Raises `UsageError` for a malformed entry or an
    unknown entry type (an unknown step cannot be priced, so it is not silently dropped).
    """
    raw = usage.get("iterations") if type(usage) is dict else _getter(usage)("iterations")
    if raw is None:
        return None
    if not isinstance(raw, (list, tuple)):
        raise UsageError(f"usage.iterations must be a list, got {type(raw).__name__}")
    if not raw:
        return None
    out = []
    for index, entry in enumerate(raw):
        get = _getter(entry)
        kind = get("type")
        if kind not in ITERATION_KINDS:
            raise UsageError(f"usage.iterations[{index}].type: unknown iteration type {kind!r}")
        model = get("model")
        if model is not None and not isinstance(model, str):
            raise UsageError(f"usage.iterations[{index}].model must be a string, got {type(model).__name__}")
        if kind in ("advisor_message", "fallback_message") and not model:
            raise UsageError(f"usage.iterations[{index}]: a {kind} entry needs its model")
        try:
            counts = parse_usage(entry if type(entry) is dict else _entry_dict(get))
        except UsageError as exc:
            raise UsageError(f"usage.iterations[{index}]: {exc}") from None
        if counts[5] != "standard" or counts[6] is not None:
            # Entries report no speed and no geo: the response's top level does, for all of them.
            counts = tuple.__new__(UsageCounts, (*counts[:5], "standard", None))
        out.append(tuple.__new__(IterationCounts, (kind, model or None, counts)))
    return tuple(out)


def _entry_dict(get: Any) -> dict[str, Any]:
    split = get("cache_creation")
    if split is not None and not isinstance(split, Mapping):
        sget = _getter(split)
        split = {"ephemeral_5m_input_tokens": sget("ephemeral_5m_input_tokens"),
                 "ephemeral_1h_input_tokens": sget("ephemeral_1h_input_tokens")}
    return {"input_tokens": get("input_tokens"), "output_tokens": get("output_tokens"),
            "cache_creation_input_tokens": get("cache_creation_input_tokens"),
            "cache_read_input_tokens": get("cache_read_input_tokens"), "cache_creation": split}


def fallback_credit_status(usage: Mapping[str, Any] | object) -> str | None:
    """`usage.fallback_credit.status.type` (`redeemed`, `not_applied`), or None when the request carried no token.

    A redeemed credit needs no pricing of its own: the API bills it as fewer cache writes and
    as many more cache reads, which the usage's counts already show."""
    credit = usage.get("fallback_credit") if type(usage) is dict else _getter(usage)("fallback_credit")
    if credit is None:
        return None
    status = _getter(credit)("status")
    kind = _getter(status)("type") if status is not None else None
    return kind if isinstance(kind, str) else "unknown"


def actual(model: ModelEntry, usage: Mapping[str, Any] | object, *, inference_geo: str | None = None) -> int:
    """What a completed request cost, in integer micro-dollars (rounded up once).

    Billed at `usage.speed` (the speed the request actually ran at; "standard" when absent)
    and at `usage.inference_geo` when present, which overrides the `inference_geo` argument.
    The price tier is picked by total input tokens (input + cache writes + cache reads).
    Server-tool fees and the Batch discount are not included.
    """
    return cost_of_counts(model, parse_usage(usage), inference_geo=inference_geo)


def cost_of_counts(model: ModelEntry, u: UsageCounts, *, inference_geo: str | None = None, speed: Speed | None = None) -> int:
    """`actual()` of a usage already parsed by `parse_usage` (no second validation).

    `speed` prices the same usage at another speed than `u.speed` (what a fast response
    would have cost at standard speed: the fast premium).
    """
    geo = u[6]
    return cost_with_rates(model.rate_table(speed or u[5], inference_geo if geo is None else geo), u)


def cost_with_rates(rates: tuple[tuple[int, RateCard], ...], u: UsageCounts) -> int:
    """`cost_of_counts()` on the cards of the speed and geo to bill at, already looked up
    (`ModelEntry.rate_table`). The tier is picked by total input tokens."""
    inp, out, write_5m, write_1h, read, _, _ = u
    card = tier_card(rates, inp + write_5m + write_1h + read)
    pico = inp * card.input + write_5m * card.cache_write_5m + write_1h * card.cache_write_1h + read * card.cache_read + out * card.output
    return -(-pico // PICO_PER_MICRO)


def to_usd(micro: int) -> Decimal:
    """Integer micro-dollars as an exact Decimal number of dollars (17_250_000 -> 17.250000)."""
    if type(micro) is not int:
        raise TypeError(f"micro-dollars must be an int, got {type(micro).__name__}")
    return Decimal(f"{micro}e-6")


def format_usd(micro: int) -> str:
    """Display form: at least 2 decimals, up to 6 when needed: "$17.25", "$0.000001", "-$3.30"."""
    if type(micro) is not int:
        raise TypeError(f"micro-dollars must be an int, got {type(micro).__name__}")
    sign = "-" if micro < 0 else ""
    dollars, frac = divmod(abs(micro), MICRO_PER_USD)
    decimals = f"{frac:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}${dollars}.{decimals}"
