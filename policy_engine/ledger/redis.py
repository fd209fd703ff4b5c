"""A ledger shared by a fleet: budgets in Redis, every change one Lua script.

Layout (all keys under `prefix`; ids are binary-safe, scope ids contain \\x1f):

    s:<scope>   hash   spent, reserved, v (a change counter)
    z:<scope>   zset   "<rid>|<amount>" -> expiry (epoch s): lazily expired inside the scripts
    r:<rid>     hash   exp, tok, and scope -> amount for each scope the reservation holds money in
    d:<rid>     string the settle token: settling is idempotent for `settled_memory_s`
    exp         zset   reservation -> expiry, for `expire()` and an opportunistic trim

Why it is exact: a reservation's amount counts in a scope's `reserved` exactly while
its id is a member of that scope's zset. Every path that removes the member
(expiry, release, settle) subtracts the amount in the same script, and scripts run
atomically, so no interleaving of workers can count it twice or lose it.

Round trips: `reserve` and `settle` are one EVALSHA each. `balances` answers from
what this process last saw (every script returns the balances it touched, ordered
by the scope's change counter) when that is younger than `balances_max_age_s`, so a
busy worker pays two round trips per request; enforcement never uses the cache.

When Redis cannot be reached in `timeout_s`, `reserve`/`balances` raise
`StateUnavailable` (the engine then applies the policy's `on_state_unavailable`),
and further calls fail fast until a backoff delay has passed. `settle` and `release`
never raise for an outage: they go to a bounded journal that a background thread
replays once Redis answers again (settling is idempotent, so replays are safe).
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
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
    TimeoutError as RedisTimeoutError,
    TryAgainError,
)
from redis.retry import Retry

from .. import telemetry
from ..errors import StateUnavailable
from . import Balance, Charge, Ledger, ReserveResult, Scope

__all__ = ["RedisLedger"]

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

-- Drop the scope's reservations whose expiry is at or before now (members are rid|amount).
local function expire_scope(sid, now)
  local z = P .. 'z:' .. sid
  local stale = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  if #stale == 0 then return end
  local s = P .. 's:' .. sid
  local total = 0
  for _, m in ipairs(stale) do total = total + tonumber(string.match(m, '|(%d+)$')) end
  redis.call('HINCRBY', s, 'reserved', -total)
  redis.call('HINCRBY', s, 'v', 1)
  redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
end

-- Drop a reservation from every scope that still holds it; returns the scope ids it was held in.
local function drop(r)
  local rec = P .. 'r:' .. r
  local fields = redis.call('HGETALL', rec)
  local held = {}
  for i = 1, #fields, 2 do
    local sid = fields[i]
    if sid ~= 'exp' and sid ~= 'tok' then
      local a = fields[i + 1]
      -- Still a member = still counted: the amount leaves `reserved` exactly once.
      if redis.call('ZREM', P .. 'z:' .. sid, r .. '|' .. a) == 1 then
        redis.call('HINCRBY', P .. 's:' .. sid, 'reserved', '-' .. a)
        held[#held + 1] = sid
      end
    end
  end
  if #fields > 0 then redis.call('DEL', rec) end
  redis.call('ZREM', P .. 'exp', r)
  return held
end
"""

