"""Stage 6, settle: where budgets live. Reserve before a request, settle after it.

Money is integer micro-dollars everywhere in this package: sums are exact and
every backend (memory, SQLite, Redis) must give the same totals to the unit.

A *scope* is one budget for one key value in one calendar window, e.g.
"tenant_premium / acme / day 2026-03-02 in New York". A *reservation* holds the
worst-case cost of a request against every scope that applies, atomically: all
scopes fit, or nothing is reserved. Settling replaces the reservation with the
actual cost; settling the same reservation twice is a no-op; a reservation that
is never settled or released expires after its TTL.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from functools import lru_cache
from typing import Literal, NamedTuple
from zoneinfo import ZoneInfo

from .._fork import renew_in_child
from .._mypyc import mypyc_attr

__all__ = ["Scope", "Balance", "Charge", "ReserveResult", "Ledger", "AsyncLedger", "MemoryLedger", "window_bounds", "Window"]

Window = Literal["hour", "day", "week", "month"]


@dataclass(frozen=True, slots=True)
class Scope:
    """One budget, for one key value, in one calendar window."""

    budget: str
    key: str
    window: str  # e.g. "day:2026-03-02@UTC"; unique per calendar period
    limit: int  # micro-dollars
    expires_at: float  # epoch seconds when the window ends; backends may drop the scope after it
    id: str = field(init=False, repr=False, compare=False)
    """`budget \\x1f key \\x1f window`: the ledger's key for the scope (computed once: ledgers read it often)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", f"{self.budget}\x1f{self.key}\x1f{self.window}")


class Balance(NamedTuple):
    """A scope's state in micro-dollars. A NamedTuple: one is built per charge of every reservation."""

    spent: int
    reserved: int
    limit: int

    @property
    def remaining(self) -> int:
        return self.limit - self.spent - self.reserved


Charge = tuple[Scope, int]
"""A scope and the micro-dollars to reserve or settle against it."""


class ReserveResult(NamedTuple):
    """What `Ledger.reserve` answered (a NamedTuple, like `Balance`: built for every reservation)."""

    ok: bool
    balances: tuple[Balance, ...]
    """Per charged scope, as the reservation left it (or as it stood when it did not fit)."""
    failed: int | None = None
    """Index of the first charge that did not fit."""


@mypyc_attr(allow_interpreted_subclasses=True)
class Ledger(ABC):
    """The interface every backend implements; `tests/test_ledger_conformance.py` holds them to it."""

    @abstractmethod
    def balances(self, scopes: Sequence[Scope]) -> list[Balance]:
        """Current spent and reserved amounts of each scope."""

    @abstractmethod
    def reserve(self, reservation_id: str, charges: Sequence[Charge], *, ttl_s: float) -> ReserveResult:
        """Reserve every charge, or none when any scope would go over its limit."""

    @abstractmethod
    def settle(self, reservation_id: str, charges: Sequence[Charge]) -> bool:
        """Record actual spend and drop the reservation. False (and no change) when already settled.

        Spend is recorded even when the reservation has expired or was never made:
        the money was spent whatever our bookkeeping says.
        """

    @abstractmethod
    def release(self, reservation_id: str) -> bool:
        """Drop a reservation for a request that was never sent. False when there was none."""

    @abstractmethod
    def expire(self, now: float | None = None) -> int:
        """Drop reservations past their TTL; returns how many. Backends also do this on their own."""

    def close(self) -> None:
        """Release connections or files."""


_Reservation = tuple[tuple[Charge, ...], float]
"""A held reservation: its charges and when it expires (epoch seconds)."""


