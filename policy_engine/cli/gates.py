"""`diff` thresholds: fail a build when a policy change costs or changes more than a team allows.

Each threshold compares one figure of the diff report with a limit, from the command line
or the settings file's `thresholds:`; crossing any exits 1 and the report names it. Money is
compared exactly in micro-dollars; the per-day figure scales the change over the log by the
span of its `ts` timestamps (a log of 6 hours counts its change 4 times per day).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from . import UsageError

__all__ = ["add_options", "Gate", "LogSpan", "evaluate", "render"]

_MICRO = 1_000_000
_TS = re.compile(r'"ts"\s*:\s*(?:"([^"]+)"|(-?\d+(?:\.\d+)?))')


def _usd(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not an amount in USD: {text!r}") from None
    if not value.is_finite() or value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative amount in USD, not {text}")
    return value


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a percentage: {text!r}") from None
    if not 0 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"must be a non-negative percentage, not {text}")
    return value


def add_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("thresholds (exit 1 when one is crossed; defaults from the settings' thresholds:)")
    group.add_argument("--max-cost-increase-usd-per-day", type=_usd, metavar="USD",
                       help="most the new policy may add to the cost per day of the log's traffic")
    group.add_argument("--max-cost-increase-usd", type=_usd, metavar="USD",
                       help="most the new policy may add to the cost over the whole log")
    group.add_argument("--max-cost-increase-percent", type=_percent, metavar="PCT",
                       help="most the new policy may add to the cost, in percent of the old cost")
    group.add_argument("--max-speed-change-percent", type=_percent, metavar="PCT",
                       help="largest share of requests, in percent, whose speed may change")
    group.add_argument("--fail-on-new-rejects", action="store_true", default=None,
                       help="fail when the new policy rejects a request the old one did not")


class LogSpan:
    """Wraps the log's lines, noting the earliest and latest `ts` on the way through."""

    def __init__(self, lines: Iterable[tuple[int, str]]) -> None:
        self._lines = lines
        self.first: float | None = None
        self.last: float | None = None

    def __iter__(self) -> Iterator[tuple[int, str]]:
        for number, text in self._lines:
            match = _TS.search(text)
            if match is not None:
                epoch = _epoch(match.group(1), match.group(2))
                if epoch is not None:
                    self.first = epoch if self.first is None else min(self.first, epoch)
                    self.last = epoch if self.last is None else max(self.last, epoch)
            yield number, text

    @property
    def stopped(self) -> Any:
        """The wrapped lines' `stopped` (see `simulate.LogLines`): why they ended before the log did."""
        return getattr(self._lines, "stopped", None)

    @property
    def seconds(self) -> float:
        return 0.0 if self.first is None or self.last is None else self.last - self.first


def _epoch(text: str | None, number: str | None) -> float | None:
    from .commands import log_time

    when = log_time(float(number) if number is not None else text)
    return None if when is None else when.timestamp()


@dataclass
class Gate:
    option: str
    what: str
    value: str
    limit: str
    crossed: bool

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.option, "what": self.what, "value": self.value, "limit": self.limit,
                "crossed": self.crossed}


def _limits(args: argparse.Namespace, settings: Any) -> dict[str, Any]:
    configured = settings.thresholds
    names = ("max_cost_increase_usd_per_day", "max_cost_increase_usd", "max_cost_increase_percent",
             "max_speed_change_percent", "fail_on_new_rejects")
    return {name: getattr(args, name) if getattr(args, name, None) is not None else getattr(configured, name)
            for name in names}


def _money(micro: Fraction | int) -> str:
    sign = "+" if micro > 0 else "-" if micro < 0 else ""
    return f"{sign}${abs(Decimal(micro.numerator) / Decimal(micro.denominator) if isinstance(micro, Fraction) else Decimal(micro)) / _MICRO:,.2f}"


