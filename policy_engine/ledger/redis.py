"""A ledger shared by a fleet: budgets in Redis, every change one Lua script.

Layout (all keys under `prefix`; ids are binary-safe, scope ids contain \\x1f):

    s:<scope>   string "<spent> <reserved>"; expires `window_margin_s` after the window
    x           zset   reservation id -> expiry (epoch s): every live reservation of the prefix
    ids         string how scope ids are named (`hash_scopes`' fingerprint), set by the first ledger
    r:<rid>     string msgpack ['R', exp, token, scope, amount, ...] while reserved (it lives as long
                       as its longest-lived scope), then ['S', token] for `settled_memory_s` once settled
                       (so settling is idempotent)

Why it is exact: a reservation's amounts count in its scopes' `reserved` exactly while
its id is a member of `x`. Every path that removes the member (expiry, release, settle,
reuse of an expired id) subtracts the amounts in the same script, and scripts run
atomically, so no interleaving of workers can count a reservation twice or lose it.

Why it is cheap: Redis spends more on each command a script runs than on the command's
work, so the scripts read every scope with one MGET, write each changed scope once, and
read-and-write the reservation record with one SET ... GET: a reservation over two
budgets runs 5 commands, its settlement 5. Expired reservations are swept from `x` by
the reserve of any worker of the fleet (at most once a second per process, a bounded
number per call), by `balances` and `expire()`, and whenever a reservation does not
fit: an expired reservation can only ever make a reserve fail, and a failing reserve
sweeps and checks again, so a reserve sees exactly what it would after a full sweep.

Round trips: `reserve` and `settle` are one EVALSHA each. `balances` answers from
what this process last saw when that is younger than `balances_max_age_s`, so a busy
worker pays two round trips per request; enforcement never uses that cache. Calls made
while another call is in flight queue up and go together in one write on the process's
own connection (group commit): throughput grows with concurrency instead of with
connections. With `hiredis` installed the batches are packed and parsed by it directly.

`RedisLedger` serves threads; `AsyncRedisLedger` serves coroutines on one event loop
with the same scripts and keys, so sync and asyncio workers share budgets.

Clocks: reservation expiry uses the caller's clock (`clock`, default `time.time`),
so the fleet's clocks should agree to well within the reservation TTL (NTP does);
key TTLs use Redis's own clock and only collect garbage.

When Redis cannot be reached in `timeout_s`, `reserve`/`balances` raise
`StateUnavailable` (the engine then applies the policy's `on_state_unavailable`),
and further calls fail fast until a backoff delay has passed. `settle` and `release`
never raise for an outage: they go to a bounded journal that a background thread (or
task) replays once Redis answers again (settling is idempotent, so replays are safe).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Generic, TypeVar

import redis as redis_lib
import redis.asyncio as redis_asyncio
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ConnectionError as RedisConnectionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TimeoutError as RedisTimeoutError,
    TryAgainError,
)
from redis.retry import Retry

try:
    import hiredis as _hiredis
except ImportError:  # optional: redis-py's own packer and parser are used instead
    _hiredis = None

from .. import telemetry
from ..errors import StateUnavailable
from ..ratelimit import FastRateLimit, RateLimitStore
from .._fork import Periodic, ProcessIds, renew_in_child
from . import AsyncLedger, Balance, Charge, Ledger, ReserveResult, Scope
from ._keys import HashScopes, ScopeIds, StoredScope, describe_charges

__all__ = ["RedisLedger", "AsyncRedisLedger", "RedisRateLimitStore"]

log = logging.getLogger("policy_engine.ledger.redis")

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,  # also BusyLoadingError (a restart loading its data) and auth errors
    RedisTimeoutError,
    OutOfMemoryError,
    ReadOnlyError,  # a failover left us talking to a replica
    ClusterDownError,
    TryAgainError,
    OSError,
    asyncio.TimeoutError,
)

_LUA_COMMON = r"""
local P = ARGV[1]
local X = P .. 'x'

-- Scopes (distinct ids) -> {spent, reserved, exists}, with one MGET; a missing scope is 0 0.
local function load(sids)
  local keys = {}
  for i = 1, #sids do keys[i] = P .. 's:' .. sids[i] end
  local raws = redis.call('MGET', unpack(keys))
  local st = {}
  for i = 1, #sids do
    local raw = raws[i]
    if raw then
      local spent, reserved = string.match(raw, '^(%-?%d+) (%-?%d+)')
      st[sids[i]] = {tonumber(spent), tonumber(reserved), true}
    else
      st[sids[i]] = {0, 0, false}
    end
  end
  return st
end

-- Write a scope back. A new scope lives until its window ends (pxat); without pxat a scope
-- that is gone stays gone (it took the holds counted in it along when it expired).
local function store(sid, c, pxat)
  if c[3] then
    redis.call('SET', P .. 's:' .. sid, string.format('%d %d', c[1], c[2]), 'KEEPTTL')
  elseif pxat then
    redis.call('SET', P .. 's:' .. sid, string.format('%d %d', c[1], c[2]), 'PXAT', pxat)
    c[3] = true
  end
end