@mypyc_attr(allow_interpreted_subclasses=True)
class MemoryLedger(Ledger):
    """One process's ledger: a lock around a few dicts. Nothing survives the process."""

    def __init__(self, *, clock: Callable[[], float] = time.time, settled_memory_s: float = 86_400.0) -> None:
        self._lock = threading.Lock()
        self._spent: dict[str, int] = {}
        self._reserved: dict[str, int] = {}
        self._reservations: dict[str, _Reservation] = {}
        self._settled: dict[str, float] = {}
        self._clock = clock
        self._settled_memory_s = settled_memory_s
        self._next_sweep = 0.0
        self._forked = False
        self._renewal: object = renew_in_child(self._renew_after_fork)

    def _renew_after_fork(self) -> None:
        # A parent thread may have held the lock at the fork. The next sweep (the child's first call)
        # says what a forked copy of this ledger means.
        self._lock = threading.Lock()
        self._forked, self._next_sweep = True, 0.0

    def balances(self, scopes: Sequence[Scope]) -> list[Balance]:
        with self._lock:
            self._sweep_locked(self._clock())
            return [Balance(self._spent.get(s.id, 0), self._reserved.get(s.id, 0), s.limit) for s in scopes]

    def reserve(self, reservation_id: str, charges: Sequence[Charge], *, ttl_s: float) -> ReserveResult:
        now = self._clock()
        with self._lock:
            if now >= self._next_sweep:
                self._sweep_locked(now)
            if reservation_id in self._reservations or reservation_id in self._settled:
                raise ValueError(f"reservation id {reservation_id!r} was already used")
            spent, reserved = self._spent, self._reserved
            if len(charges) == 1:  # the common case (one budget), without the general bookkeeping
                charge = charges[0]
                scope, amount = charge
                sid = scope.id
                s_spent, s_reserved = spent.get(sid, 0), reserved.get(sid, 0)
                if amount > 0 and amount > scope.limit - s_spent - s_reserved:
                    return ReserveResult(False, (Balance(s_spent, s_reserved, scope.limit),), 0)
                reserved[sid] = s_reserved + amount
                self._reservations[reservation_id] = ((charge,), now + ttl_s)
                # tuple.__new__ is what the NamedTuples' own __new__ calls, minus the Python frame
                # it costs compiled code on every reservation.
                balance = tuple.__new__(Balance, (s_spent, s_reserved + amount, scope.limit))
                return tuple.__new__(ReserveResult, (True, (balance,), None))
            # Every charge is checked against the state before this reservation, then all are added.
            before = [(spent.get(s.id, 0), reserved.get(s.id, 0)) for s, _ in charges]
            for index, ((scope, amount), (s_spent, s_reserved)) in enumerate(zip(charges, before)):
                if amount > 0 and amount > scope.limit - s_spent - s_reserved:  # a zero charge always fits
                    return ReserveResult(False, tuple(Balance(a, b, s.limit) for (a, b), (s, _) in zip(before, charges)), index)
            for scope, amount in charges:
                reserved[scope.id] = reserved.get(scope.id, 0) + amount
            self._reservations[reservation_id] = (tuple(charges), now + ttl_s)
            return ReserveResult(True, tuple(Balance(a, b + amount, s.limit) for (a, b), (s, amount) in zip(before, charges)))

    def settle(self, reservation_id: str, charges: Sequence[Charge]) -> bool:
        now = self._clock()
        with self._lock:
            settled = self._settled
            if reservation_id in settled:
                return False
            if reservation_id in self._reservations:
                self._drop_locked(reservation_id)
            spent = self._spent
            for scope, amount in charges:
                sid = scope.id
                spent[sid] = spent.get(sid, 0) + amount
            settled[reservation_id] = now + self._settled_memory_s
            return True

    def release(self, reservation_id: str) -> bool:
        with self._lock:
            return self._drop_locked(reservation_id)

    def expire(self, now: float | None = None) -> int:
        with self._lock:
            return self._sweep_locked(self._clock() if now is None else now, force=True)

    def _drop_locked(self, reservation_id: str) -> bool:
        reservation = self._reservations.pop(reservation_id, None)
        if reservation is None:
            return False
        for scope, amount in reservation[0]:
            if not amount:
                continue  # a zero charge added nothing (and its scope's entry may be gone already)
            left = self._reserved[scope.id] - amount
            if left:
                self._reserved[scope.id] = left
            else:
                del self._reserved[scope.id]
        return True

    def _sweep_locked(self, now: float, *, force: bool = False) -> int:
        # Sweeping is O(reservations); once a second is plenty for TTLs of minutes.
        if not force and now < self._next_sweep:
            return 0
        self._next_sweep = now + 1.0
        if self._forked:
            self._forked = False
            logging.getLogger("policy_engine.ledger").warning(
                "a MemoryLedger is used in a forked child: its budgets are this process's own copy, so every "
                "worker can spend each budget in full; share one SqliteLedger or RedisLedger between workers")
        stale = [rid for rid, r in self._reservations.items() if r[1] <= now]
        for rid in stale:
            self._drop_locked(rid)
        # Settled ids are inserted in time order with one memory span, so the expired ones come
        # first: stop at the first live one instead of scanning a day of ids every second.
        expired = []
        for rid, until in self._settled.items():
            if until > now:
                break
            expired.append(rid)
        for rid in expired:
            del self._settled[rid]
        return len(stale)

    def totals(self) -> dict[str, int]:
        """Settled spend per scope id (for tests and reports)."""
        with self._lock:
            return dict(self._spent)


