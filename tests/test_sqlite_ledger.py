"""The SQLite ledger beyond the shared semantics (tests/test_ledger_conformance.py holds it to MemoryLedger's):
persistence, expiry without a sweeper, cross-process budgets, and SIGKILL safety."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from policy_engine.ledger import Scope
from policy_engine.ledger.sqlite import SqliteLedger
from tests.test_ledger import Clock, scope

REPO = Path(__file__).resolve().parents[1]


def test_expired_reservations_stop_counting_without_a_sweep(tmp_path: Path) -> None:
    clock = Clock()
    ledger = SqliteLedger(tmp_path / "l.db", clock=clock)
    s = scope()
    ledger.reserve("r1", [(s, 900)], ttl_s=30)
    clock.now += 30.5
    # No expire() call: a reservation of a killed process must not hold the budget past its TTL.
    assert ledger.balances([s])[0].reserved == 0
    assert not ledger.release("r1")


def test_spend_survives_reopening_and_settled_ids_are_remembered(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ledger.db"
    s = scope(limit=10_000)
    first = SqliteLedger(path)
    first.reserve("r1", [(s, 500)], ttl_s=60)
    first.settle("r1", [(s, 321)])
    first.reserve("r2", [(s, 700)], ttl_s=60)
    first.close()
    second = SqliteLedger(path)
    [balance] = second.balances([s])
    assert (balance.spent, balance.reserved) == (321, 700)
    assert not second.settle("r1", [(s, 321)])
    assert second.totals() == {s.id: 321}
    assert second._connect().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    second.close()


def test_settled_ids_are_forgotten_after_their_memory(tmp_path: Path) -> None:
    clock = Clock()
    ledger = SqliteLedger(tmp_path / "l.db", clock=clock, settled_memory_s=100)
    s = scope()
    ledger.settle("r1", [(s, 1)])
    clock.now += 101
    ledger.expire()
    assert ledger.settle("r1", [(s, 1)])
    assert ledger.balances([s])[0].spent == 2


def test_spend_of_long_finished_windows_is_pruned(tmp_path: Path) -> None:
    clock = Clock()
    ledger = SqliteLedger(tmp_path / "l.db", clock=clock, spend_retention_s=10)
    old = Scope("b", "k", "day:2026-01-01@UTC", 1_000, clock.now - 11)
    current = scope()
    ledger.settle("r1", [(old, 5), (current, 5)])
    ledger.expire()
    assert ledger.totals() == {current.id: 5}


def test_big_amounts_stay_exact(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.db")
    s = scope(limit=2**62)
    for i in range(3):
        ledger.settle(f"r{i}", [(s, 2**60 + 1)])
    assert ledger.balances([s])[0].spent == 3 * (2**60 + 1)


def test_bad_synchronous_setting_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        SqliteLedger(tmp_path / "l.db", synchronous="sometimes")


def run_child(script: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


RACE = """
    import sys
    from policy_engine.ledger import Scope
    from policy_engine.ledger.sqlite import SqliteLedger
    ledger = SqliteLedger(sys.argv[1])
    scope = Scope("b", "k", "day:x", 500, 2e9)
    won = sum(ledger.reserve(f"{sys.argv[2]}-{i}", [(scope, 7)], ttl_s=600).ok for i in range(40))
    print(won)
"""


def test_processes_share_one_budget_without_overspending(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    SqliteLedger(path).close()
    children = [run_child(RACE, path, f"p{n}") for n in range(3)]
    won = [int(child.communicate(timeout=60)[0]) for child in children]
    # 3 x 40 attempts of 7 against 500: exactly 71 fit, whoever wins them.
    assert sum(won) == 500 // 7
    ledger = SqliteLedger(path)
    assert ledger.balances([Scope("b", "k", "day:x", 500, 2e9)])[0].reserved == 71 * 7


SETTLER = """
    import itertools, sys
    from policy_engine.ledger import Scope
    from policy_engine.ledger.sqlite import SqliteLedger
    ledger = SqliteLedger(sys.argv[1])
    scope = Scope("b", "k", "day:x", 10**15, 2e9)
    for i in itertools.count():
        rid = f"{sys.argv[2]}-{i}"
        ledger.reserve(rid, [(scope, 1_000)], ttl_s=1.0)
        ledger.settle(rid, [(scope, 3)])
        print(rid, flush=True)
