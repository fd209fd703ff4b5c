"""Privacy of state: with `hash_scopes` no tenant or user id is kept in plain text in the SQLite
file, in Redis or in the outage journal; and span events never carry an invalid value itself.

Every check reads the real store (the SQLite file's bytes, every Redis key and value, the journal
file) and also runs without hashing, to show the id would be there: the tests can fail.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anthropic
import pytest
import redis
from opentelemetry import trace

from policy_engine.decide import Engine, load
from policy_engine.integrations.anthropic import FastModePolicy, policy_context
from policy_engine.ledger import Scope
from policy_engine.ledger._keys import ScopeIds, ScopeIdsMismatch
from policy_engine.ledger.redis import RedisLedger
from policy_engine.ledger.sqlite import SqliteLedger
from policy_engine.testing.emulator import Emulator
from tests._emulator import emulator, messages_params  # noqa: F401 - fixture
from tests._redis import RedisServer, redis_prefix, redis_server  # noqa: F401 - fixtures

TENANT, USER = "acme-corp-7731", "user-5150@example.com"
SECRET = b"a secret of the fleet"
POLICY = """\
version: 1
name: private
default: standard
budgets:
  - name: per_tenant
    key: context.tenant
    window: day
    limit_usd: 10
  - name: per_user
    key: context.user
    window: day
    limit_usd: 1