def window_bounds(window: Window, tz: str, now: datetime) -> tuple[str, datetime, datetime]:
    """The calendar period containing `now`: its id, start and end (aware datetimes).

    Weeks start on Monday (ISO 8601). Periods follow the wall clock of `tz`, so a
    'day' in America/New_York is 23 or 25 hours long across DST changes.
    """
    zone = _zone(tz)
    local = now.astimezone(zone)
    if window == "hour":
        start = local.replace(minute=0, second=0, microsecond=0)
        # Add an hour in UTC, not on the wall clock: the fall-back hour happens twice.
        end = (start.astimezone(timezone.utc) + timedelta(hours=1)).astimezone(zone)
        label = start.astimezone(timezone.utc).strftime("%Y-%m-%dT%H")
    elif window == "day":
        start = _midnight(local.date(), zone)
        end = _midnight(local.date() + timedelta(days=1), zone)
        label = local.date().isoformat()
    elif window == "week":
        monday = local.date() - timedelta(days=local.weekday())
        start, end = _midnight(monday, zone), _midnight(monday + timedelta(days=7), zone)
        label = f"{monday.isocalendar()[0]}-W{monday.isocalendar()[1]:02d}"
    elif window == "month":
        first = local.date().replace(day=1)
        following = (first + timedelta(days=32)).replace(day=1)
        start, end = _midnight(first, zone), _midnight(following, zone)
        label = first.strftime("%Y-%m")
    else:  # pragma: no cover - the policy model only admits the four above
        raise ValueError(f"unknown window {window!r}")
    return f"{window}:{label}@{tz}", start, end


def _midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=zone)


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


@mypyc_attr(allow_interpreted_subclasses=True)
class AsyncLedger(ABC):
    """`Ledger` for asyncio workers: the same methods and semantics, as coroutines.

    The conformance suite holds every implementation to `MemoryLedger`'s behaviour too;
    a sync and an async ledger over the same store (e.g. `RedisLedger` and
    `AsyncRedisLedger` with one prefix) share budgets.
    """

    @abstractmethod
    async def balances(self, scopes: Sequence[Scope]) -> list[Balance]:
        """Current spent and reserved amounts of each scope."""

    @abstractmethod
    async def reserve(self, reservation_id: str, charges: Sequence[Charge], *, ttl_s: float) -> ReserveResult:
        """Reserve every charge, or none when any scope would go over its limit."""

    @abstractmethod
    async def settle(self, reservation_id: str, charges: Sequence[Charge]) -> bool:
        """Record actual spend and drop the reservation. False (and no change) when already settled."""

    @abstractmethod
    async def release(self, reservation_id: str) -> bool:
        """Drop a reservation for a request that was never sent. False when there was none."""

    @abstractmethod
    async def expire(self, now: float | None = None) -> int:
        """Drop reservations past their TTL; returns how many."""

    async def close(self) -> None:
        """Release connections or files."""
