"""A ledger shared by a fleet: budgets in Redis, every change one Lua script.

Layout (all keys under `prefix`; ids are binary-safe, scope ids contain \\x1f):

    s:<scope>   string "<spent> <reserved> <v>" (v counts changes); expires `window_margin_s` after the window
    z:<scope>   zset   "<rid>|<amount>" -> expiry (epoch s): dropped lazily inside the scripts
    r:<rid>     string msgpack ['R', exp, token, scope, amount, ...] while reserved, then ['S', token]
                       for `settled_memory_s` once settled (so settling is idempotent)

Why it is exact: a reservation's amount counts in a scope's `reserved` exactly while
its id is a member of that scope's zset. Every path that removes the member
(expiry, release, settle) subtracts the amount in the same script, and scripts run
atomically, so no interleaving of workers can count it twice or lose it.

Round trips: `reserve` and `settle` are one EVALSHA each. `balances` answers from
what this process last saw (every script returns the balances it touched, ordered
by the scope's change counter) when that is younger than `balances_max_age_s`, so a
busy worker pays two round trips per request; enforcement never uses the cache.
Calls made while another thread's call is in flight queue up and go together in
one write on the process's own connection (group commit): throughput grows with
concurrency instead of with connections. With `hiredis` installed the batches are
packed and parsed by it directly.

Clocks: reservation expiry uses the caller's clock (`clock`, default `time.time`),
so the fleet's clocks should agree to well within the reservation TTL (NTP does);
key TTLs use Redis's own clock and only collect garbage.

When Redis cannot be reached in `timeout_s`, `reserve`/`balances` raise
`StateUnavailable` (the engine then applies the policy's `on_state_unavailable`),
and further calls fail fast until a backoff delay has passed. `settle` and `release`
never raise for an outage: they go to a bounded journal that a background thread
replays once Redis answers again (settling is idempotent, so replays are safe).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import redis as redis_lib
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
from . import Balance, Charge, Ledger, ReserveResult, Scope

__all__ = ["RedisLedger", "RedisRateLimitStore"]

log = logging.getLogger("policy_engine.ledger.redis")

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,  # also BusyLoadingError (a restart loading its data) and auth errors
    RedisTimeoutError,
    OutOfMemoryError,
    ReadOnlyError,  # a failover left us talking to a replica
    ClusterDownError,
    TryAgainError,
    OSError,
)

_LUA_COMMON = r"""
local P = ARGV[1]

-- A scope is one string "spent reserved v": one GET and one SET per scope per script.
local function load_scope(sid)
  local raw = redis.call('GET', P .. 's:' .. sid)
  if not raw then return {0, 0, 0, false} end
  local spent, reserved, v = string.match(raw, '^(%-?%d+) (%-?%d+) (%d+)$')
  return {tonumber(spent), tonumber(reserved), tonumber(v), true}
end

-- Write a scope back, its change counter bumped; a new scope lives until its window ends (pxat).
local function store_scope(sid, c, pxat)
  c[3] = c[3] + 1
  local value = string.format('%d %d %d', c[1], c[2], c[3])
  if c[4] then
    redis.call('SET', P .. 's:' .. sid, value, 'KEEPTTL')
  elseif pxat then
    redis.call('SET', P .. 's:' .. sid, value, 'PXAT', pxat)
    c[4] = true
  end
end

-- Take the scope's reservations that expired by now out of its reserved amount; returns their members.
local function expire_into(sid, c, now)
  local z = P .. 'z:' .. sid
  local stale = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  if #stale == 0 then return stale end
  for _, m in ipairs(stale) do c[2] = c[2] - tonumber(string.match(m, '|(%d+)$')) end
  redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
  return stale
end

-- A live reservation is {'R', exp, token, scope, amount, ...}; a settled one {'S', token}.
local function read_record(rid)
  local raw = redis.call('GET', P .. 'r:' .. rid)
  if not raw then return nil end
  return cmsgpack.unpack(raw)
end