# ARGV: prefix, rid, now, exp, token, record expiry (ms), n, then n x (scope, amount, limit, scope expiry ms)
# -> {status, failed index (1-based, 0 = none), n x (spent, reserved, v)}; status 1 ok, 0 does not fit, -1 id reused
_RESERVE = _LUA_COMMON + r"""
local rid, now, exp, tok = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local record_pexpireat, n = ARGV[6], tonumber(ARGV[7])
local rec = P .. 'r:' .. rid
local held = redis.call('HMGET', rec, 'exp', 'tok')
if held[1] then
  if held[2] == tok then
    -- This very call, retried after its reply was lost: it already succeeded.
    local out = {1, 0}
    for i = 1, n do
      local v = redis.call('HMGET', P .. 's:' .. ARGV[8 + 4 * (i - 1)], 'spent', 'reserved', 'v')
      out[#out + 1] = v[1] or '0'; out[#out + 1] = v[2] or '0'; out[#out + 1] = v[3] or '0'
    end
    return out
  end
  if tonumber(held[1]) > now then return {-1, 0} end
  drop(rid)
end
if redis.call('EXISTS', P .. 'd:' .. rid) == 1 then return {-1, 0} end
-- Abandoned reservations of idle scopes go too, a few per call, so no cron job is needed.
for _, r in ipairs(redis.call('ZRANGEBYSCORE', P .. 'exp', '-inf', now, 'LIMIT', 0, 4)) do drop(r) end
local failed = 0
local views = {}
for i = 1, n do
  local base = 8 + 4 * (i - 1)
  local sid, amount, limit = ARGV[base], tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  expire_scope(sid, now)
  local v = redis.call('HMGET', P .. 's:' .. sid, 'spent', 'reserved', 'v')
  local spent, reserved = tonumber(v[1] or '0'), tonumber(v[2] or '0')
  views[i] = {v[1] or '0', v[2] or '0', v[3] or '0'}
  -- A zero charge always fits, even over the limit.
  if failed == 0 and amount > 0 and spent + reserved + amount > limit then failed = i end
end
if failed > 0 then
  local out = {0, failed}
  for i = 1, n do
    out[#out + 1] = views[i][1]; out[#out + 1] = views[i][2]; out[#out + 1] = views[i][3]
  end
  return out
end
local record = {'exp', exp, 'tok', tok}
local amounts = {}
local out = {1, 0}
for i = 1, n do
  local base = 8 + 4 * (i - 1)
  local sid, amount = ARGV[base], ARGV[base + 1]
  local s = P .. 's:' .. sid
  if amount ~= '0' then
    amounts[sid] = (amounts[sid] or 0) + tonumber(amount)
    redis.call('HINCRBY', s, 'reserved', amount)
  end
  local version = redis.call('HINCRBY', s, 'v', 1)
  if version == 1 then redis.call('PEXPIREAT', s, ARGV[base + 3]) end
  -- As the interface says: each charge's balance as it stood, plus its own amount.
  out[#out + 1] = views[i][1]
  out[#out + 1] = string.format('%d', tonumber(views[i][2]) + tonumber(amount))
  out[#out + 1] = version
end
for i = 1, n do
  local base = 8 + 4 * (i - 1)
  local sid = ARGV[base]
  local total = amounts[sid]
  if total then
    -- The same scope twice in one reservation holds the sum, under one member.
    amounts[sid] = nil
    local z = P .. 'z:' .. sid
    local a = string.format('%d', total)
    redis.call('ZADD', z, exp, rid .. '|' .. a)
    redis.call('PEXPIREAT', z, ARGV[base + 3])
    record[#record + 1] = sid; record[#record + 1] = a
  end
end
redis.call('HSET', rec, unpack(record))
redis.call('PEXPIREAT', rec, record_pexpireat)
redis.call('ZADD', P .. 'exp', exp, rid)
return out
"""

# ARGV: prefix, rid, now, token, settled memory (ms), n, then n x (scope, amount, scope expiry ms)
# -> {1 first settle | 0 already settled, n x (spent, reserved, v)}
_SETTLE = _LUA_COMMON + r"""
local rid, now, tok, keep, n = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], tonumber(ARGV[6])
local d = P .. 'd:' .. rid
local done = redis.call('GET', d)
local out = {1}
if done then
  -- A retry of this very call (its reply was lost) still reports the first settle.
  if done ~= tok then out[1] = 0 end
  for i = 1, n do
    local v = redis.call('HMGET', P .. 's:' .. ARGV[7 + 3 * (i - 1)], 'spent', 'reserved', 'v')
    out[#out + 1] = v[1] or '0'; out[#out + 1] = v[2] or '0'; out[#out + 1] = v[3] or '0'
  end
  return out
end
drop(rid)
for i = 1, n do
  local base = 7 + 3 * (i - 1)
  local sid = ARGV[base]
  local s = P .. 's:' .. sid
  expire_scope(sid, now)
  local spent = redis.call('HINCRBY', s, 'spent', ARGV[base + 1])
  local version = redis.call('HINCRBY', s, 'v', 1)
  if version == 1 then redis.call('PEXPIREAT', s, ARGV[base + 2]) end
  out[#out + 1] = spent; out[#out + 1] = redis.call('HGET', s, 'reserved') or '0'; out[#out + 1] = version
end
redis.call('SET', d, tok, 'PX', keep)
return out
"""

