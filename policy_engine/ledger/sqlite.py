"""The SQLite ledger: budgets that survive restarts and are shared by the processes of one machine.

    from policy_engine.ledger.sqlite import SqliteLedger
    engine = policy_engine.load("policy.yaml", ledger=SqliteLedger("/var/lib/app/ledger.db"))
    # or simply: policy_engine.load("policy.yaml", ledger_path="/var/lib/app/ledger.db")

Same semantics as `MemoryLedger` (see `policy_engine.ledger`), and:

* the file is in WAL mode; writes run in transactions that start with `BEGIN IMMEDIATE`,
  so the check-then-reserve of `reserve` cannot interleave with another process's and
  budgets hold across processes;
* writes of concurrent threads go together (group commit): while one transaction is
  being written, the calls that arrive queue up and run, one after the other, in the
  next one. A commit costs far more than the statements in it, so throughput grows with
  concurrency (across processes too: while SQLite's busy handler has one process wait
  for the file, that process's queue grows and its next transaction carries more);
* a settlement is committed before `settle` returns: a process killed at any point
  either recorded the whole settlement or none of it, never half;
* a reservation carries its expiry time and balances only count unexpired ones, so a
  reservation left behind by a killed process stops counting at its TTL even if no
  process ever sweeps it (`expire()` deletes such rows);
* when the file cannot be written (another process holds it past `busy_timeout_s`, a disk
  error, a read-only file), `reserve` and `balances` raise `StateUnavailable` (the engine
  applies the policy's `on_state_unavailable`), and `settle`/`release` never raise: they go to
  a bounded journal (`journal_max`) that the next transaction, a background thread (every
  second) or `close()` delivers first. Settling is idempotent, so a delivery that did land
  before its error changes nothing.

Money is stored as SQLite INTEGERs (64-bit): micro-dollars, exact.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import telemetry
from .._fork import Periodic, renew_in_child
from ..errors import StateUnavailable
from . import Balance, Charge, Ledger, ReserveResult, Scope
from ._keys import HashScopes, ScopeIds, describe_charges

__all__ = ["SqliteLedger"]

log = logging.getLogger("policy_engine.ledger.sqlite")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spend (
    scope TEXT PRIMARY KEY,
    amount INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_expiry ON reservations(expires_at);
CREATE TABLE IF NOT EXISTS holds (
    reservation TEXT NOT NULL,
    scope TEXT NOT NULL,
    amount INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS holds_scope ON holds(scope, expires_at);
CREATE INDEX IF NOT EXISTS holds_reservation ON holds(reservation);
CREATE TABLE IF NOT EXISTS settled (
    id TEXT PRIMARY KEY,
    forget_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS settled_forget ON settled(forget_at);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


_BALANCE = ("SELECT COALESCE((SELECT amount FROM spend WHERE scope = ?1), 0), "
            "COALESCE((SELECT SUM(amount) FROM holds WHERE scope = ?1 AND expires_at > ?2), 0)")
"""A scope's spend and what live reservations hold in it, in one statement."""

_USED = ("SELECT (SELECT expires_at FROM reservations WHERE id = ?1), "
         "EXISTS (SELECT 1 FROM settled WHERE id = ?1)")
"""When a reservation id's hold expires (NULL: none), and whether it was settled."""


_INHERITED: list[sqlite3.Connection] = []
"""Connections a forked child inherited: held, never used nor closed (see `SqliteLedger._after_fork`)."""


_Work = Callable[[sqlite3.Connection, float], Any]


_TRANSIENT = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_FULL", "SQLITE_READONLY", "SQLITE_CANTOPEN",
              "SQLITE_PROTOCOL")


def _unavailable(exc: sqlite3.OperationalError) -> bool:
    """Whether the file's state failed the call (locked past busy_timeout_s, a disk error, full, read-only), which
    passes, as opposed to an error of the statements (SQLITE_ERROR: a missing table), which never would."""
    name = getattr(exc, "sqlite_errorname", None)  # (Python 3.11 and later)
    return name is None or name.startswith(_TRANSIENT)


class _Entry:
    """A settlement or release the file did not take: the write to run again, and what to log if it never runs."""

    __slots__ = ("work", "described")

    def __init__(self, work: _Work, described: str) -> None:
        self.work, self.described = work, described


class _Op:
    """One write waiting for its transaction."""

    __slots__ = ("work", "now", "result", "error", "done", "lead")

    def __init__(self, work: Callable[[sqlite3.Connection, float], Any], now: float) -> None:
        self.work, self.now = work, now
        self.result: Any = None
        self.error: BaseException | None = None
        self.done: threading.Lock | None = None
        self.lead = False