"""


def test_sigkill_mid_run_loses_no_settled_entry_and_strands_no_reservation(tmp_path: Path) -> None:
    path = str(tmp_path / "killed.db")
    SqliteLedger(path).close()
    reported: list[str] = []
    for run, after in enumerate((50, 137, 301)):
        child = run_child(SETTLER, path, f"run{run}")
        assert child.stdout is not None
        lines = [child.stdout.readline().strip() for _ in range(after)]
        child.send_signal(signal.SIGKILL)  # wherever it is: between, inside or after a transaction
        # Through the same buffered reader: communicate() reads the raw pipe and would drop the
        # lines readline() already buffered (a busy machine lets the child print many at once).
        rest = child.stdout.read()
        assert child.wait(timeout=30) == -signal.SIGKILL
        child.stdout.close()
        child.stderr.close()  # type: ignore[union-attr]
        reported += lines + rest.split()
    s = Scope("b", "k", "day:x", 10**15, 2e9)
    ledger = SqliteLedger(path)
    conn = sqlite3.connect(path)
    settled = {row[0] for row in conn.execute("SELECT id FROM settled")}
    assert set(reported) <= settled
    # At most one settlement per run committed after the child's last print.
    assert len(reported) <= len(settled) <= len(reported) + 3
    assert ledger.balances([s])[0].spent == 3 * len(settled)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    time.sleep(1.1)
    assert ledger.balances([s])[0].reserved == 0
    ledger.expire()
    assert conn.execute("SELECT COUNT(*) FROM holds").fetchone()[0] == 0
    conn.close()
    ledger.close()


def test_a_refused_call_leaves_the_calls_committed_with_it_intact(tmp_path: Path) -> None:
    """Threads' calls share transactions (group commit): one refused call must not undo the others."""
    import threading

    ledger = SqliteLedger(tmp_path / "l.db")
    s = scope(limit=10**9)
    ledger.reserve("taken", [(s, 1)], ttl_s=600)
    refused = []

    def work(t: int) -> None:
        for i in range(50):
            try:
                ledger.reserve("taken", [(s, 1)], ttl_s=600)  # queued among the others' calls
            except ValueError:
                refused.append(t)
            assert ledger.reserve(f"{t}-{i}", [(s, 10)], ttl_s=600).ok
            assert ledger.settle(f"{t}-{i}", [(s, 7)])

    pool = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert len(refused) == 8 * 50
    [balance] = SqliteLedger(tmp_path / "l.db").balances([s])
    assert (balance.spent, balance.reserved) == (8 * 50 * 7, 1)


def _reserved(tmp_path: Path, *ids: str, key: str = "k", **options: object) -> tuple[Path, SqliteLedger, Scope]:
    """A ledger file with a reservation of 900 under each of `ids` in one scope (limit 10,000)."""
    path = tmp_path / "l.db"
    ledger = SqliteLedger(path, **options)  # type: ignore[arg-type]
    s = scope(key=key, limit=10_000)
    for rid in ids:
        ledger.reserve(rid, [(s, 900)], ttl_s=600)
    return path, ledger, s


