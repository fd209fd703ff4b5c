"""Hot reload: new versions swap in atomically, broken ones never do, and state survives every swap."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from policy_engine.errors import PolicyError
from policy_engine.ledger import MemoryLedger
from policy_engine.reload import ReloadingEngine

REQUEST: dict[str, Any] = {"model": "claude-opus-5", "max_tokens": 1000, "messages": [{"role": "user", "content": "Hi"}]}
FAST_USAGE = {"input_tokens": 10, "output_tokens": 100, "speed": "fast"}


def policy_text(speed: str = "fast", name: str = "hot", limit: str = "100") -> str:
    return f"""\
version: 1
name: {name}
default: standard
rules:
  - name: waiting
    when: context.interactive
    speed: {speed}
budgets:
  - name: spend
    window: day
    limit_usd: {limit}
"""


BROKEN = policy_text().replace("context.interactive", "context.interactiv")  # PE101: unknown field


def version(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write(path: Path, text: str) -> None:
    """Replace the file the way deploy tools do: write aside, then rename over it."""
    aside = path.with_suffix(".tmp")
    aside.write_text(text)
    os.replace(aside, path)


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture()
def path(tmp_path: Path) -> Path:
    p = tmp_path / "hot.yaml"
    p.write_text(policy_text("fast"))
    return p


def test_decisions_record_the_version_that_made_them(path: Path) -> None:
    with ReloadingEngine(path, poll_interval_s=0) as engine:
        decision = engine.decide(REQUEST, {"interactive": True})
        assert (decision.speed, decision.policy_version) == ("fast", version(policy_text("fast")))
        assert engine.versions == {"hot": version(policy_text("fast"))}


def test_reload_swaps_in_a_changed_file_and_keeps_the_state(path: Path) -> None:
    ledger = MemoryLedger()
    with ReloadingEngine(path, poll_interval_s=0, ledger=ledger) as engine:
        before = engine.decide(REQUEST, {"interactive": True})
        assert not engine.reload()  # nothing changed
        write(path, policy_text("standard"))
        assert engine.reload() and engine.reloads == 1
        after = engine.decide(REQUEST, {"interactive": True})
        assert (after.speed, after.policy_version) == ("standard", version(policy_text("standard")))
        assert engine.ledger is ledger and engine.engine.ledger is ledger
        # A decision of the old version settles into the same ledger after the swap.
        assert engine.settle(before, FAST_USAGE).first
        [scope] = [s for _, s in before._budget_charges]
        assert ledger.balances([scope])[0].spent == 10 * 10 + 100 * 50


def test_default_state_objects_pass_to_the_new_version(path: Path) -> None:
    with ReloadingEngine(path, poll_interval_s=0) as engine:
        first = engine.engine
        write(path, policy_text("standard"))
        assert engine.reload()
        assert engine.engine is not first
        for name in ("ledger", "ratelimits", "conversations"):
            assert getattr(engine.engine, name) is getattr(first, name)


def test_an_invalid_version_keeps_the_old_one_and_is_reported_once(
        path: Path, caplog: pytest.LogCaptureFixture, telemetry: Any) -> None:
    with ReloadingEngine(path, poll_interval_s=0) as engine:
        write(path, BROKEN)
        with caplog.at_level(logging.ERROR, logger="policy_engine.reload"):
            assert not engine.reload()
            assert not engine.reload()  # the same broken text: not reported again
        decision = engine.decide(REQUEST, {"interactive": True})
        assert (decision.speed, decision.policy_version) == ("fast", version(policy_text("fast")))
        assert engine.last_error is not None and engine.last_error.diagnostics[0].code == "PE101"
        [record] = caplog.records
        assert "still deciding with hot@" + version(policy_text("fast")) in record.getMessage()
        assert f"{path}:6:" in record.getMessage()  # file:line:col of the bad identifier
        events = [p for p in telemetry.metrics()["policy_engine.events"]
                  if p.attributes["policy_engine.event"] == "policy_engine.policy.reload_failed"]
        assert sum(p.value for p in events) == 1
        [span] = telemetry.spans("policy_engine.reload")
        assert not span.status.is_ok
        assert [e.name for e in span.events] == ["policy_engine.policy.reload_failed"]
        write(path, policy_text("standard"))  # fixed
        assert engine.reload() and engine.last_error is None
        assert engine.decide(REQUEST, {"interactive": True}).speed == "standard"


def test_a_successful_reload_is_logged_counted_and_traced(path: Path, caplog: pytest.LogCaptureFixture,
                                                          telemetry: Any) -> None:
    with ReloadingEngine(path, poll_interval_s=0) as engine:
        write(path, policy_text("standard"))
        with caplog.at_level(logging.INFO, logger="policy_engine.reload"):
            assert engine.reload()
        assert f"hot {version(policy_text('fast'))} -> {version(policy_text('standard'))}" in caplog.text
        [span] = telemetry.spans("policy_engine.reload")
        assert span.status.is_ok and [e.name for e in span.events] == ["policy_engine.policy.reloaded"]


def test_a_touched_but_unchanged_file_is_not_reloaded(path: Path) -> None:
    with ReloadingEngine(path, poll_interval_s=0) as engine:
        first = engine.engine
        write(path, path.read_text())
        assert not engine.reload()
        assert engine.engine is first and engine.reloads == 0


def test_a_missing_file_keeps_the_old_version(path: Path) -> None:
    with ReloadingEngine(path, poll_interval_s=0) as engine:
        path.unlink()
        assert not engine.reload()
        assert engine.last_error is not None and engine.last_error.diagnostics[0].code == "PE001"
        assert engine.decide(REQUEST, {"interactive": True}).speed == "fast"
        path.write_text(policy_text("standard"))
        assert engine.reload()


def test_two_files_that_end_up_with_one_name_are_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(policy_text(name="alpha"))
    b.write_text(policy_text(name="beta"))
    with ReloadingEngine([a, b], poll_interval_s=0) as engine:
        write(b, policy_text(name="alpha"))
        assert not engine.reload()
        assert engine.last_error is not None and "same name" in str(engine.last_error)
        assert set(engine.versions) == {"alpha", "beta"}


def test_the_watcher_picks_up_changes_on_its_own(path: Path) -> None:
    with ReloadingEngine(path, poll_interval_s=0.02) as engine:
        write(path, policy_text("standard"))
        wait_for(lambda: engine.versions["hot"] == version(policy_text("standard")))
        write(path, BROKEN)
        wait_for(lambda: engine.last_error is not None)
        assert engine.versions["hot"] == version(policy_text("standard"))
        write(path, policy_text("fast", limit="50"))
        wait_for(lambda: engine.versions["hot"] == version(policy_text("fast", limit="50")))
        assert engine.reloads == 2


def test_the_first_version_must_load(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(BROKEN)
    with pytest.raises(PolicyError) as caught:
        ReloadingEngine(broken, poll_interval_s=0)
    assert caught.value.diagnostics[0].code == "PE101"
    with pytest.raises(PolicyError):
        ReloadingEngine(tmp_path / "missing.yaml", poll_interval_s=0)


def test_bad_arguments_are_refused(path: Path) -> None:
    with pytest.raises(ValueError, match="poll_interval_s"):
        ReloadingEngine(path, poll_interval_s=-1)
    with pytest.raises(ValueError, match="at least one"):
        ReloadingEngine([], poll_interval_s=0)