class SqliteLedger(Ledger):
    """A ledger in one SQLite file, safe to share between threads and between processes.

    `settled_memory_s` is how long a settled reservation id is remembered (so a late
    duplicate settle is still a no-op); `spend_retention_s` how long spend of a finished
    window is kept after the window ends; `synchronous` is SQLite's durability setting
    (`NORMAL` survives a killed process; `FULL` also a power cut, at one fsync per write);
    `hash_scopes` stores budget keys (tenant, user, ...) hashed, not in plain text: True for
    SHA-256, or a secret (str or bytes) for HMAC-SHA256 (see `policy_engine.ledger._keys`).
    `totals()` then reports the hashed ids. `journal_max` bounds the settlements and releases
    kept in memory while the file cannot be written (see the module docstring).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        settled_memory_s: float = 86_400.0,
        spend_retention_s: float = 35 * 86_400.0,
        busy_timeout_s: float = 30.0,
        synchronous: str = "NORMAL",
        hash_scopes: HashScopes = False,
        journal_max: int = 100_000,
    ) -> None:
        if journal_max < 1:
            raise ValueError("journal_max must be at least 1")
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, got {synchronous!r}")
        self.path = str(path)
        self._clock = clock
        self._settled_memory_s = settled_memory_s
        self._spend_retention_s = spend_retention_s
        self._busy_timeout_s = busy_timeout_s
        self._synchronous = synchronous.upper()
        self._ids = ScopeIds(hash_scopes)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._next_sweep = 0.0
        self._queue_lock = threading.Lock()
        self._queue: list[_Op] = []
        self._writing = False
        # Settlements and releases the file did not take, oldest first. Only reservations made while
        # the file was writable, or decided standard during the outage, settle into it.
        self._journal: deque[_Entry] = deque()
        self._journal_lock = threading.Lock()
        self._journal_max = journal_max
        self.journal_overflow = 0
        """Entries the journal had no room for (each one logged at ERROR with its amounts)."""
        self.journal_delivered = 0
        """Entries the journal has delivered."""
        self._flusher: Periodic | None = None
        self._renewal = renew_in_child(self._after_fork)
        self._connect()

    # -- connection --------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_s * 1000)}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                conn.execute(statement)
            # The first ledger on the file sets how scopes are named; any other setting is refused.
            conn.execute("INSERT OR IGNORE INTO meta(name, value) VALUES ('scope_ids', ?)", (self._ids.fingerprint,))
            self._ids.check(conn.execute("SELECT value FROM meta WHERE name = 'scope_ids'").fetchone()[0], self.path)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            conn.close()
            raise
        self._conn = conn
        return conn

    def _after_fork(self) -> None:
        # Whatever a parent thread held, queued or was writing at fork time is not the child's to wait for;
        # its connection is not the child's either (_connect opens one). The inherited connection is kept,
        # never closed nor collected: closing it here could checkpoint and delete the parent's WAL file,
        # which SQLite forbids from a child ("do not carry a connection across fork()").
        if self._conn is not None:
            _INHERITED.append(self._conn)
        self._lock, self._queue_lock, self._queue, self._writing = threading.Lock(), threading.Lock(), [], False
        self._conn = None
        # The parent's journal stays the parent's to deliver (a second delivery would change nothing, but
        # would log as if it were the child's).
        self._journal_lock, self._journal = threading.Lock(), deque()

    def close(self) -> None:
        """Deliver the journal once more (logging at ERROR what cannot be), then close the connection."""
        flusher, self._flusher = self._flusher, None  # (a later journaled entry starts another)
        if flusher is not None:
            flusher.stop()
        if self._journal:
            try:
                self.flush_journal()
            except StateUnavailable as exc:
                with self._journal_lock:
                    left = list(self._journal)
                for entry in left:
                    log.error("closing with a journaled %s undelivered, NOT recorded if the process ends now: %s",
                              entry.described, exc)
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn = None

    # -- reads -------------------------------------------------------------------------

    def _balances(self, conn: sqlite3.Connection, scopes: Sequence[Scope], now: float) -> list[Balance]:
        execute, ids = conn.execute, self._ids
        return [Balance(*execute(_BALANCE, (ids(scope), now)).fetchone(), scope.limit) for scope in scopes]

    def balances(self, scopes: Sequence[Scope]) -> list[Balance]:
        """As the interface says; raises `StateUnavailable` when the file cannot be read."""
        now = self._clock()
        with self._lock:
            try:
                conn = self._connect()
                conn.execute("BEGIN")  # one snapshot for every scope
                try:
                    return self._balances(conn, scopes, now)
                finally:
                    conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if not _unavailable(exc):
                    raise
                raise StateUnavailable(f"SQLite ledger {self.path} cannot be read: {exc}") from exc

    def totals(self) -> dict[str, int]:
        """Settled spend per scope id (for tests and reports)."""
        with self._lock:
            return dict(self._connect().execute("SELECT scope, amount FROM spend").fetchall())

    # -- writes ------------------------------------------------------------------------

    def _write(self, work: Callable[[sqlite3.Connection, float], Any]) -> Any:
        """Run `work` in a write transaction, with whatever other threads queued meanwhile (group commit).

        Whoever finds no transaction being written writes one with its own call at once;
        calls that arrive meanwhile queue up and go together in the next transaction."""
        op = _Op(work, self._clock())
        with self._queue_lock:
            self._queue.append(op)
            lead = not self._writing
            if lead:
                self._writing = True
            else:
                op.done = threading.Lock()  # taken now, released by whoever ran the op
                op.done.acquire()
        if not lead:
            op.done.acquire()  # type: ignore[union-attr]
            lead = op.lead
        if lead:
            self._lead()
        if op.error is not None:
            raise op.error
        return op.result

    def _lead(self) -> None:
        with self._queue_lock:
            batch, self._queue = self._queue, []
        try:
            self._transaction(batch)
        except BaseException as exc:  # rolled back: nothing of the batch was recorded
            for op in batch:
                op.result, op.error = None, exc
        with self._queue_lock:
            if self._queue:
                # The oldest waiter writes the next transaction: it is woken next anyway.
                successor = self._queue[0]
                successor.lead = True
                successor.done.release()  # type: ignore[union-attr]
            else:
                self._writing = False
        for op in batch:
            if op.done is not None and not op.lead:
                op.done.release()

    def _transaction(self, batch: list[_Op]) -> None:
        with self._lock:
            conn = self._connect()
            conn.execute("BEGIN IMMEDIATE")
            try:
                journaled: list[_Entry] = []
                if self._journal:  # (almost always empty: no lock taken then)
                    with self._journal_lock:
                        journaled = list(self._journal)
                # Older than the batch: written first, in the same commit. They are the statements that failed
                # before (no constraint can fail them), so only the file's state can stop them again.
                for entry in journaled:
                    entry.work(conn, self._clock())
                for op in batch:
                    try:
                        op.result = op.work(conn, op.now)
                    except ValueError as exc:  # raised before the op wrote anything: the others stand
                        op.error = exc
                now = self._clock()
                if now >= self._next_sweep:
                    # Rows of expired reservations no longer count; delete them now and then.
                    self._next_sweep = now + 1.0
                    self._sweep(conn, now)
                conn.execute("COMMIT")
                if journaled:
                    with self._journal_lock:  # only a transaction's writer removes entries: the oldest are these
                        for _ in journaled:
                            self._journal.popleft()
                        self.journal_delivered += len(journaled)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def reserve(self, reservation_id: str, charges: Sequence[Charge], *, ttl_s: float) -> ReserveResult:
        """As the interface says; raises `StateUnavailable` when the file cannot be written."""
        def work(conn: sqlite3.Connection, now: float) -> ReserveResult:
            held_until, settled = conn.execute(_USED, (reservation_id,)).fetchone()
            if settled or (held_until is not None and held_until > now):
                raise ValueError(f"reservation id {reservation_id!r} was already used")
            balances = self._balances(conn, [s for s, _ in charges], now)
            for index, ((_, amount), balance) in enumerate(zip(charges, balances)):
                if amount > 0 and amount > balance.remaining:  # a zero charge always fits
                    return ReserveResult(False, tuple(balances), index)
            expires_at = now + ttl_s
            if held_until is not None:  # expired, not swept yet: the id is free again
                conn.execute("DELETE FROM holds WHERE reservation = ?", (reservation_id,))
            conn.execute("INSERT OR REPLACE INTO reservations(id, expires_at) VALUES (?, ?)", (reservation_id, expires_at))
            conn.executemany("INSERT INTO holds(reservation, scope, amount, expires_at) VALUES (?, ?, ?, ?)",
                             [(reservation_id, self._ids(scope), amount, expires_at) for scope, amount in charges])
            return ReserveResult(True, tuple(Balance(b.spent, b.reserved + a, b.limit) for b, (_, a) in zip(balances, charges)))

        return self._write_or_unavailable(work)  # type: ignore[no-any-return]

    def settle(self, reservation_id: str, charges: Sequence[Charge]) -> bool:
        """As the interface says; when the file cannot be written the settlement is journaled and True
        returned (the engine settles each decision once; a second delivery records nothing)."""
        def work(conn: sqlite3.Connection, now: float) -> bool:
            inserted = conn.execute("INSERT OR IGNORE INTO settled(id, forget_at) VALUES (?, ?)",
                                    (reservation_id, now + self._settled_memory_s)).rowcount
            if not inserted:
                return False
            conn.execute("DELETE FROM holds WHERE reservation = ?", (reservation_id,))
            conn.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,))
            conn.executemany(
                "INSERT INTO spend(scope, amount, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT(scope) DO UPDATE SET amount = amount + excluded.amount",
                [(self._ids(scope), amount, scope.expires_at) for scope, amount in charges])
            return True

        return self._write_or_journal(work, "settle", reservation_id, charges, True)

    def release(self, reservation_id: str) -> bool:
        """As the interface says; when the file cannot be written the release is journaled and False
        returned (nothing was freed yet; the reservation also expires on its own)."""
        def work(conn: sqlite3.Connection, now: float) -> bool:
            live = conn.execute("DELETE FROM reservations WHERE id = ? AND expires_at > ?", (reservation_id, now)).rowcount
            conn.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,))
            conn.execute("DELETE FROM holds WHERE reservation = ?", (reservation_id,))
            return bool(live)

        return self._write_or_journal(work, "release", reservation_id, (), False)

    def expire(self, now: float | None = None) -> int:
        def work(conn: sqlite3.Connection, clock_now: float) -> int:
            return self._sweep(conn, clock_now if now is None else now)

        return self._write_or_unavailable(work)  # type: ignore[no-any-return]

    # -- when the file cannot be written ------------------------------------------------

    def _write_or_unavailable(self, work: _Work) -> Any:
        try:
            return self._write(work)
        except sqlite3.OperationalError as exc:
            if not _unavailable(exc):
                raise
            raise StateUnavailable(f"SQLite ledger {self.path} cannot be written: {exc}") from exc

    def _write_or_journal(self, work: _Work, kind: str, reservation_id: str, charges: Sequence[Charge],
                          journaled: bool) -> bool:
        """Write, or journal the write (returning `journaled`): what a response cost is never dropped."""
        try:
            return self._write_or_unavailable(work)  # type: ignore[no-any-return]
        except StateUnavailable as exc:
            described = f"{kind} of {reservation_id} (charges: {describe_charges((self._ids(s), a) for s, a in charges)})"
            self._journal_add(_Entry(work, described), exc)
            return journaled

    @property
    def journal_size(self) -> int:
        """Settlements and releases waiting for the file."""
        return len(self._journal)

    def _journal_add(self, entry: _Entry, cause: StateUnavailable) -> None:
        with self._journal_lock:
            full = len(self._journal) >= self._journal_max
            if full:
                self.journal_overflow += 1
            else:
                self._journal.append(entry)
            if self._flusher is None:
                self._flusher = Periodic(self._flush_quietly, 1.0, "policy-engine-sqlite-journal", log)
        if full:
            log.error("ledger journal full (%d entries): %s NOT recorded (cause: %s)", self._journal_max, entry.described, cause)
            telemetry.record_event("policy_engine.ledger.journal_overflow", {"policy_engine.error": str(cause)})
        else:
            log.warning("ledger file not writable, journaled: %s (cause: %s)", entry.described, cause)
            telemetry.record_event("policy_engine.ledger.journaled", {"policy_engine.error": str(cause)})

    def flush_journal(self) -> int:
        """Deliver journaled entries now, oldest first; returns how many were delivered.

        Raises `StateUnavailable` (keeping them) when the file still cannot be written."""
        if not self._journal:
            return 0
        before = self.journal_delivered
        self._write_or_unavailable(lambda conn, now: None)  # a transaction delivers the journal first
        return self.journal_delivered - before

    def _flush_quietly(self) -> None:
        # Only once the file is free: a transaction waiting for it would hold `_lock` for up to busy_timeout_s
        # while callers' reads and writes queue behind it.
        if not self._journal or not self._writable_now():
            return
        try:
            if self.flush_journal():
                log.info("delivered journaled ledger entries; %d left", len(self._journal))
        except StateUnavailable:
            pass  # the next tick tries again

    def _writable_now(self) -> bool:
        try:
            probe = sqlite3.connect(self.path, timeout=0, isolation_level=None)
            try:
                probe.execute("BEGIN IMMEDIATE")
                probe.execute("ROLLBACK")
            finally:
                probe.close()
        except sqlite3.OperationalError:
            return False
        return True

    def _sweep(self, conn: sqlite3.Connection, now: float) -> int:
        dropped = conn.execute("DELETE FROM reservations WHERE expires_at <= ?", (now,)).rowcount
        conn.execute("DELETE FROM holds WHERE expires_at <= ?", (now,))
        conn.execute("DELETE FROM settled WHERE forget_at <= ?", (now,))
        conn.execute("DELETE FROM spend WHERE expires_at <= ?", (now - self._spend_retention_s,))
        return dropped