def evaluate(result: Any, span: LogSpan, args: argparse.Namespace, settings: Any) -> list[Gate]:
    """The thresholds that apply, each with the figure it measured and whether it was crossed."""
    limits = _limits(args, settings)
    old, new = result.old, result.new
    delta = new.cost - old.cost
    gates: list[Gate] = []
    per_day = limits["max_cost_increase_usd_per_day"]
    if per_day is not None:
        if span.seconds <= 0:
            raise UsageError("--max-cost-increase-usd-per-day needs a log whose lines carry `ts` timestamps spanning "
                             "some time; use --max-cost-increase-usd for the change over the whole log")
        daily = Fraction(delta) * 86_400 / Fraction(span.seconds)
        limit = Fraction(int(per_day * _MICRO))
        gates.append(Gate("max-cost-increase-usd-per-day", f"cost change per day (log spans {span.seconds / 3600:,.1f} h)",
                          _money(daily) + "/day", f"${per_day:,.2f}/day", daily > limit))
    window = limits["max_cost_increase_usd"]
    if window is not None:
        gates.append(Gate("max-cost-increase-usd", "cost change over the log", _money(delta), f"${window:,.2f}",
                          delta > int(window * _MICRO)))
    percent = limits["max_cost_increase_percent"]
    if percent is not None:
        if old.cost > 0:
            change = 100 * delta / old.cost
            shown = f"{change:+.2f}%"
        else:
            change = float("inf") if delta > 0 else 0.0
            shown = "+inf% (the old policy cost nothing)" if delta > 0 else "+0.00%"
        gates.append(Gate("max-cost-increase-percent", "cost change relative to the old policy", shown, f"{percent:g}%",
                          change > percent))
    speed_share = limits["max_speed_change_percent"]
    if speed_share is not None:
        moved = sum(c.count for (f, t, _, _), c in result.changes.items() if f != t)
        share = 100 * moved / old.decided if old.decided else 0.0
        gates.append(Gate("max-speed-change-percent", "requests whose speed changes",
                          f"{share:.2f}% ({moved} of {old.decided})", f"{speed_share:g}%", share > speed_share))
    if limits["fail_on_new_rejects"]:
        rejected = sum(c.count for (f, t, _, _), c in result.changes.items() if t == "rejected" and f != "rejected")
        gates.append(Gate("fail-on-new-rejects", "requests the new policy rejects and the old one did not",
                          str(rejected), "0", rejected > 0))
    return gates


def render(gates: list[Gate], fmt: str, body: str) -> tuple[str, str]:
    """(stdout, stderr): the report with the thresholds added in its own format."""
    from ..check import plural

    if not gates:
        return body, ""
    crossed = [g for g in gates if g.crossed]
    verdict = (f"FAIL: {plural(len(crossed), 'threshold')} crossed: "
               + ", ".join(g.option for g in crossed)) if crossed else "thresholds: all met"
    if fmt == "json":
        data = json.loads(body)
        data["thresholds"] = [g.to_dict() for g in gates]
        data["thresholds_crossed"] = [g.option for g in crossed]
        return json.dumps(data, indent=2) + "\n", ""
    if fmt == "markdown":
        out = ["", "#### Thresholds", "", "| | threshold | measured | limit |", "|---|---|---:|---:|"]
        out += [f"| {'❌ crossed' if g.crossed else '✅ met'} | `--{g.option}`: {g.what} | {g.value} | {g.limit} |"
                for g in gates]
        out += ["", f"**{verdict}**" if crossed else verdict]
        return body + "\n".join(out) + "\n", ""
    lines = [f"  {'CROSSED' if g.crossed else 'ok':8} --{g.option}: {g.what}: {g.value} (limit {g.limit})" for g in gates]
    summary = "thresholds:\n" + "\n".join(lines) + "\n" + verdict + "\n"
    if fmt == "text":
        return body + summary, ""
    return body, summary  # another format (html, ...): the report stays as it is, the verdict goes to stderr