-- Add what a live record {'R', exp, token, scope, amount, ...} holds to held (scope -> amount).
local function holds(rec, held, order)
  if rec[1] ~= 'R' then return end
  for j = 4, #rec, 2 do
    local sid = rec[j]
    if not held[sid] then held[sid] = 0; order[#order + 1] = sid end
    held[sid] = held[sid] + tonumber(rec[j + 1])
  end
end

-- Uncount held amounts from their scopes; returns the scopes' states.
local function give_back(held, order)
  if #order == 0 then return {} end
  local st = load(order)
  for _, sid in ipairs(order) do
    local c = st[sid]
    if c[3] then
      c[2] = c[2] - held[sid]
      store(sid, c)
    end
  end
  return st
end

-- Drop up to `limit` reservations expired by `now`; returns how many.
local function sweep(now, limit)
  local ids = redis.call('ZRANGEBYSCORE', X, '-inf', now, 'LIMIT', 0, limit)
  if #ids == 0 then return 0 end
  redis.call('ZREM', X, unpack(ids))
  local keys = {}
  for i = 1, #ids do keys[i] = P .. 'r:' .. ids[i] end
  local raws = redis.call('MGET', unpack(keys))
  redis.call('DEL', unpack(keys))
  local held, order = {}, {}
  for i = 1, #ids do
    if raws[i] then holds(cmsgpack.unpack(raws[i]), held, order) end
  end
  give_back(held, order)
  return #ids
end

-- Every expired reservation, up to 10,000 per call: Redis serves nobody while a script runs.
local function sweep_all(now)
  local total = 0
  for _ = 1, 10 do
    local n = sweep(now, 1000)
    total = total + n
    if n < 1000 then break end
  end
  return total
end
"""

# ARGV: prefix, rid, now, exp, token, record expiry (ms), sweep (1/0), n, then n x (scope, amount, limit, scope expiry ms)
# -> {status, failed index (1-based, 0 = none), n x (spent, reserved)}; status 1 ok, 0 does not fit, -1 id used
_RESERVE = _LUA_COMMON + r"""
local rid, now, exp, tok, record_pxat, n = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[8])
if ARGV[7] == '1' then sweep(now, 256) end
local sids, sums, pxats = {}, {}, {}
for i = 1, n do
  local b = 4 * i + 5
  local sid = ARGV[b]
  if not sums[sid] then
    sums[sid] = 0; sids[#sids + 1] = sid; pxats[sid] = ARGV[b + 3]
  end
  sums[sid] = sums[sid] + tonumber(ARGV[b + 1])
end
-- The same scope twice in one reservation holds the sum, once.
local record = {'R', exp, tok}
for _, sid in ipairs(sids) do
  if sums[sid] > 0 then record[#record + 1] = sid; record[#record + 1] = string.format('%d', sums[sid]) end
end
local key = P .. 'r:' .. rid
local packed = cmsgpack.pack(record)
local old = redis.call('SET', key, packed, 'NX', 'GET', 'PXAT', record_pxat)
local function views(status, failed, st, added)
  local out = {status, failed}
  for i = 1, n do
    local b = 4 * i + 5
    local c = st[ARGV[b]]
    out[#out + 1] = c[1]
    if added then
      out[#out + 1] = c[2] - sums[ARGV[b]] + tonumber(ARGV[b + 1])  -- as MemoryLedger: before + this charge
    else
      out[#out + 1] = c[2]
    end
  end
  return out
end
if old then
  local rec = cmsgpack.unpack(old)
  if rec[1] == 'S' then return {-1, 0} end
  if rec[3] == tok then return views(1, 0, load(sids), false) end  -- this very call, retried: it already succeeded
  if tonumber(rec[2]) > tonumber(now) then return {-1, 0} end
  -- Expired, not swept yet: its holds go and the id is free again.
  if redis.call('ZREM', X, rid) == 1 then
    local held, order = {}, {}
    holds(rec, held, order)
    give_back(held, order)
  end
  redis.call('SET', key, packed, 'PXAT', record_pxat)
end
local function first_over(st)
  for i = 1, n do
    local b = 4 * i + 5
    local c, amount = st[ARGV[b]], tonumber(ARGV[b + 1])
    -- A zero charge always fits, even a scope already over its limit.
    if amount > 0 and c[1] + c[2] + amount > tonumber(ARGV[b + 2]) then return i end
  end
  return 0
end
local st = load(sids)
local failed = first_over(st)
if failed > 0 and sweep_all(now) > 0 then
  st = load(sids)
  failed = first_over(st)
end
if failed > 0 then
  redis.call('DEL', key)  -- a reservation that did not fit holds nothing: its id stays free
  return views(0, failed, st, false)
end
for _, sid in ipairs(sids) do
  if sums[sid] > 0 then
    local c = st[sid]
    c[2] = c[2] + sums[sid]
    store(sid, c, pxats[sid])
  end
end
redis.call('ZADD', X, exp, rid)
return views(1, 0, st, true)
"""

# ARGV: prefix, rid, token, settled memory (ms), n, then n x (scope, amount, scope expiry ms)
# -> {1 first settle | 0 already settled, n x (spent, reserved)}
_SETTLE = _LUA_COMMON + r"""
local rid, tok, keep, n = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local key = P .. 'r:' .. rid
local old = redis.call('SET', key, cmsgpack.pack({'S', tok}), 'PX', keep, 'GET')
local sids, sums, pxats = {}, {}, {}
for i = 1, n do
  local b = 3 * i + 3
  local sid = ARGV[b]
  if not sums[sid] then
    sums[sid] = 0; sids[#sids + 1] = sid; pxats[sid] = ARGV[b + 2]
  end
  sums[sid] = sums[sid] + tonumber(ARGV[b + 1])
end
local function views(status, st)
  local out = {status}
  for i = 1, n do
    local c = st[ARGV[3 * i + 3]]
    out[#out + 1] = c[1]; out[#out + 1] = c[2]
  end
  return out
end
local rec = old and cmsgpack.unpack(old)
if rec and rec[1] == 'S' then
  -- Settled before: the first settle's token stays (its retry must still see success), nothing changes.
  redis.call('SET', key, old, 'PX', keep)
  local status = 0
  if rec[2] == tok then status = 1 end
  return views(status, load(sids))
end
local held, order = {}, {}
if rec and redis.call('ZREM', X, rid) == 1 then holds(rec, held, order) end
for _, sid in ipairs(order) do
  if not sums[sid] then sids[#sids + 1] = sid end
end
local st = load(sids)
for _, sid in ipairs(sids) do
  local c, h, s = st[sid], held[sid] or 0, sums[sid] or 0
  if c[3] then c[2] = c[2] - h end
  c[1] = c[1] + s
  -- Spend is recorded even when the reservation expired or was never made: the money was spent.
  if s > 0 or (h > 0 and c[3]) then store(sid, c, pxats[sid]) end
end
return views(1, st)
"""

# ARGV: prefix, rid, now -> {1 released | 0 nothing live, then (scope, spent, reserved) per scope given back}
_RELEASE = _LUA_COMMON + r"""
local rid, now = ARGV[2], tonumber(ARGV[3])
local key = P .. 'r:' .. rid
local raw = redis.call('GET', key)
if not raw then return {0} end
local rec = cmsgpack.unpack(raw)
if rec[1] ~= 'R' then return {0} end
redis.call('DEL', key)
if redis.call('ZREM', X, rid) == 0 then return {0} end
local held, order = {}, {}
holds(rec, held, order)
local st = give_back(held, order)
local out = {0}
if tonumber(rec[2]) > now then out[1] = 1 end
for _, sid in ipairs(order) do
  local c = st[sid]
  if c[3] then out[#out + 1] = sid; out[#out + 1] = c[1]; out[#out + 1] = c[2] end
end
return out
"""

# ARGV: prefix, now, scopes... -> n x (spent, reserved)
_BALANCES = _LUA_COMMON + r"""
sweep_all(ARGV[2])
local keys = {}
for i = 3, #ARGV do keys[#keys + 1] = P .. 's:' .. ARGV[i] end
local raws = redis.call('MGET', unpack(keys))
local out = {}
for i = 1, #keys do
  local spent, reserved = 0, 0
  if raws[i] then spent, reserved = string.match(raws[i], '^(%-?%d+) (%-?%d+)') end
  out[#out + 1] = tonumber(spent); out[#out + 1] = tonumber(reserved)
end
return out
"""

# ARGV: prefix, now, limit -> how many reservations expired (the caller calls again while it is the limit)
_EXPIRE = _LUA_COMMON + r"""
return sweep(ARGV[2], tonumber(ARGV[3]))
"""

_SCRIPTS = {"reserve": _RESERVE, "settle": _SETTLE, "release": _RELEASE, "balances": _BALANCES, "expire": _EXPIRE}
_EXPIRE_BATCH = 1_000

_INHERITED_CLIENTS: list[Any] = []
"""asyncio clients a forked child inherited: kept, never used nor closed (see `AsyncRedisLedger._renew_transport`)."""

_Entry = tuple[str, str, str, tuple[Charge, ...]]
"""A journaled call: kind ('settle' or 'release'), reservation id, call token, charges."""


class _Call:
    """One script call on its way: arguments, then reply or error.

    `sids` and `offset` tell the sender where the reply's balances are, so it can remember
    them in order of execution (the connection runs calls in the order they were sent)."""

    __slots__ = ("name", "args", "sids", "offset", "seen_at", "reply", "error", "event", "lead")

    def __init__(self, name: str, args: Sequence[Any], sids: Sequence[str] | None = None, offset: int = 0,
                 seen_at: float = 0.0) -> None:
        self.name, self.args, self.sids, self.offset, self.seen_at = name, args, sids, offset, seen_at
        self.reply: Any = None
        self.error: BaseException | None = None
        self.event: Any = None  # sync: a held threading.Lock while a follower waits; async: a Future
        self.lead = False


_Client = TypeVar("_Client", redis_lib.Redis, redis_asyncio.Redis)


class _RedisLedgerCore(Generic[_Client]):
    """What `RedisLedger` and `AsyncRedisLedger` share: the constructor, script arguments and replies,
    the balances cache, outage backoff and the journal's bookkeeping. Only the transport differs."""

    def __init__(
        self,
        client: _Client | None = None,
        *,
        url: str = "redis://127.0.0.1:6379/0",
        prefix: str = "pe:",
        timeout_s: float = 0.25,
        clock: Callable[[], float] = time.time,
        settled_memory_s: float = 86_400.0,
        window_margin_s: float = 86_400.0,
        balances_max_age_s: float = 1.0,
        journal_max: int = 100_000,
        journal_path: str | os.PathLike[str] | None = None,
        backoff_base_s: float = 0.05,
        backoff_max_s: float = 5.0,
        hash_scopes: HashScopes = False,
    ) -> None:
        if journal_max < 1:
            raise ValueError("journal_max must be at least 1")
        self.prefix = prefix
        self._clock = clock
        self._settled_ms = int(settled_memory_s * 1000)
        self._margin_s = window_margin_s
        self._max_age = balances_max_age_s
        self._shas: dict[str, str] = {}
        self._timeout_s = timeout_s
        self._ids = ScopeIds(hash_scopes)
        self._ids_checked = False
        self._tokens = ProcessIds()
        self._next_sweep = 0.0
        self._plain = False  # True: pack and parse through redis-py even when hiredis is installed
        # sid -> (spent, reserved, seen at): written only by the sender, in the order Redis ran the calls.
        self._cache: dict[str, tuple[int, int, float]] = {}
        # Outage state: fail fast until _retry_at, doubling the wait up to backoff_max_s.
        self._state_lock = threading.Lock()
        self._failures = 0
        self._retry_at = 0.0
        self._backoff_base = backoff_base_s
        self._backoff_max = backoff_max_s
        # Settlements and releases Redis did not take, oldest first.
        self._journal: deque[_Entry] = deque()
        self._journal_lock = threading.Lock()
        self._journal_max = journal_max
        self._journal_base = self._journal_path = Path(journal_path) if journal_path is not None else None
        self.journal_overflow = 0
        """Entries the journal had no room for (each one logged at ERROR with its amounts)."""
        self.journaled_total = 0
        """Entries ever journaled by this instance (delivered or not)."""
        if self._journal_path is not None:
            if self._journal_path.exists():
                self._load_journal(self._journal_path)
            self._adopt_journals()
        self.client: _Client = client if client is not None else self._default_client(url, timeout_s)
        # The transport: calls waiting for the next batch, and the connection of our own they go on.
        self._queue: list[_Call] = []
        self._connection: Any = None
        self._reader: Any = None
        self._open()
        self._renewal = renew_in_child(self._after_fork)

    def _default_client(self, url: str, timeout_s: float) -> _Client:
        raise NotImplementedError

    def _record_ids(self) -> Any:
        """Record this ledger's `hash_scopes` setting unless one is (SET NX GET): answers the one recorded before."""
        return self.client.set(self.prefix + "ids", self._ids.fingerprint, nx=True, get=True)

    def _ids_reply(self, reply: Any) -> None:
        self._ids.check(None if reply is None else _text(reply), f"Redis prefix {self.prefix!r}")
        self._ids_checked = True

    def _open(self) -> None:
        """The transport's own state, set up once the shared state is."""
        raise NotImplementedError

    # -- fork safety (policy_engine._fork) ----------------------------------------------------

    def _after_fork(self) -> None:
        """In a forked child: nothing of the parent's connection, locks, queue or journal is the child's.

        The parent keeps delivering its own journal. The child journals to a file of its own,
        `<journal_path>.<pid>`, and adopts those of processes that are gone (a restarted
        worker's pid, a worker that died during an outage): their entries are replayed here.
        Delivering an entry twice changes nothing (settlements are idempotent per token)."""
        self._state_lock, self._journal_lock = threading.Lock(), threading.Lock()
        self._journal = deque()
        self.journal_overflow = self.journaled_total = 0
        self._queue, self._connection, self._reader = [], None, None
        if self._journal_base is not None:
            self._journal_path = self._journal_base.with_name(f"{self._journal_base.name}.{os.getpid()}")
            self._adopt_journals()
        self._renew_transport()

    def _renew_transport(self) -> None:
        raise NotImplementedError

    def _adopt_journals(self) -> None:
        """Take over `<journal_path>.<pid>` files whose process is gone (or is this process's pid, reused)."""
        base = self._journal_base
        assert base is not None
        adopted = []
        for path in base.parent.glob(base.name + ".*"):
            pid = path.name[len(base.name) + 1:]
            if not pid.isdigit() or path == self._journal_path or (int(pid) != os.getpid() and _alive(int(pid))):
                continue
            self._load_journal(path)
            adopted.append(path)
        if self._journal_path is not None and self._journal_path.exists() and self._journal_path != base:
            self._load_journal(self._journal_path)  # this pid's file, left by an earlier process with the same pid
        if adopted or self._journal:
            with self._journal_lock:
                self._rewrite_journal_file()  # the adopted entries are in our file before theirs go
        for path in adopted:
            path.unlink(missing_ok=True)
        if adopted:
            log.warning("adopted the ledger journals of finished processes: %s", ", ".join(map(str, adopted)))

    # -- script calls and their replies ---------------------------------------------------------

    def _cached(self, scopes: Sequence[Scope], now: float) -> list[Balance] | None:
        if self._max_age <= 0:
            return None
        cache, max_age, ids, out = self._cache, self._max_age, self._ids, []
        for s in scopes:
            hit = cache.get(ids(s))
            if hit is None or now - hit[2] >= max_age:
                return None
            out.append(Balance(hit[0], hit[1], s.limit))
        return out

    def _balances_call(self, scopes: Sequence[Scope], now: float) -> _Call:
        sids = [self._ids(s) for s in scopes]
        return _Call("balances", [self.prefix, repr(now), *sids], sids, 0, now)

    @staticmethod
    def _balances_result(scopes: Sequence[Scope], reply: Sequence[int]) -> list[Balance]:
        return [Balance(reply[2 * i], reply[2 * i + 1], s.limit) for i, s in enumerate(scopes)]

    def _reserve_call(self, reservation_id: str, charges: Sequence[Charge], ttl_s: float) -> _Call:
        now = self._clock()
        exp = now + ttl_s
        margin = self._margin_s
        sweep = "0"
        if now >= self._next_sweep:
            self._next_sweep, sweep = now + 1.0, "1"
        record_pxat = exp + margin
        args: list[Any] = [self.prefix, reservation_id, repr(now), repr(exp), self._token(), 0, sweep, len(charges)]
        sids = []
        for scope, amount in charges:
            if type(amount) is not int or amount < 0:
                _amount(amount)
            end = scope.expires_at + margin
            if end > record_pxat:
                record_pxat = end
            sid = self._ids(scope)
            sids.append(sid)
            # A window decided in the past (replays, tests, late settlements) still lives `margin` from now.
            args += (sid, amount, scope.limit, int((end if end > now + margin else now + margin) * 1000))
        args[5] = int(record_pxat * 1000)  # a record lives as long as its longest-lived scope
        # The same scope twice reports per-charge views that are not the scope's state: not remembered.
        return _Call("reserve", args, sids if len(set(sids)) == len(sids) else None, 2, now)

    @staticmethod
    def _reserve_result(reservation_id: str, charges: Sequence[Charge], reply: Sequence[int]) -> ReserveResult:
        status = reply[0]
        if status == -1:
            raise ValueError(f"reservation id {reservation_id!r} was already used")
        balances = tuple(Balance(reply[2 * i + 2], reply[2 * i + 3], s.limit) for i, (s, _) in enumerate(charges))
        if status == 0:
            return ReserveResult(False, balances, reply[1] - 1)
        return ReserveResult(True, balances)

    def _settle_call(self, reservation_id: str, charges: tuple[Charge, ...], token: str) -> _Call:
        now = self._clock()
        floor = now + self._margin_s
        args: list[Any] = [self.prefix, reservation_id, token, self._settled_ms, len(charges)]
        sids = []
        for scope, amount in charges:
            end = scope.expires_at + self._margin_s
            sid = self._ids(scope)
            sids.append(sid)
            args += (sid, amount, int((end if end > floor else floor) * 1000))
        return _Call("settle", args, sids, 1, now)

    def _release_call(self, reservation_id: str) -> _Call:
        now = self._clock()
        return _Call("release", [self.prefix, reservation_id, repr(now)], None, -1, now)

    def _remember(self, call: _Call) -> None:
        """Balances a reply reported, as of when Redis ran the call (called by the sender, in order)."""
        reply, cache, seen_at = call.reply, self._cache, call.seen_at
        if call.offset < 0:  # release: (scope, spent, reserved) triples after the status
            for i in range(1, len(reply) - 2, 3):
                cache[_text(reply[i])] = (reply[i + 1], reply[i + 2], seen_at)
        elif call.sids is not None and len(reply) > call.offset:
            k = call.offset
            for sid in call.sids:
                cache[sid] = (reply[k], reply[k + 1], seen_at)
                k += 2
        if len(cache) > 100_000:
            cache.clear()  # a long-lived worker sees new windows every day; old ones are dead weight

    def _token(self) -> str:
        # Tells a retried call from another call with the same reservation id; unique per process and fork.
        return next(self._tokens)

    def _checked(self, charges: Sequence[Charge]) -> tuple[Charge, ...]:
        """Charges validated now (not at replay time), with their scopes as the store names them,
        which is also what a journal keeps: no plain key when scopes are hashed."""
        for _, amount in charges:
            _amount(amount)
        return self._ids.stored(charges)  # type: ignore[return-value]

    # -- outages ----------------------------------------------------------------------------

    def _fail_fast(self) -> None:
        if self._retry_at and time.monotonic() < self._retry_at:
            raise StateUnavailable(f"Redis ledger unavailable; next attempt in {self._retry_at - time.monotonic():.2f}s")

    def _failed(self, exc: BaseException) -> None:
        with self._state_lock:
            self._failures += 1
            delay = min(self._backoff_max, self._backoff_base * 2 ** min(self._failures - 1, 16))
            self._retry_at = time.monotonic() + delay * random.uniform(0.5, 1.0)
            first = self._failures == 1
        if first:
            log.warning("Redis ledger unreachable (%s); failing fast with backoff until it answers", exc)

    def _recovered(self) -> bool:
        """Forget the outage; True when there was one."""
        with self._state_lock:
            was = self._failures
            self._failures, self._retry_at = 0, 0.0
        if was:
            log.warning("Redis ledger reachable again after %d failed attempts", was)
        return bool(was)

    def _after_send(self, batch: list[_Call]) -> bool:
        """Backoff bookkeeping and the cache after a batch; True when Redis answered after an outage."""
        failure = None
        for call in batch:
            if call.error is None:
                if call.reply is not None and (call.sids is not None or call.offset < 0):
                    self._remember(call)
            elif failure is None and isinstance(call.error, _UNAVAILABLE):
                failure = call.error
        if failure is not None:
            self._failed(failure)
            return False
        return bool(self._failures) and self._recovered()

    @staticmethod
    def _raise_for(call: _Call) -> Any:
        if call.error is not None:
            if isinstance(call.error, _UNAVAILABLE):
                raise StateUnavailable(f"Redis ledger unavailable: {call.error}") from call.error
            raise call.error
        return call.reply

    # -- journal ----------------------------------------------------------------------------

    @property
    def journal_size(self) -> int:
        """Settlements and releases waiting for Redis."""
        return len(self._journal)

    def _journal_add(self, entry: _Entry, cause: BaseException) -> None:
        """Keep an entry Redis did not take (room permitting) and have the replay deliver it."""
        with self._journal_lock:
            full = len(self._journal) >= self._journal_max
            if full:
                self.journal_overflow += 1
                log.error("ledger journal full (%d entries): %s of %s NOT recorded; charges: %s (cause: %s)",
                          self._journal_max, entry[0], entry[1], describe_charges((s.id, a) for s, a in entry[3]), cause)
            else:
                self._journal.append(entry)
                self.journaled_total += 1
                if self._journal_path is not None:
                    with self._journal_path.open("a", encoding="utf-8") as f:
                        f.write(_encode_entry(entry) + "\n")
        if full:
            telemetry.record_event("policy_engine.ledger.journal_overflow", {"policy_engine.reservation_id": entry[1]})
        else:
            telemetry.record_event("policy_engine.ledger.journaled", {"policy_engine.journal.kind": entry[0]})
        self._start_flusher()

    def _start_flusher(self) -> None:
        raise NotImplementedError

    def _journal_replay(self) -> Generator[_Call, Any, int]:
        """Delivering the journal, oldest entry first, written once for both ledgers: yields each script call
        to run (resumed with its reply, or a `RedisError` thrown in); returns how many entries were delivered.
        A `StateUnavailable` (Redis still unreachable) ends it with the rest kept."""
        delivered = 0
        with self._state_lock:
            self._retry_at = 0.0  # asked to try now: skip what is left of the backoff
        while (entry := self._journal_head()) is not None:
            kind, rid, token, charges = entry
            try:
                yield self._settle_call(rid, charges, token) if kind == "settle" else self._release_call(rid)
            except RedisError as exc:
                self._journal_undeliverable(entry, exc)
            self._journal_done(entry)
            delivered += 1
        if delivered:
            log.info("delivered %d journaled ledger entries", delivered)
        return delivered

    def _journal_head(self) -> _Entry | None:
        with self._journal_lock:
            return self._journal[0] if self._journal else None

    def _journal_done(self, entry: _Entry) -> None:
        with self._journal_lock:
            if self._journal and self._journal[0] is entry:
                self._journal.popleft()
            if not self._journal:
                self._rewrite_journal_file()

    def _journal_undeliverable(self, entry: _Entry, exc: BaseException) -> None:
        # Not an outage: replaying this entry can never succeed. Say so loudly and move on.
        log.error("dropping journaled %s of %s after error %s; charges: %s", entry[0], entry[1], exc, describe_charges((s.id, a) for s, a in entry[3]))
        telemetry.record_event("policy_engine.ledger.journal_dropped", {"policy_engine.error": str(exc)})

    def _load_journal(self, path: Path) -> None:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                self._journal.append(_decode_entry(line))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("%s:%d: unreadable journal line kept out of replay (%s): %r", path, number, exc, line)

    def _rewrite_journal_file(self) -> None:
        if self._journal_path is None:
            return
        tmp = self._journal_path.with_suffix(self._journal_path.suffix + ".tmp")
        tmp.write_text("".join(_encode_entry(e) + "\n" for e in self._journal), encoding="utf-8")
        os.replace(tmp, self._journal_path)

    def _closing_with_journal(self) -> None:
        log.error("closing with %d journaled ledger entries undelivered%s", len(self._journal),
                  f" (kept in {self._journal_path})" if self._journal_path else " (lost)")

    def _commands(self, calls: list[_Call]) -> list[tuple[Any, ...]]:
        shas = self._shas
        return [("EVALSHA", shas[c.name], 0, *c.args) for c in calls]


def _parse_into(calls: list[_Call], replies: Sequence[Any]) -> None:
    for call, reply in zip(calls, replies):
        if isinstance(reply, _ReplyErrorTypes):
            call.error = reply if isinstance(reply, RedisError) else _reply_error(str(reply))
        else:
            call.reply, call.error = reply, None


_ReplyErrorTypes: tuple[type, ...] = (RedisError,) + ((_hiredis.ReplyError,) if _hiredis is not None else ())


class RedisLedger(_RedisLedgerCore[redis_lib.Redis], Ledger):
    """Budgets shared by every process and machine pointing at one Redis primary.

    `client` is a `redis.Redis` you configured; otherwise one is built from `url`
    with `timeout_s` for connecting and for each reply, and a single immediate retry
    on a dropped connection (scripts are idempotent per call, so a retry whose first
    attempt ran is harmless). The scripts build their keys from `prefix`, so on Redis
    Cluster give a hash-tagged prefix such as `{pe}:` to keep all keys in one slot.
    Safe to share between threads, and across a fork: a forked child opens its own
    connection, makes call tokens of its own and keeps its own journal (`policy_engine._fork`).

    `journal_path` keeps the outage journal in a file too, so a worker restarted during an
    outage still delivers what it had not. A child forked from the process that made the
    ledger journals to `<journal_path>.<pid>`; whoever opens the ledger (or forks) next
    adopts the files of processes that are gone and delivers them.

    `hash_scopes` stores budget keys (tenant, user, ...) hashed in Redis and in the journal:
    True for SHA-256, or a secret (str or bytes) for HMAC-SHA256; every worker on the
    prefix must use the same setting (see `policy_engine.ledger._keys`).
    """

    def _default_client(self, url: str, timeout_s: float) -> redis_lib.Redis:
        return redis_lib.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            health_check_interval=0,
        )

    def _open(self) -> None:
        try:
            self._ids_reply(self._record_ids())
        except _UNAVAILABLE:
            pass  # checked by the first batch that reaches Redis
        self._batch_lock = threading.Lock()
        self._leading = False
        self._buffer = bytearray(65536)
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._flusher: threading.Thread | None = None
        if self._journal:
            self._start_flusher()

    # -- the Ledger interface ---------------------------------------------------------------

    def balances(self, scopes: Sequence[Scope]) -> list[Balance]:
        now = self._clock()
        cached = self._cached(scopes, now)
        if cached is not None:
            return cached
        return self._balances_result(scopes, self._run(self._balances_call(scopes, now)))

    def reserve(self, reservation_id: str, charges: Sequence[Charge], *, ttl_s: float) -> ReserveResult:
        return self._reserve_result(reservation_id, charges, self._run(self._reserve_call(reservation_id, charges, ttl_s)))

    def settle(self, reservation_id: str, charges: Sequence[Charge]) -> bool:
        """As the interface says; during an outage the settlement is journaled and True returned
        (the engine settles each decision once; a replay of an already-recorded one changes nothing)."""
        charges = self._checked(charges)
        token = self._token()
        try:
            return self._run(self._settle_call(reservation_id, charges, token))[0] == 1
        except StateUnavailable as exc:
            self._journal_add(("settle", reservation_id, token, charges), exc)
            return True

    def release(self, reservation_id: str) -> bool:
        """As the interface says; during an outage the release is journaled and False returned
        (nothing was freed yet; the reservation also expires on its own)."""
        try:
            return self._run(self._release_call(reservation_id))[0] == 1
        except StateUnavailable as exc:
            self._journal_add(("release", reservation_id, "", ()), exc)
            return False

    def expire(self, now: float | None = None) -> int:
        """Drop every reservation expired by `now` (they also go lazily as the fleet reserves)."""
        at = repr(self._clock() if now is None else now)
        total = 0
        while True:
            dropped = self._run(_Call("expire", [self.prefix, at, _EXPIRE_BATCH]))
            total += dropped
            if dropped < _EXPIRE_BATCH:
                break
        self._cache.clear()  # the script reports a count, not the balances it changed
        return total

    def close(self) -> None:
        """Try once more to deliver the journal, stop the replay thread, close the connections."""
        if self._journal:
            try:
                self.flush_journal()
            except StateUnavailable:
                self._closing_with_journal()
        self._closed.set()
        self._wake.set()
        if self._flusher is not None:
            self._flusher.join(timeout=2)
        if self._connection is not None:
            self._connection.disconnect()
        self.client.close()

    # -- journal ----------------------------------------------------------------------------

    def flush_journal(self) -> int:
        """Deliver journaled entries now, oldest first; returns how many were delivered.

        Raises `StateUnavailable` (after keeping the rest) when Redis is still unreachable.
        """
        steps = self._journal_replay()
        try:
            call = next(steps)
            while True:
                try:
                    reply = self._run(call)
                except RedisError as exc:
                    call = steps.throw(exc)
                else:
                    call = steps.send(reply)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def _start_flusher(self) -> None:
        with self._journal_lock:
            if self._flusher is not None and self._flusher.is_alive():
                self._wake.set()
                return
            self._flusher = threading.Thread(target=self._flush_loop, name="policy-engine-ledger-journal", daemon=True)
            self._flusher.start()

    def _flush_loop(self) -> None:
        while not self._closed.is_set():
            wait = max(self._retry_at - time.monotonic(), self._backoff_base)
            self._wake.wait(wait)
            self._wake.clear()
            if self._closed.is_set():
                return
            if time.monotonic() < self._retry_at:
                continue
            try:
                self.flush_journal()
            except StateUnavailable:
                continue
            except Exception:  # noqa: BLE001 - the thread must outlive any surprise; the entries stay
                log.exception("ledger journal replay failed")
                continue
            with self._journal_lock:
                if not self._journal:
                    self._flusher = None
                    return

    # -- plumbing ---------------------------------------------------------------------------

    def _run(self, call: _Call) -> Any:
        """One script call. Concurrent callers share round trips: whoever finds no call in flight
        sends its own at once; calls that arrive meanwhile queue up and go together as one
        pipeline when it returns (group commit), so threads add throughput instead of GIL churn."""
        if self._retry_at:
            self._fail_fast()
        with self._batch_lock:
            self._queue.append(call)
            lead = not self._leading
            if lead:
                self._leading = True
            else:
                # A bare lock, taken now and released by the leader: cheaper than an Event.
                call.event = threading.Lock()
                call.event.acquire()
        if not lead:
            # Long enough for the batch in flight and then ours, each bounded by the socket timeout.
            if not call.event.acquire(timeout=2 * self._timeout_s + 0.5):
                with self._batch_lock:
                    if not call.lead:
                        if call in self._queue:
                            self._queue.remove(call)  # never sent
                        raise StateUnavailable("Redis ledger unavailable: no reply in time")
            lead = call.lead
        if lead:
            self._lead()
        if call.error is not None:
            return self._raise_for(call)
        return call.reply

    def _renew_transport(self) -> None:
        # A forked child must not talk on its parent's socket (their replies would interleave), nor wait on
        # a lead some parent thread held at fork time; the parent's replay thread did not come along.
        # (redis-py's own pool renews itself in a child: it checks the pid.)
        self._batch_lock = threading.Lock()
        self._leading = False
        self._wake, self._closed = threading.Event(), threading.Event()
        self._flusher = None
        if self._journal:
            self._start_flusher()

    def _lead(self) -> None:
        with self._batch_lock:
            batch, self._queue = self._queue, []
        try:
            self._send(batch)
        except BaseException as exc:  # whatever happens, the waiters must wake and someone must lead
            for call in batch:
                if call.error is None and call.reply is None:
                    call.error = exc
        with self._batch_lock:
            if self._queue:
                # Hand over to the oldest waiter: it is awake next anyway, and we return at once.
                successor = self._queue[0]
                successor.lead = True
                successor.event.release()
            else:
                self._leading = False
        for call in batch:
            if call.event is not None and not call.lead:
                call.event.release()

    def _send(self, batch: list[_Call]) -> None:
        try:
            if not self._ids_checked:
                self._ids_reply(self._record_ids())
            for name in {c.name for c in batch if c.name not in self._shas}:
                self._load(name)
            try:
                self._roundtrip(batch)
            except RedisConnectionError:
                # A connection that died since its last use (a restarted Redis): one fresh try.
                # Safe even if the first attempt ran: every script is idempotent per call token.
                self._roundtrip(batch)
            stale = [c for c in batch if isinstance(c.error, NoScriptError)]
            if stale:
                # A restarted (or flushed) Redis forgot the scripts: load them once more.
                for name in {c.name for c in stale}:
                    self._load(name)
                self._roundtrip(stale)
        except _UNAVAILABLE as exc:
            for call in batch:
                call.error = exc
        if self._after_send(batch) and self._journal:
            self._start_flusher()

    def _roundtrip(self, calls: list[_Call]) -> None:
        """All the calls in one write and one read, on a connection of our own.

        Below redis-py's command layer on purpose: its per-command machinery costs more
        than the script itself, and the batch needs per-reply errors anyway. redis-py
        still connects (TLS, AUTH, SELECT, HELLO); with hiredis installed the bytes are
        packed and parsed by it directly."""
        connection = self._connection
        if connection is None:
            # Only the leader sends, one batch at a time: one connection is enough.
            pool = self.client.connection_pool
            connection = self._connection = pool.connection_class(**pool.connection_kwargs)
        commands = self._commands(calls)
        if _hiredis is None or self._plain:
            self._roundtrip_redis_py(connection, calls, commands)
            return
        try:
            if connection._sock is None:
                connection.connect()
                self._reader = _hiredis.Reader()
            sock = connection._sock
            pack = _hiredis.pack_command
            sock.sendall(b"".join([pack(c) for c in commands]))
            reader, buffer, replies, wanted = self._reader, self._buffer, [], len(calls)
            while len(replies) < wanted:
                reply = reader.gets()
                if reply is False:
                    size = sock.recv_into(buffer)
                    if not size:
                        raise RedisConnectionError("Redis closed the connection")
                    reader.feed(buffer, 0, size)
                    continue
                replies.append(reply)
        except BaseException as exc:
            connection.disconnect()  # mid-reply: nothing more can be read from it; reconnects on next use
            if isinstance(exc, TimeoutError):  # socket.timeout
                raise RedisTimeoutError(f"no reply from Redis within {self._timeout_s}s") from exc
            if isinstance(exc, OSError):
                raise RedisConnectionError(f"Redis connection failed: {exc}") from exc
            raise
        _parse_into(calls, replies)

    @staticmethod
    def _roundtrip_redis_py(connection: Any, calls: list[_Call], commands: list[tuple[Any, ...]]) -> None:
        packed = connection.pack_commands(commands)
        try:
            connection.send_packed_command(packed, check_health=False)
            for call in calls:
                try:
                    call.reply, call.error = connection.read_response(), None
                except ResponseError as exc:  # the reply was an error; the connection is fine
                    call.error = exc
        except BaseException:
            connection.disconnect()
            raise

    def _load(self, name: str) -> str:
        sha = self.client.script_load(_SCRIPTS[name])
        self._shas[name] = sha
        return sha


class AsyncRedisLedger(_RedisLedgerCore[redis_asyncio.Redis], AsyncLedger):
    """`RedisLedger` for asyncio: the same scripts, keys, guarantees and outage behaviour, awaited.

    Use it from one event loop. Calls made while a batch is in flight go together in the
    next one, on one connection of its own (group commit, as the threaded ledger does).
    `client` is a `redis.asyncio.Redis` you configured, otherwise one is built from `url`.
    The journal of an outage is replayed by a task on the loop of the call that filled it;
    `await close()` tries once more to deliver it.
    """

    def _default_client(self, url: str, timeout_s: float) -> redis_asyncio.Redis:
        return redis_asyncio.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                            health_check_interval=0)

    def _open(self) -> None:
        self._sender: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False

    def _renew_transport(self) -> None:
        # The parent's tasks belong to its loop; a journal the child adopted is replayed from its first call.
        # redis.asyncio's pool does not renew itself in a child (redis-py's sync pool does): a client of the
        # child's own, with the same settings, so no pooled connection of the parent's is ever used here.
        # The inherited client is kept, never closed, so its sockets are not shut under the parent.
        self._sender = self._flusher = None
        self._wake = None
        pool = self.client.connection_pool
        _INHERITED_CLIENTS.append(self.client)
        self.client = redis_asyncio.Redis(connection_pool=type(pool)(
            connection_class=pool.connection_class, max_connections=pool.max_connections, **pool.connection_kwargs))

    # -- the AsyncLedger interface ----------------------------------------------------------

    async def balances(self, scopes: Sequence[Scope]) -> list[Balance]:
        now = self._clock()
        cached = self._cached(scopes, now)
        if cached is not None:
            return cached
        return self._balances_result(scopes, await self._run(self._balances_call(scopes, now)))

    async def reserve(self, reservation_id: str, charges: Sequence[Charge], *, ttl_s: float) -> ReserveResult:
        reply = await self._run(self._reserve_call(reservation_id, charges, ttl_s))
        return self._reserve_result(reservation_id, charges, reply)

    async def settle(self, reservation_id: str, charges: Sequence[Charge]) -> bool:
        """As `RedisLedger.settle`: during an outage the settlement is journaled and True returned."""
        charges = self._checked(charges)
        token = self._token()
        try:
            return (await self._run(self._settle_call(reservation_id, charges, token)))[0] == 1
        except StateUnavailable as exc:
            self._journal_add(("settle", reservation_id, token, charges), exc)
            return True

    async def release(self, reservation_id: str) -> bool:
        """As `RedisLedger.release`: during an outage the release is journaled and False returned."""
        try:
            return (await self._run(self._release_call(reservation_id)))[0] == 1
        except StateUnavailable as exc:
            self._journal_add(("release", reservation_id, "", ()), exc)
            return False

    async def expire(self, now: float | None = None) -> int:
        """Drop every reservation expired by `now` (they also go lazily as the fleet reserves)."""
        at = repr(self._clock() if now is None else now)
        total = 0
        while True:
            dropped = await self._run(_Call("expire", [self.prefix, at, _EXPIRE_BATCH]))
            total += dropped
            if dropped < _EXPIRE_BATCH:
                break
        self._cache.clear()
        return total

    async def close(self) -> None:
        """Try once more to deliver the journal, stop the replay task, close the connections."""
        if self._journal:
            try:
                await self.flush_journal()
            except StateUnavailable:
                self._closing_with_journal()
        self._closed = True
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
            try:
                await self._flusher
            except asyncio.CancelledError:
                pass
        if self._sender is not None and not self._sender.done():
            await asyncio.wait([self._sender], timeout=2 * self._timeout_s + 0.5)
        if self._connection is not None:
            await self._connection.disconnect()
        await self.client.aclose()

    # -- journal ----------------------------------------------------------------------------

    async def flush_journal(self) -> int:
        """Deliver journaled entries now, oldest first; returns how many were delivered.

        Raises `StateUnavailable` (after keeping the rest) when Redis is still unreachable.
        """
        steps = self._journal_replay()
        try:
            call = next(steps)
            while True:
                try:
                    reply = await self._run(call)
                except RedisError as exc:
                    call = steps.throw(exc)
                else:
                    call = steps.send(reply)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def _start_flusher(self) -> None:
        if self._closed:
            return
        if self._flusher is not None and not self._flusher.done():
            if self._wake is not None:
                self._wake.set()
            return
        self._wake = asyncio.Event()
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(), name="policy-engine-ledger-journal")

    async def _flush_loop(self) -> None:
        assert self._wake is not None
        while not self._closed and self._journal:
            wait = max(self._retry_at - time.monotonic(), self._backoff_base)
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            if self._closed or time.monotonic() < self._retry_at:
                continue
            try:
                await self.flush_journal()
            except StateUnavailable:
                continue
            except Exception:  # noqa: BLE001 - the task must outlive any surprise; the entries stay
                log.exception("ledger journal replay failed")

    # -- plumbing ---------------------------------------------------------------------------

    async def _run(self, call: _Call) -> Any:
        """One script call; calls made while a batch is in flight go together in the next one."""
        if self._retry_at:
            self._fail_fast()
        call.event = asyncio.get_running_loop().create_future()
        self._queue.append(call)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_queued())
        await call.event
        if call.error is not None:
            return self._raise_for(call)
        return call.reply

    async def _send_queued(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                await self._send(batch)
            except BaseException as exc:  # whatever happens, the callers must wake
                for call in batch:
                    if call.error is None and call.reply is None:
                        call.error = exc if isinstance(exc, Exception) else RedisConnectionError(repr(exc))
                if not isinstance(exc, Exception):
                    for call in batch + self._queue:
                        if not call.event.done():
                            call.event.set_result(None)
                    raise
            for call in batch:
                if not call.event.done():  # a caller cancelled meanwhile has a done future
                    call.event.set_result(None)

    async def _send(self, batch: list[_Call]) -> None:
        try:
            # Script loads and one reconnect at most, each bounded by the socket timeout.
            await asyncio.wait_for(self._deliver(batch), self._timeout_s * 2 + 0.5)
        except _UNAVAILABLE as exc:
            if isinstance(exc, asyncio.TimeoutError) and self._connection is not None:
                await self._connection.disconnect()  # a reply may still come: never read it as another's
            for call in batch:
                call.error = exc
        recovered = self._after_send(batch)
        # A journal inherited from `journal_path` starts its replay here: there was no loop to start it on
        # at construction.
        if self._journal and (recovered or self._flusher is None):
            self._start_flusher()

    async def _deliver(self, batch: list[_Call]) -> None:
        if not self._ids_checked:  # (construction cannot await: the first batch checks)
            self._ids_reply(await self._record_ids())
        for name in {c.name for c in batch if c.name not in self._shas}:
            self._shas[name] = await self.client.script_load(_SCRIPTS[name])
        try:
            await self._roundtrip(batch)
        except RedisConnectionError:
            await self._roundtrip(batch)  # a connection that died since its last use: one fresh try
        stale = [c for c in batch if isinstance(c.error, NoScriptError)]
        if stale:  # a restarted (or flushed) Redis forgot the scripts
            for name in {c.name for c in stale}:
                self._shas[name] = await self.client.script_load(_SCRIPTS[name])
            await self._roundtrip(stale)

    async def _roundtrip(self, calls: list[_Call]) -> None:
        connection = self._connection
        if connection is None:
            pool = self.client.connection_pool
            connection = self._connection = pool.connection_class(**pool.connection_kwargs)
        commands = self._commands(calls)
        try:
            if _hiredis is None or self._plain:
                if not connection.is_connected:
                    await connection.connect()
                await connection.send_packed_command(connection.pack_commands(commands), check_health=False)
                for call in calls:
                    try:
                        call.reply, call.error = await connection.read_response(), None
                    except ResponseError as exc:  # the reply was an error; the connection is fine
                        call.error = exc
                return
            if not connection.is_connected:
                await connection.connect()
                self._reader = _hiredis.Reader()
            pack = _hiredis.pack_command
            connection._writer.write(b"".join([pack(c) for c in commands]))
            await connection._writer.drain()
            reader, stream, replies, wanted = self._reader, connection._reader, [], len(calls)
            while len(replies) < wanted:
                reply = reader.gets()
                if reply is False:
                    data = await asyncio.wait_for(stream.read(65536), self._timeout_s)
                    if not data:
                        raise RedisConnectionError("Redis closed the connection")
                    reader.feed(data)
                    continue
                replies.append(reply)
        except BaseException as exc:
            await connection.disconnect()
            if isinstance(exc, asyncio.TimeoutError):
                raise RedisTimeoutError(f"no reply from Redis within {self._timeout_s}s") from exc
            if isinstance(exc, OSError):
                raise RedisConnectionError(f"Redis connection failed: {exc}") from exc
            raise
        _parse_into(calls, replies)


_ERROR_PREFIXES: tuple[tuple[str, type[RedisError]], ...] = (
    ("NOSCRIPT", NoScriptError),
    ("OOM", OutOfMemoryError),
    ("READONLY", ReadOnlyError),
    ("LOADING", BusyLoadingError),
    ("BUSY", BusyLoadingError),  # a script is running past its time limit: unavailable for now
    ("MASTERDOWN", ClusterDownError),
    ("CLUSTERDOWN", ClusterDownError),
    ("TRYAGAIN", TryAgainError),
)


def _reply_error(message: str) -> RedisError:
    for prefix, kind in _ERROR_PREFIXES:
        if message.startswith(prefix):
            return kind(message)
    return ResponseError(message)


def _decode_state(reply: Mapping[Any, Any] | Sequence[Any]) -> FastRateLimit:
    pairs = reply.items() if isinstance(reply, Mapping) else zip(reply[::2], reply[1::2])
    state = FastRateLimit()
    for raw_name, raw_value in pairs:
        name, value = _text(raw_name), _text(raw_value)
        spec = _RATELIMIT_FIELDS.get(name)
        if spec is None or value == "":
            continue
        # int fields (limits, remaining counts) stay ints; times are floats.
        setattr(state, name, int(value) if name in _RATELIMIT_COUNTS and "." not in value else float(value))
    return state


def _amount(amount: int) -> int:
    if type(amount) is not int or amount < 0:
        raise ValueError(f"a charge must be a non-negative int of micro-dollars, got {amount!r}")
    return amount


def _text(value: Any) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _encode_entry(entry: tuple[str, str, str, tuple[Charge, ...]]) -> str:
    # Scopes as the store names them ([id, limit, expires_at, amount]): hashed keys stay hashed on disk.
    kind, rid, token, charges = entry
    return json.dumps({"kind": kind, "rid": rid, "token": token, "charges": [
        [s.id, s.limit, s.expires_at, a] for s, a in charges]})


def _decode_entry(line: str) -> tuple[str, str, str, tuple[Charge, ...]]:
    data = json.loads(line)
    if data["kind"] not in ("settle", "release"):
        raise ValueError(f"unknown kind {data['kind']!r}")
    charges: list[Any] = []
    for item in data["charges"]:
        if len(item) == 6:  # written before scopes were stored by id: [budget, key, window, limit, expires_at, amount]
            b, k, w, lim, exp, a = item
            charges.append((Scope(str(b), str(k), str(w), int(lim), float(exp)), _amount(a)))
        else:
            sid, lim, exp, a = item
            charges.append((StoredScope(str(sid), int(lim), float(exp)), _amount(a)))
    return data["kind"], str(data["rid"]), str(data["token"]), tuple(charges)


# -- fleet rate-limit state -------------------------------------------------------------------

# ARGV: prefix, account, ttl ms, observed_at, then (field, value) pairs; '' is "unknown".
# -> the merged state, HGETALL-style. The newest observation of the account wins; the 429
# times only ever move forward (one worker's 429 is every worker's).
_RATELIMIT_MERGE = r"""
local key = ARGV[1] .. 'rl:' .. ARGV[2]
local newer = tonumber(ARGV[4]) >= tonumber(redis.call('HGET', key, 'observed_at') or '-1')
for i = 5, #ARGV, 2 do
  local name, value = ARGV[i], ARGV[i + 1]
  if name == 'last_429_at' or name == 'retry_after_until' then
    local current, new = tonumber(redis.call('HGET', key, name) or ''), tonumber(value)
    if new and (not current or new > current) then redis.call('HSET', key, name, value) end
  elseif newer then
    redis.call('HSET', key, name, value)
  end
end
if newer then redis.call('HSET', key, 'observed_at', ARGV[4]) end
redis.call('PEXPIRE', key, ARGV[3])
return redis.call('HGETALL', key)
"""
_RATELIMIT_FIELDS = {f.name: f for f in fields(FastRateLimit)}
# Named, not read from the field types: a compiled dataclass does not keep them.
_RATELIMIT_COUNTS = frozenset(("input_tokens_limit", "input_tokens_remaining", "output_tokens_limit", "output_tokens_remaining"))


class RedisRateLimitStore(RateLimitStore):
    """Fast rate-limit state shared by a fleet: what any worker learns from a response, all see.

    Decisions never wait for Redis: `snapshot`/`exhausted` read this process's copy.
    A background thread pushes local observations (`record`, `update`) and pulls the
    accounts this process uses every `refresh_s`, merging by observation time (the
    newest response wins; a 429's `retry-after` is never shortened). When Redis cannot
    be reached the store keeps working on what this process sees, reports a
    `policy_engine.ratelimit.state_unavailable` event, and catches up once it answers.
    """

    def __init__(
        self,
        client: redis_lib.Redis | None = None,
        *,
        url: str = "redis://127.0.0.1:6379/0",
        prefix: str = "pe:",
        refresh_s: float = 0.5,
        timeout_s: float = 0.25,
        ttl_s: float = 3_600.0,
        max_accounts: int = 10_000,
        clock: Callable[[], float] = time.time,
        start: bool = True,
    ) -> None:
        super().__init__(clock=clock)
        if refresh_s <= 0:
            raise ValueError(f"refresh_s must be > 0, got {refresh_s!r}")
        self.client = client or redis_lib.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))
        self.prefix = prefix
        self._ttl_ms = int(ttl_s * 1000)
        self._refresh_s = refresh_s
        self._max_accounts = max_accounts
        self._dirty: set[str] = set()
        self._watched: dict[str, None] = {}  # insertion-ordered set of accounts to pull
        self._sync_lock = threading.Lock()
        self._sha: str | None = None
        self._down = False
        self._syncer = Periodic(self.sync, refresh_s, "policy-engine-ratelimit-sync", log) if start else None
        self._fork_renewal = renew_in_child(self._after_fork)

    def _after_fork(self) -> None:
        # The state learnt so far stays (it is the fleet's anyway); the locks and the Redis pool (redis-py
        # renews it on its own) are the child's own, and so is the sync thread (`Periodic`). Unpushed news
        # stay dirty: the child pushes them too, and merging by observation time makes that harmless.
        # (The base class renews its own lock.)
        self._sync_lock = threading.Lock()

    def update(self, account: str, now: float | None = None, **values: Any) -> None:
        super().update(account, now, **values)
        self._touch(account, dirty=True)

    def record(self, account: str, headers: Mapping[str, str] | Any, *, rate_limited: bool = False,
               now: float | None = None) -> bool:
        recorded = super().record(account, headers, rate_limited=rate_limited, now=now)
        if recorded:
            self._touch(account, dirty=True)
        return recorded

    def snapshot(self, account: str, now: float) -> dict[str, Any]:
        self._touch(account)
        return super().snapshot(account, now)

    def exhausted(self, account: str, input_tokens: int, now: float) -> bool:
        self._touch(account)
        return super().exhausted(account, input_tokens, now)

    def sync(self) -> bool:
        """Push this process's news and pull the fleet's now; False when Redis did not answer."""
        with self._sync_lock:
            with self._lock:
                dirty, self._dirty = self._dirty, set()
                pushes = [(a, asdict(self._state[a])) for a in dirty if a in self._state]
                pulls = [a for a in self._watched if a not in dirty]
            for attempt in (1, 2):
                try:
                    pipe = self.client.pipeline(transaction=False)
                    sha = self._sha or self._load()
                    for account, state in pushes:
                        pairs = [x for name, value in state.items() if name != "observed_at"
                                 for x in (name, "" if value is None else repr(value))]
                        pipe.evalsha(sha, 0, self.prefix, account, self._ttl_ms, repr(state["observed_at"]), *pairs)
                    for account in pulls:
                        pipe.hgetall(self.prefix + "rl:" + account)
                    replies = pipe.execute()
                    break
                except NoScriptError:
                    self._load()  # a restarted Redis forgot the script
                    if attempt == 2:
                        return self._retry(dirty)
                except _UNAVAILABLE as exc:
                    return self._retry(dirty, exc)
            for account, reply in zip([a for a, _ in pushes] + pulls, replies):
                if reply:
                    self._merge(account, _decode_state(reply))
            if self._down:
                self._down = False
                log.warning("fleet rate-limit state reachable again")
            return True

    def close(self) -> None:
        """Stop the sync thread after one last push."""
        if self._syncer is not None:
            self._syncer.stop()
        self.sync()
        self.client.close()

    def _retry(self, dirty: set[str], exc: BaseException | None = None) -> bool:
        with self._lock:
            self._dirty |= dirty  # pushed next time: nothing learnt is lost
        if exc is not None and not self._down:
            self._down = True
            log.warning("fleet rate-limit state unreachable (%s); deciding on this process's own view", exc)
            telemetry.record_event("policy_engine.ratelimit.state_unavailable", {"policy_engine.error": str(exc)})
        return False

    def _load(self) -> str:
        self._sha = self.client.script_load(_RATELIMIT_MERGE)
        return self._sha

    def _merge(self, account: str, remote: FastRateLimit) -> None:
        with self._lock:
            local = self._state.get(account)
            merged = remote if local is None or remote.observed_at > local.observed_at else local
            for name in ("last_429_at", "retry_after_until"):
                values = [v for v in (getattr(remote, name), getattr(local, name) if local else None) if v is not None]
                setattr(merged, name, max(values) if values else None)
            self._state[account] = merged

    def _touch(self, account: str, *, dirty: bool = False) -> None:
        if account in self._watched and not dirty:
            return
        with self._lock:
            if account not in self._watched:
                if len(self._watched) >= self._max_accounts:
                    self._watched.pop(next(iter(self._watched)))  # the oldest account stops being pulled
                self._watched[account] = None
            if dirty:
                self._dirty.add(account)
