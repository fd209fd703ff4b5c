"""Integer rate cards: prices turned into whole pico-dollars per token, once, at load.

1 $/MTok is 1e-6 dollars per token, i.e. 1_000_000 pico-dollars (1e-12 $) per token.
Every catalog price times every multiplier that can stack on it must land on a whole
number of pico-dollars per token; the catalog refuses to load otherwise, so that
costs are computed afterwards with integer arithmetic only.
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass
from decimal import Decimal
from typing import Final, Literal

Speed = Literal["standard", "fast"]
SPEEDS: Final[tuple[Speed, ...]] = ("standard", "fast")

PICO_PER_USD_PER_MTOK: Final = 1_000_000
"""1 $/MTok = 1_000_000 pico-dollars per token."""

PICO_PER_MICRO: Final = 1_000_000
"""1 micro-dollar = 1_000_000 pico-dollars."""

_EXACT: Final = decimal.Context(prec=80, traps=[decimal.Inexact, decimal.InvalidOperation, decimal.Overflow])


@dataclass(frozen=True, slots=True)
class RateCard:
    """What one token costs, in integer pico-dollars (1e-12 USD), for one model at one
    speed, one price tier and one inference geo. Multipliers are already applied.

    Built once when the catalog loads; cost functions only multiply and add ints.
    """

    input: int
    output: int
    cache_write_5m: int
    cache_write_1h: int
    cache_read: int
    speed: Speed
    above_input_tokens: int
    inference_geo: str | None


def tier_card(table: tuple[tuple[int, RateCard], ...], total_input_tokens: int) -> RateCard:
    """The card of the tier a request falls in: the first (highest) threshold its TOTAL input is
    strictly above (200_000 exactly is still <=200K), else the lowest tier's card."""
    for above, card in table:
        if total_input_tokens > above:
            return card
    return table[-1][1]


def pico_per_token(price_per_mtok: Decimal, *multipliers: Decimal, what: str) -> int:
    """`price_per_mtok` ($/MTok) times `multipliers`, as whole pico-dollars per token.

    Raises ValueError when the product is not a whole number of pico-dollars, which
    would force rounding a rate (the catalog never rounds a rate, only a request's total).
    """
    try:
        with decimal.localcontext(_EXACT):
            value = price_per_mtok * PICO_PER_USD_PER_MTOK
            for m in multipliers:
                value = value * m
            if value != value.to_integral_value():
                raise decimal.Inexact
    except decimal.DecimalException:
        factors = " x ".join(str(m) for m in multipliers)
        shown = f"{price_per_mtok} $/MTok" + (f" x {factors}" if factors else "")
        raise ValueError(
            f"{what}: {shown} is not a whole number of pico-dollars per token; "
            "prices must have at most 6 decimals once every multiplier is applied"
        ) from None
    return int(value)