-- Take a reservation's members out of its scopes' zsets; returns scope -> amount they still held.
-- A member still present is an amount still counted: removing it is what uncounts it, exactly once.
local function unhold(rid, rec)
  local held = {}
  for i = 4, #rec, 2 do
    local sid, a = rec[i], rec[i + 1]
    if redis.call('ZREM', P .. 'z:' .. sid, rid .. '|' .. a) == 1 then held[sid] = (held[sid] or 0) + tonumber(a) end
  end
  return held
end

-- A scope as it stands now: its expired reservations dropped (and written back when there were any).
local function sweep(sid, now)
  local c = load_scope(sid)
  local stale = expire_into(sid, c, now)
  if #stale > 0 then store_scope(sid, c, nil) end
  return c, stale
end

-- Give back what was held in scopes the caller does not write itself.
local function give_back(held)
  local touched = {}
  for sid, a in pairs(held) do
    local c = load_scope(sid)
    if c[4] then
      c[2] = c[2] - a
      store_scope(sid, c, nil)
      touched[#touched + 1] = {sid, c}
    end
  end
  return touched
end
"""

# ARGV: prefix, rid, now, exp, token, record expiry (ms), n, then n x (scope, amount, limit, scope expiry ms)
# -> {status, failed index (1-based, 0 = none), n x (spent, reserved, v)}; status 1 ok, 0 does not fit, -1 id used
_RESERVE = _LUA_COMMON + r"""
local rid, now, exp, tok, record_pxat, n = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
local function arg(i, k) return ARGV[8 + 4 * (i - 1) + k] end  -- k: 0 scope, 1 amount, 2 limit, 3 expiry
local rec = read_record(rid)
if rec then
  if rec[1] == 'S' then return {-1, 0} end
  if rec[3] == tok then
    -- This very call, retried after its reply was lost: it already succeeded.
    local out = {1, 0}
    for i = 1, n do
      local c = load_scope(arg(i, 0))
      out[#out + 1] = c[1]; out[#out + 1] = c[2]; out[#out + 1] = c[3]
    end
    return out
  end
  if tonumber(rec[2]) > now then return {-1, 0} end
  give_back(unhold(rid, rec))  -- expired: the id is free again
end
local scopes, views, failed = {}, {}, 0
for i = 1, n do
  local sid = arg(i, 0)
  local c = scopes[sid]
  if not c then
    c = sweep(sid, now)
    scopes[sid] = c
  end
  views[i] = {c[1], c[2]}
  local amount = tonumber(arg(i, 1))
  -- A zero charge always fits, even a scope already over its limit.
  if failed == 0 and amount > 0 and c[1] + c[2] + amount > tonumber(arg(i, 2)) then failed = i end
end
if failed > 0 then
  local out = {0, failed}
  for i = 1, n do
    out[#out + 1] = views[i][1]; out[#out + 1] = views[i][2]; out[#out + 1] = scopes[arg(i, 0)][3]
  end
  return out
end
-- The same scope twice in one reservation holds the sum, under one member.
local sums, order = {}, {}
for i = 1, n do
  local sid = arg(i, 0)
  if not sums[sid] then sums[sid] = 0; order[#order + 1] = i end
  sums[sid] = sums[sid] + tonumber(arg(i, 1))
end
local record = {'R', exp, tok}
for _, i in ipairs(order) do
  local sid, pxat = arg(i, 0), arg(i, 3)
  local c = scopes[sid]
  local a = string.format('%d', sums[sid])
  c[2] = c[2] + sums[sid]
  store_scope(sid, c, pxat)
  local z = P .. 'z:' .. sid
  redis.call('ZADD', z, exp, rid .. '|' .. a)
  redis.call('PEXPIREAT', z, pxat)
  record[#record + 1] = sid; record[#record + 1] = a
end
redis.call('SET', P .. 'r:' .. rid, cmsgpack.pack(record), 'PXAT', record_pxat)
local out = {1, 0}
for i = 1, n do
  out[#out + 1] = views[i][1]; out[#out + 1] = views[i][2] + tonumber(arg(i, 1)); out[#out + 1] = scopes[arg(i, 0)][3]
end
return out
"""

# ARGV: prefix, rid, now, token, settled memory (ms), n, then n x (scope, amount, scope expiry ms)
# -> {1 first settle | 0 already settled, n x (spent, reserved, v)}
_SETTLE = _LUA_COMMON + r"""
local rid, now, tok, keep, n = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], tonumber(ARGV[6])
local function arg(i, k) return ARGV[7 + 3 * (i - 1) + k] end  -- k: 0 scope, 1 amount, 2 expiry
local rec = read_record(rid)
if rec and rec[1] == 'S' then
  local out = {0}
  if rec[2] == tok then out[1] = 1 end  -- this very call, retried after its reply was lost
  for i = 1, n do
    local c = load_scope(arg(i, 0))
    out[#out + 1] = c[1]; out[#out + 1] = c[2]; out[#out + 1] = c[3]
  end
  return out
end
local held = {}
if rec then held = unhold(rid, rec) end
local scopes, order = {}, {}
for i = 1, n do
  local sid = arg(i, 0)
  local c = scopes[sid]
  if not c then
    c = load_scope(sid)
    expire_into(sid, c, now)
    c[2] = c[2] - (held[sid] or 0)
    held[sid] = nil
    scopes[sid] = c
    order[#order + 1] = i
  end
  c[1] = c[1] + tonumber(arg(i, 1))
end
for _, i in ipairs(order) do store_scope(arg(i, 0), scopes[arg(i, 0)], arg(i, 2)) end
give_back(held)
redis.call('SET', P .. 'r:' .. rid, cmsgpack.pack({'S', tok}), 'PX', keep)
local out = {1}
for i = 1, n do
  local c = scopes[arg(i, 0)]
  out[#out + 1] = c[1]; out[#out + 1] = c[2]; out[#out + 1] = c[3]
end
return out
"""

# ARGV: prefix, rid, now -> {1 released | 0 nothing live, then (scope, spent, reserved, v) per scope given back}
_RELEASE = _LUA_COMMON + r"""
local rid, now = ARGV[2], tonumber(ARGV[3])
local rec = read_record(rid)
if not rec or rec[1] ~= 'R' then return {0} end
local held = unhold(rid, rec)
redis.call('DEL', P .. 'r:' .. rid)
local out = {0}
if next(held) ~= nil and tonumber(rec[2]) > now then out[1] = 1 end
for _, t in ipairs(give_back(held)) do
  out[#out + 1] = t[1]; out[#out + 1] = t[2][1]; out[#out + 1] = t[2][2]; out[#out + 1] = t[2][3]
end
return out
"""

# ARGV: prefix, now, scopes... -> n x (spent, reserved, v)
_BALANCES = _LUA_COMMON + r"""
local now = tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV do
  local c = sweep(ARGV[i], now)
  out[#out + 1] = c[1]; out[#out + 1] = c[2]; out[#out + 1] = c[3]
end
return out
"""

# ARGV: prefix, now, scopes... -> ids of the reservations that expired there
_EXPIRE = _LUA_COMMON + r"""
local now = tonumber(ARGV[2])
local gone = {}
for i = 3, #ARGV do
  local _, stale = sweep(ARGV[i], now)
  for _, m in ipairs(stale) do gone[#gone + 1] = string.match(m, '^(.*)|%d+$') end
end
return gone
"""

_SCRIPTS = {"reserve": _RESERVE, "settle": _SETTLE, "release": _RELEASE, "balances": _BALANCES, "expire": _EXPIRE}


class RedisLedger(Ledger):
    """Budgets shared by every process and machine pointing at one Redis primary.

    `client` is a `redis.Redis` you configured; otherwise one is built from `url`
    with `timeout_s` for connecting and for each reply, and a single immediate retry
    on a dropped connection (scripts are idempotent per call, so a retry whose first
    attempt ran is harmless). The scripts build their keys from `prefix`, so on Redis
    Cluster give a hash-tagged prefix such as `{pe}:` to keep all keys in one slot.
    Safe to share between threads, and across a fork (the child opens its own connection).

    `journal_path` keeps the outage journal in a file too (one file per process), so a
    worker restarted during an outage still delivers what it had not.
    """

    def __init__(
        self,
        client: redis_lib.Redis | None = None,
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
    ) -> None:
        if journal_max < 1:
            raise ValueError("journal_max must be at least 1")
        if client is None:
            client = redis_lib.Redis.from_url(
                url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
                health_check_interval=0,
            )
        self.client = client
        self.prefix = prefix
        self._clock = clock
        self._settled_ms = int(settled_memory_s * 1000)
        self._margin_s = window_margin_s
        self._max_age = balances_max_age_s
        self._shas: dict[str, str] = {}
        self._timeout_s = timeout_s
        self._token_prefix = os.urandom(6).hex() + "-"
        self._tokens = itertools.count()
        self._batch_lock = threading.Lock()
        self._queue: list[_Call] = []
        self._leading = False
        self._connection: Any = None
        self._pid = os.getpid()
        self._plain = False  # True: pack and parse through redis-py even when hiredis is installed
        self._reader: Any = None
        self._buffer = bytearray(65536)
        self._cache: dict[str, tuple[int, int, int, float]] = {}  # sid -> (v, spent, reserved, seen at)
        self._cache_lock = threading.Lock()
        # Outage state: fail fast until _retry_at, doubling the wait up to backoff_max_s.
        self._state_lock = threading.Lock()
        self._failures = 0
        self._retry_at = 0.0
        self._backoff_base = backoff_base_s
        self._backoff_max = backoff_max_s
        # Settlements and releases Redis did not take, oldest first.
        self._journal: deque[tuple[str, str, str, tuple[Charge, ...]]] = deque()
        self._journal_lock = threading.Lock()
        self._journal_max = journal_max
        self._journal_path = Path(journal_path) if journal_path is not None else None
        self.journal_overflow = 0
        """Entries the journal had no room for (each one logged at ERROR with its amounts)."""
        self.journaled_total = 0
        """Entries ever journaled by this instance (delivered or not)."""
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._flusher: threading.Thread | None = None
        if self._journal_path is not None and self._journal_path.exists():
            self._load_journal(self._journal_path)
        if self._journal:
            self._start_flusher()

    # -- the Ledger interface ---------------------------------------------------------------

    def balances(self, scopes: Sequence[Scope]) -> list[Balance]:
        now = self._clock()
        if self._max_age > 0:
            with self._cache_lock:
                hits = [self._cache.get(s.id) for s in scopes]
            if all(h is not None and now - h[3] < self._max_age for h in hits):
                return [Balance(h[1], h[2], s.limit) for h, s in zip(hits, scopes)]  # type: ignore[index]
        reply = self._run("balances", [self.prefix, repr(now), *(s.id for s in scopes)])
        views = self._remember([s.id for s in scopes], reply, 0, now)
        return [Balance(spent, reserved, s.limit) for (spent, reserved), s in zip(views, scopes)]

    def reserve(self, reservation_id: str, charges: Sequence[Charge], *, ttl_s: float) -> ReserveResult:
        now = self._clock()
        exp = now + ttl_s
        args: list[Any] = [self.prefix, reservation_id, repr(now), repr(exp), self._token(),
                           int((exp + self._margin_s) * 1000), len(charges)]
        for scope, amount in charges:
            args += [scope.id, _amount(amount), scope.limit, self._scope_pexpireat(scope)]
        reply = self._run("reserve", args)
        status = int(reply[0])
        if status == -1:
            raise ValueError(f"reservation id {reservation_id!r} was already used")
        views = self._remember([s.id for s, _ in charges], reply, 2, now)
        balances = tuple(Balance(spent, reserved, s.limit) for (spent, reserved), (s, _) in zip(views, charges))
        if status == 0:
            return ReserveResult(False, balances, int(reply[1]) - 1)
        return ReserveResult(True, balances)

    def settle(self, reservation_id: str, charges: Sequence[Charge]) -> bool:
        """As the interface says; during an outage the settlement is journaled and True returned
        (the engine settles each decision once; a replay of an already-recorded one changes nothing)."""
        charges = tuple(charges)
        for _, amount in charges:
            _amount(amount)  # refuse bad input now, not at replay time
        token = self._token()
        try:
            return self._settle_now(reservation_id, charges, token)
        except StateUnavailable as exc:
            self._journal_add(("settle", reservation_id, token, charges), exc)
            return True

    def release(self, reservation_id: str) -> bool:
        """As the interface says; during an outage the release is journaled and False returned
        (nothing was freed yet; the reservation also expires on its own)."""
        try:
            return self._release_now(reservation_id)
        except StateUnavailable as exc:
            self._journal_add(("release", reservation_id, "", ()), exc)
            return False

    def expire(self, now: float | None = None) -> int:
        """Drop every scope's expired reservations now (they also go lazily as scopes are used).

        Walks the prefix's zsets with SCAN: maintenance, not a request-path call."""
        at = repr(self._clock() if now is None else now)
        marker = _glob_escape(self.prefix) + "z:*"
        skip = len(self.prefix.encode("utf-8")) + 2
        dropped: set[bytes] = set()
        try:
            batch: list[bytes] = []
            for key in self.client.scan_iter(match=marker, count=500):
                batch.append(key[skip:])
                if len(batch) == 200:
                    dropped.update(self._run("expire", [self.prefix, at, *batch]))
                    batch = []
            if batch:
                dropped.update(self._run("expire", [self.prefix, at, *batch]))
        except _UNAVAILABLE as exc:
            self._failed(exc)
            raise StateUnavailable(f"Redis ledger unavailable: {exc}") from exc
        with self._cache_lock:
            self._cache.clear()  # the script reports ids, not the balances it changed
        return len(dropped)

    def close(self) -> None:
        """Try once more to deliver the journal, stop the replay thread, close the connections."""
        if self._journal:
            try:
                self.flush_journal()
            except StateUnavailable:
                log.error("closing with %d journaled ledger entries undelivered%s", len(self._journal),
                          f" (kept in {self._journal_path})" if self._journal_path else " (lost)")
        self._closed.set()
        self._wake.set()
        if self._flusher is not None:
            self._flusher.join(timeout=2)
        if self._connection is not None:
            self._connection.disconnect()
        self.client.close()

    # -- journal ----------------------------------------------------------------------------

    @property
    def journal_size(self) -> int:
        """Settlements and releases waiting for Redis."""
        return len(self._journal)

    def flush_journal(self) -> int:
        """Deliver journaled entries now, oldest first; returns how many were delivered.

        Raises `StateUnavailable` (after keeping the rest) when Redis is still unreachable.
        """
        delivered = 0
        with self._state_lock:
            self._retry_at = 0.0  # asked to try now: skip what is left of the backoff
        while True:
            with self._journal_lock:
                if not self._journal:
                    break
                kind, rid, token, charges = self._journal[0]
            try:
                if kind == "settle":
                    self._settle_now(rid, charges, token)
                else:
                    self._release_now(rid)
            except StateUnavailable:
                raise
            except RedisError as exc:
                # Not an outage: replaying this entry can never succeed. Say so loudly and move on.
                log.error("dropping journaled %s of %s after error %s; charges: %s", kind, rid, exc, _describe(charges))
                telemetry.record_event("policy_engine.ledger.journal_dropped", {"policy_engine.error": str(exc)})
            with self._journal_lock:
                if self._journal and self._journal[0][1] == rid:
                    self._journal.popleft()
                if not self._journal:
                    self._rewrite_journal_file()
            delivered += 1
        if delivered:
            log.info("delivered %d journaled ledger entries", delivered)
        return delivered

    def _journal_add(self, entry: tuple[str, str, str, tuple[Charge, ...]], cause: BaseException) -> None:
        with self._journal_lock:
            if len(self._journal) >= self._journal_max:
                self.journal_overflow += 1
                log.error("ledger journal full (%d entries): %s of %s NOT recorded; charges: %s (cause: %s)",
                          self._journal_max, entry[0], entry[1], _describe(entry[3]), cause)
                telemetry.record_event("policy_engine.ledger.journal_overflow", {"policy_engine.reservation_id": entry[1]})
                return
            self._journal.append(entry)
            self.journaled_total += 1
            if self._journal_path is not None:
                with self._journal_path.open("a", encoding="utf-8") as f:
                    f.write(_encode_entry(entry) + "\n")
        telemetry.record_event("policy_engine.ledger.journaled", {"policy_engine.journal.kind": entry[0]})
        self._start_flusher()

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

    # -- plumbing ---------------------------------------------------------------------------

    def _settle_now(self, rid: str, charges: tuple[Charge, ...], token: str) -> bool:
        now = self._clock()
        args: list[Any] = [self.prefix, rid, repr(now), token, self._settled_ms, len(charges)]
        for scope, amount in charges:
            args += [scope.id, amount, self._scope_pexpireat(scope)]
        reply = self._run("settle", args)
        self._remember([s.id for s, _ in charges], reply, 1, now)
        return int(reply[0]) == 1

    def _release_now(self, rid: str) -> bool:
        now = self._clock()
        reply = self._run("release", [self.prefix, rid, repr(now)])
        rows = reply[1:]
        sids = [_text(rows[i]) for i in range(0, len(rows), 4)]
        flat = [x for i in range(0, len(rows), 4) for x in rows[i + 1:i + 4]]
        self._remember(sids, flat, 0, now)
        return int(reply[0]) == 1

    def _scope_pexpireat(self, scope: Scope) -> int:
        # A window decided in the past (replays, tests, late settlements) still lives `margin` from now.
        return int((max(scope.expires_at, self._clock()) + self._margin_s) * 1000)

    def _remember(self, sids: Sequence[str], reply: Sequence[Any], start: int, now: float) -> list[tuple[int, int]]:
        views = []
        with self._cache_lock:
            for i, sid in enumerate(sids):
                spent, reserved, version = (int(x) for x in reply[start + 3 * i:start + 3 * i + 3])
                views.append((spent, reserved))
                cached = self._cache.get(sid)
                if cached is None or version >= cached[0]:
                    self._cache[sid] = (version, spent, reserved, now)
            if len(self._cache) > 100_000:
                self._cache.clear()  # a long-lived worker sees new windows every day; old ones are dead weight
        return views

    def _run(self, name: str, args: Sequence[Any]) -> Any:
        """One script call. Concurrent callers share round trips: whoever finds no call in flight
        sends its own at once; calls that arrive meanwhile queue up and go together as one
        pipeline when it returns (group commit), so threads add throughput instead of GIL churn."""
        if self._pid != os.getpid():
            self._forked()
        if self._retry_at and time.monotonic() < self._retry_at:
            raise StateUnavailable(f"Redis ledger unavailable; next attempt in {self._retry_at - time.monotonic():.2f}s")
        call = _Call(name, args)
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
            if not call.event.acquire(timeout=2 * self._timeout_s + 0.5):  # type: ignore[union-attr]
                with self._batch_lock:
                    if not call.lead:
                        if call in self._queue:
                            self._queue.remove(call)  # never sent
                        raise StateUnavailable("Redis ledger unavailable: no reply in time")
            lead = call.lead
        if lead:
            self._lead()
        if call.error is not None:
            if isinstance(call.error, _UNAVAILABLE):
                raise StateUnavailable(f"Redis ledger unavailable: {call.error}") from call.error
            raise call.error
        return call.reply

    def _forked(self) -> None:
        # A forked child must not talk on its parent's socket (their replies would interleave),
        # nor wait on a lead some parent thread held at fork time.
        self._pid = os.getpid()
        self._batch_lock = threading.Lock()
        self._queue, self._leading = [], False
        self._connection = self._reader = None
        self.client.connection_pool.reset()

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
                successor.event.release()  # type: ignore[union-attr]
            else:
                self._leading = False
        for call in batch:
            if call.event is not None and not call.lead:
                call.event.release()

    def _send(self, batch: list[_Call]) -> None:
        try:
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
        failures = [c.error for c in batch if c.error is not None and isinstance(c.error, _UNAVAILABLE)]
        if failures:
            self._failed(failures[0])
        elif self._failures:
            self._recovered()

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
        commands = [("EVALSHA", self._sha(c.name), 0, *c.args) for c in calls]
        if _hiredis is None or self._plain:
            self._roundtrip_redis_py(connection, calls, commands)
            return
        try:
            if connection._sock is None:
                connection.connect()
                self._reader = _hiredis.Reader()
            sock = connection._sock
            sock.sendall(b"".join(map(_hiredis.pack_command, commands)))
            reader, buffer, got = self._reader, self._buffer, 0
            while got < len(calls):
                reply = reader.gets()
                if reply is False:
                    size = sock.recv_into(buffer)
                    if not size:
                        raise RedisConnectionError("Redis closed the connection")
                    reader.feed(buffer, 0, size)
                    continue
                call = calls[got]
                if isinstance(reply, _hiredis.ReplyError):
                    call.error = _reply_error(str(reply))
                else:
                    call.reply, call.error = reply, None
                got += 1
        except BaseException as exc:
            connection.disconnect()  # mid-reply: nothing more can be read from it; reconnects on next use
            if isinstance(exc, TimeoutError):  # socket.timeout
                raise RedisTimeoutError(f"no reply from Redis within {self._timeout_s}s") from exc
            if isinstance(exc, OSError):
                raise RedisConnectionError(f"Redis connection failed: {exc}") from exc
            raise

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

    def _token(self) -> str:
        # Tells a retried call from another call with the same reservation id; unique per process run.
        return f"{self._token_prefix}{next(self._tokens)}"

    def _sha(self, name: str) -> str:
        return self._shas.get(name) or self._load(name)

    def _load(self, name: str) -> str:
        sha = self.client.script_load(_SCRIPTS[name])
        self._shas[name] = sha
        return sha

    def _failed(self, exc: BaseException) -> None:
        with self._state_lock:
            self._failures += 1
            delay = min(self._backoff_max, self._backoff_base * 2 ** min(self._failures - 1, 16))
            self._retry_at = time.monotonic() + delay * random.uniform(0.5, 1.0)
            first = self._failures == 1
        if first:
            log.warning("Redis ledger unreachable (%s); failing fast with backoff until it answers", exc)

    def _recovered(self) -> None:
        with self._state_lock:
            was = self._failures
            self._failures, self._retry_at = 0, 0.0
        if was:
            log.warning("Redis ledger reachable again after %d failed attempts", was)
        if self._journal:
            self._start_flusher()


class _Call:
    __slots__ = ("name", "args", "reply", "error", "event", "lead")

    def __init__(self, name: str, args: Sequence[Any]) -> None:
        self.name, self.args = name, args
        self.reply: Any = None
        self.error: BaseException | None = None
        self.event: Any = None  # a held threading.Lock while a follower waits
        self.lead = False


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
        setattr(state, name, int(value) if "int" in str(spec.type) and "." not in value else float(value))
    return state


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def _amount(amount: int) -> int:
    if type(amount) is not int or amount < 0:
        raise ValueError(f"a charge must be a non-negative int of micro-dollars, got {amount!r}")
    return amount


def _text(value: Any) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


def _describe(charges: Sequence[Charge]) -> str:
    return ", ".join(f"{s.budget}/{s.key}/{s.window}={a}" for s, a in charges) or "-"


def _encode_entry(entry: tuple[str, str, str, tuple[Charge, ...]]) -> str:
    kind, rid, token, charges = entry
    return json.dumps({"kind": kind, "rid": rid, "token": token, "charges": [
        [s.budget, s.key, s.window, s.limit, s.expires_at, a] for s, a in charges]})


def _decode_entry(line: str) -> tuple[str, str, str, tuple[Charge, ...]]:
    data = json.loads(line)
    if data["kind"] not in ("settle", "release"):
        raise ValueError(f"unknown kind {data['kind']!r}")
    charges = tuple((Scope(str(b), str(k), str(w), int(lim), float(exp)), _amount(a)) for b, k, w, lim, exp, a in data["charges"])
    return data["kind"], str(data["rid"]), str(data["token"]), charges


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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._loop, name="policy-engine-ratelimit-sync", daemon=True)
            self._thread.start()

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
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
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

    def _loop(self) -> None:
        while not self._stop.wait(self._refresh_s):
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - the thread must outlive any surprise
                log.exception("fleet rate-limit sync failed")