# ARGV: prefix, rid, now -> {1 released | 0 none live, then (sid, spent, reserved, v) per scope it was held in}
_RELEASE = _LUA_COMMON + r"""
local rid, now = ARGV[2], tonumber(ARGV[3])
local exp = redis.call('HGET', P .. 'r:' .. rid, 'exp')
if not exp then return {0} end
local held = drop(rid)
local out = {0}
if #held > 0 and tonumber(exp) > now then out[1] = 1 end
for _, sid in ipairs(held) do
  local s = P .. 's:' .. sid
  local version = redis.call('HINCRBY', s, 'v', 1)
  local v = redis.call('HMGET', s, 'spent', 'reserved')
  out[#out + 1] = sid; out[#out + 1] = v[1] or '0'; out[#out + 1] = v[2] or '0'; out[#out + 1] = version
end
return out
"""

# ARGV: prefix, now, sids... -> n x (spent, reserved, v)
_BALANCES = _LUA_COMMON + r"""
local now = tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV do
  expire_scope(ARGV[i], now)
  local v = redis.call('HMGET', P .. 's:' .. ARGV[i], 'spent', 'reserved', 'v')
  out[#out + 1] = v[1] or '0'; out[#out + 1] = v[2] or '0'; out[#out + 1] = v[3] or '0'
end
return out
"""

# ARGV: prefix, now, batch -> number of reservations dropped
_EXPIRE = _LUA_COMMON + r"""
local now, batch = tonumber(ARGV[2]), tonumber(ARGV[3])
local stale = redis.call('ZRANGEBYSCORE', P .. 'exp', '-inf', now, 'LIMIT', 0, batch)
for _, r in ipairs(stale) do
  for _, sid in ipairs(drop(r)) do redis.call('HINCRBY', P .. 's:' .. sid, 'v', 1) end
end
return #stale
"""

_SCRIPTS = {"reserve": _RESERVE, "settle": _SETTLE, "release": _RELEASE, "balances": _BALANCES, "expire": _EXPIRE}


class RedisLedger(Ledger):
    """Budgets shared by every process and machine pointing at one Redis primary.

    `client` is a `redis.Redis` you configured; otherwise one is built from `url`
    with `timeout_s` for connecting and for each reply, and a single immediate retry
    on a dropped connection (scripts are idempotent per call, so a retry whose first
    attempt ran is harmless). On Redis Cluster give a hash-tagged `prefix` such as
    `{pe}:` so all keys share a slot.
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
        args: list[Any] = [self.prefix, reservation_id, repr(now), repr(exp), os.urandom(8).hex(),
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
        token = os.urandom(8).hex()
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
        at = repr(self._clock() if now is None else now)
        total = 0
        with self._cache_lock:
            self._cache.clear()  # the scripts below do not report which scopes they touched
        while True:
            dropped = int(self._run("expire", [self.prefix, at, 500]))
            total += dropped
            if dropped < 500:
                return total

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
        if self._retry_at and time.monotonic() < self._retry_at:
            raise StateUnavailable(f"Redis ledger unavailable; next attempt in {self._retry_at - time.monotonic():.2f}s")
        try:
            try:
                sha = self._shas.get(name) or self._load(name)
                reply = self.client.evalsha(sha, 0, *args)
            except NoScriptError:
                # A restarted (or flushed) Redis forgot the scripts: load once more.
                reply = self.client.evalsha(self._load(name), 0, *args)
        except _UNAVAILABLE as exc:
            self._failed(exc)
            raise StateUnavailable(f"Redis ledger unavailable: {exc}") from exc
        if self._failures:
            self._recovered()
        return reply

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