"""
USAGE = {"input_tokens": 1_000, "output_tokens": 2_000}


def spend_once(tmp_path: Path, ledger: Any) -> Engine:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    engine = load(path, ledger=ledger)
    decision = engine.decide(messages_params(), {"tenant": TENANT, "user": USER})
    assert decision.reservation_id is not None
    engine.settle(decision, USAGE)
    kept = engine.decide(messages_params(), {"tenant": TENANT, "user": USER})  # held, not settled: holds count too
    assert kept.reservation_id is not None
    return engine


def plain_ids_in(data: bytes) -> list[str]:
    return [i for i in (TENANT, USER) if i.encode() in data]


# -- SQLite ------------------------------------------------------------------------------------


def sqlite_bytes(path: Path) -> bytes:
    """The file and its WAL and shared-memory files, as they are on disk."""
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists())


@pytest.mark.parametrize("hash_scopes", [True, "a secret of the fleet"])
def test_sqlite_keeps_no_plain_id(tmp_path: Path, hash_scopes: Any) -> None:
    path = tmp_path / "ledger.db"
    engine = spend_once(tmp_path, SqliteLedger(path, hash_scopes=hash_scopes))
    assert plain_ids_in(sqlite_bytes(path)) == []
    spent = dict(engine.ledger.totals())
    assert len(spent) == 2 and all("\x1f#" in sid for sid in spent)  # budget and window stay readable
    assert {sid.split("\x1f")[0] for sid in spent} == {"per_tenant", "per_user"}
    engine.ledger.close()


def test_sqlite_without_hashing_keeps_the_ids_in_plain_text(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    spend_once(tmp_path, SqliteLedger(path)).ledger.close()
    assert plain_ids_in(sqlite_bytes(path)) == [TENANT, USER]


def test_hashed_scopes_still_enforce_the_budget_across_ledgers_of_one_secret(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    scope = Scope("per_user", USER, "day:2026-01-01@UTC", 1_000, time.time() + 86_400)
    one, two = SqliteLedger(path, hash_scopes=SECRET), SqliteLedger(path, hash_scopes=SECRET)
    assert one.reserve("r1", [(scope, 600)], ttl_s=60).ok
    assert not two.reserve("r2", [(scope, 600)], ttl_s=60).ok  # the same budget, seen through the same secret
    one.settle("r1", [(scope, 600)])
    assert two.balances([scope])[0].spent == 600
    # Another secret would name another scope, splitting the budget: the store refuses it.
    for other in (b"another secret", True, False):
        with pytest.raises(ScopeIdsMismatch, match="same setting"):
            SqliteLedger(path, hash_scopes=other)


def test_a_redis_prefix_refuses_a_ledger_with_another_setting(redis_server: RedisServer, redis_prefix: str) -> None:  # noqa: F811
    first = RedisLedger(url=redis_server.url, prefix=redis_prefix, hash_scopes=SECRET)
    assert RedisLedger(url=redis_server.url, prefix=redis_prefix, hash_scopes=SECRET.decode())._ids_checked
    for other in (b"another secret", True, False):
        with pytest.raises(ScopeIdsMismatch, match="same setting"):
            RedisLedger(url=redis_server.url, prefix=redis_prefix, hash_scopes=other)
    first.close()


def test_an_asyncio_ledger_checks_the_setting_on_its_first_call(redis_server: RedisServer, redis_prefix: str) -> None:  # noqa: F811
    import asyncio

    from policy_engine.ledger.redis import AsyncRedisLedger

    RedisLedger(url=redis_server.url, prefix=redis_prefix, hash_scopes=True).close()
    scope = Scope("b", USER, "day:x", 10, time.time() + 60)

    async def main() -> None:
        ledger = AsyncRedisLedger(url=redis_server.url, prefix=redis_prefix, hash_scopes=SECRET)
        with pytest.raises(ScopeIdsMismatch):
            await ledger.reserve("r", [(scope, 1)], ttl_s=60)
        await ledger.close()

    asyncio.run(main())


def test_a_keyed_hash_differs_from_the_unkeyed_one() -> None:
    scope = Scope("b", USER, "day:x", 1, 0.0)
    plain, unkeyed, keyed = ScopeIds(False)(scope), ScopeIds(True)(scope), ScopeIds(SECRET)(scope)
    assert plain == scope.id and len({plain, unkeyed, keyed}) == 3
    assert ScopeIds(SECRET.decode())(scope) == keyed  # a str secret is its UTF-8 bytes
    with pytest.raises(ValueError, match="empty secret"):
        ScopeIds(b"")
    with pytest.raises(TypeError):
        ScopeIds(42)  # type: ignore[arg-type]


# -- Redis --------------------------------------------------------------------------------------


def redis_dump(url: str, prefix: str) -> bytes:
    """Every key of the prefix and everything it holds, as Redis has it."""
    client = redis.Redis.from_url(url)
    out = []
    try:
        for key in client.scan_iter(match=prefix + "*"):
            out.append(key)
            kind = client.type(key)
            if kind == b"string":
                out.append(client.get(key) or b"")
            elif kind == b"zset":
                out.extend(client.zrange(key, 0, -1))
            elif kind == b"hash":
                for field, value in client.hgetall(key).items():
                    out += [field, value]
    finally:
        client.close()
    return b"\n".join(out)


@pytest.mark.parametrize("hash_scopes", [False, True, SECRET])
def test_redis_keeps_no_plain_id(tmp_path: Path, redis_server: RedisServer, redis_prefix: str,  # noqa: F811
                                 hash_scopes: Any) -> None:
    engine = spend_once(tmp_path, RedisLedger(url=redis_server.url, prefix=redis_prefix, hash_scopes=hash_scopes))
    dump = redis_dump(redis_server.url, redis_prefix)
    assert dump.count(redis_prefix.encode() + b"s:") == 2  # the two scopes are there, under some name
    assert plain_ids_in(dump) == ([] if hash_scopes else [TENANT, USER])
    engine.ledger.close()


def test_the_redis_journal_keeps_no_plain_id(tmp_path: Path, redis_prefix: str) -> None:  # noqa: F811
    server = RedisServer(tmp_path / "redis").start()
    journal = tmp_path / "journal.jsonl"
    scope = Scope("per_user", USER, "day:2026-01-01@UTC", 10_000_000, time.time() + 86_400)
    try:
        ledger = RedisLedger(url=server.url, prefix=redis_prefix, journal_path=journal, hash_scopes=SECRET, timeout_s=0.3)
        server.kill()
        assert ledger.settle("during-the-outage", [(scope, 1_234)])
        assert ledger.journal_size == 1
        assert plain_ids_in(journal.read_bytes()) == [] and journal.read_bytes()
        ledger.close()
        server.start()
        # A worker restarted with the same secret delivers the journal into the same, hashed scope.
        again = RedisLedger(url=server.url, prefix=redis_prefix, journal_path=journal, hash_scopes=SECRET, timeout_s=0.3)
        assert again.flush_journal() == 1
        assert again.balances([scope])[0].spent == 1_234
        assert plain_ids_in(redis_dump(server.url, redis_prefix)) == []
        again.close()
    finally:
        server.cleanup()


# -- span events --------------------------------------------------------------------------------


@pytest.mark.parametrize("context, secret, says", [
    ({"user": 5150}, "5150", "context['user'] must be str, got int"),
    ({"tennant": "acme-corp-7731"}, "acme-corp-7731", "did you mean 'tenant'?"),
])
def test_the_invalid_context_event_never_carries_the_value(
        emulator: Emulator, tmp_path: Path, telemetry: Any, context: dict[str, Any], secret: str, says: str) -> None:  # noqa: F811
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    client = anthropic.Anthropic(base_url=emulator.url, api_key="sk-test", middleware=[FastModePolicy(load(path))])
    with trace.get_tracer("test").start_as_current_span("request"), policy_context(**context):
        client.messages.create(**messages_params())
    # Sent at standard and metered (on_invalid_context: standard), and said so in an event.
    events = [e for s in telemetry.spans() for e in s.events if e.name == "policy_engine.invalid_context"]
    assert len(events) == 1
    attributes = dict(events[0].attributes)
    assert says in attributes["policy_engine.error"] and attributes["policy_engine.error.type"] == "InvalidContext"
    assert not any(secret in str(value) for value in attributes.values()), attributes
    assert not any(secret in str(v) for s in telemetry.spans() for e in s.events for v in e.attributes.values())