class _Holder:
    """Another process's writer: holds the ledger's file (BEGIN IMMEDIATE) until `free()`."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("BEGIN IMMEDIATE")

    def free(self) -> None:
        self.conn.execute("COMMIT")
        self.conn.close()


def test_a_file_held_past_the_busy_timeout_journals_settlements_and_delivers_them(tmp_path: Path) -> None:
    from policy_engine.errors import StateUnavailable

    path, ledger, s = _reserved(tmp_path, "r1", "r2", busy_timeout_s=0.05)
    holder = _Holder(path)
    # What a response cost is never dropped, nor raised at the caller who got the response.
    assert ledger.settle("r1", [(s, 321)]) is True
    assert ledger.release("r2") is False
    assert ledger.journal_size == 2
    with pytest.raises(StateUnavailable, match="cannot be written: database is locked"):
        ledger.reserve("r3", [(s, 100)], ttl_s=600)
    with pytest.raises(StateUnavailable):
        ledger.flush_journal()
    assert ledger.journal_size == 2
    holder.free()
    assert ledger.reserve("r3", [(s, 100)], ttl_s=600).ok  # the next transaction delivers the journal first
    assert ledger.journal_size == 0
    [balance] = ledger.balances([s])
    assert (balance.spent, balance.reserved) == (321, 100)
    assert not ledger.settle("r1", [(s, 321)])  # delivered once: a settle again records nothing
    ledger.close()


def test_the_journal_is_delivered_with_no_further_call(tmp_path: Path) -> None:
    path, ledger, s = _reserved(tmp_path, "r1", busy_timeout_s=0.05)
    holder = _Holder(path)
    ledger.settle("r1", [(s, 321)])
    holder.free()
    deadline = time.monotonic() + 10
    while ledger.journal_size and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ledger.journal_size == 0, "the background delivery never ran"
    assert SqliteLedger(path).totals() == {s.id: 321}  # committed: another connection sees it
    ledger.close()


def test_what_the_journal_cannot_keep_is_logged_with_its_amounts(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    path, ledger, s = _reserved(tmp_path, "r1", "r2", key="tenant-acme", busy_timeout_s=0.05, journal_max=1,
                                hash_scopes=True)
    holder = _Holder(path)
    ledger.settle("r1", [(s, 321)])
    ledger.settle("r2", [(s, 456)])
    assert (ledger.journal_size, ledger.journal_overflow) == (1, 1)
    overflow = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(overflow) == 1 and "settle of r2" in overflow[0] and "=456" in overflow[0]
    assert s.key not in overflow[0]  # hashed scopes stay hashed in the log
    ledger.close()  # the file is still held: what is left is logged, not silently dropped
    lost = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"][1:]
    assert len(lost) == 1 and "settle of r1" in lost[0] and "=321" in lost[0] and "NOT recorded" in lost[0]
    holder.free()


def test_the_background_delivery_waits_for_the_file_without_holding_up_callers(tmp_path: Path) -> None:
    # Reads still work while another process holds the file (WAL): the retries of a journaled settlement must
    # not sit in SQLite's busy wait holding the ledger's lock, which callers' balances() need.
    path, ledger, s = _reserved(tmp_path, "r1", busy_timeout_s=1.0)
    holder = _Holder(path)
    ledger.settle("r1", [(s, 321)])  # journaled after a 1 s wait
    slowest = 0.0
    deadline = time.monotonic() + 2.5  # the flusher ticks twice meanwhile
    while time.monotonic() < deadline:
        started = time.monotonic()
        ledger.balances([s])
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.05)
    assert slowest < 0.5, f"balances() waited {slowest:.2f} s behind the background delivery"
    holder.free()
    assert ledger.flush_journal() == 1
    ledger.close()


def test_a_settlement_journaled_after_close_is_still_delivered(tmp_path: Path) -> None:
    path, ledger, s = _reserved(tmp_path, "r1", busy_timeout_s=0.05)
    holder = _Holder(path)
    ledger.settle("r1", [(s, 5)])
    ledger.close()  # the file still held: what is left is logged
    ledger.settle("r2", [(s, 7)])  # a late settlement (a server shutting down): the ledger reopens, journals it
    holder.free()
    deadline = time.monotonic() + 10
    while ledger.journal_size and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ledger.journal_size == 0
    assert SqliteLedger(path).totals() == {s.id: 12}
    ledger.close()


def test_an_error_of_the_statements_is_raised_not_journaled(tmp_path: Path) -> None:
    # Only the file's state (locked, a disk error, full, read-only) passes; a missing table never would.
    path, ledger, s = _reserved(tmp_path, "r1")
    sqlite3.connect(path).execute("DROP TABLE settled")
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        ledger.settle("r1", [(s, 321)])
    assert ledger.journal_size == 0
