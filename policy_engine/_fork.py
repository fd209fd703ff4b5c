"""Fork safety, in one place: what identifies a process or holds a connection is renewed in a forked child.

Pre-forking servers (gunicorn `--preload`, uWSGI, `multiprocessing` with the fork start
method) build the engine once and fork workers that share its memory. A child must not:

* reuse its parent's reservation ids or call tokens: another process's reservation would
  look like a retry of its own, and hold nothing;
* talk on its parent's sockets or SQLite handle (their replies and locks would mix);
* wait on a lock some parent thread held at the moment of the fork;
* count on a background thread: threads do not survive a fork.

An object with such state calls `renew_in_child(self._after_fork)` once, when it is made.
After every `os.fork()` the child runs each live object's callback (`os.register_at_fork`),
before any code of its own, so whatever call the child makes first finds fresh state.
Objects are not kept alive by this registry. Forks made outside Python's `os.fork` (a C
library calling fork() itself) run no hooks; no server in common use does that.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator

__all__ = ["renew_in_child", "ProcessIds", "Renewal", "Periodic"]

log = logging.getLogger("policy_engine.fork")


class Renewal:
    """What `renew_in_child` returns: the owner keeps it (as an attribute) for as long as it lives.

    The registry holds it weakly, and it holds the callback, so an owner without weak
    reference support (a compiled class) is still collected: owner and renewal form a
    cycle that the garbage collector frees, and the registry entry goes with it."""

    __slots__ = ("callback", "__weakref__")

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback


_renewals: weakref.WeakSet[Renewal] = weakref.WeakSet()


def renew_in_child(callback: Callable[[], None]) -> Renewal:
    """Have `callback` run in every child forked from now on; keep the result alive with its owner."""
    renewal = Renewal(callback)
    _renewals.add(renewal)
    return renewal


def _after_fork_in_child() -> None:
    # In the child only one thread runs, so the set cannot change under the iteration.
    for renewal in list(_renewals):
        try:
            renewal.callback()
        except Exception:  # noqa: BLE001 - one object's failure must not leave the others stale
            log.exception("renewing %r after a fork failed", renewal.callback)


if hasattr(os, "register_at_fork"):  # Unix; where there is no fork there is nothing to renew
    os.register_at_fork(after_in_child=_after_fork_in_child)


class ProcessIds(Iterator[str]):
    """Ids unique across processes and forks: `<pid>-<random>-<n>`, a fresh prefix in every forked child.

    `next(ids)` is one attribute read and a C-level call on the wrapped iterator; it is atomic
    under the GIL, like the count it wraps."""

    __slots__ = ("_ids", "_renewal")

    def __init__(self) -> None:
        self._ids = self._fresh()
        self._renewal = renew_in_child(self._renew)

    @staticmethod
    def _fresh() -> Iterator[str]:
        # 64 random bits: containers all run their server as pid 1, and two processes of a fleet sharing one
        # ledger must never draw the same prefix (a settled id is remembered for a day).
        return map(f"{os.getpid():x}-{os.urandom(8).hex()}-{{}}".format, itertools.count(1))

    def _renew(self) -> None:
        self._ids = self._fresh()

    def __next__(self) -> str:
        return next(self._ids)


class Periodic:
    """`work()` every `interval_s` seconds on a daemon thread, until `stop()`; a forked child runs it again.

    For the package's background jobs (the fleet rate-limit sync, the policy file watcher): threads
    do not survive a fork, so a child of a process that ran one starts its own. An exception is
    logged to `log` and the job goes on at the next tick."""

    def __init__(self, work: Callable[[], object], interval_s: float, name: str, log: logging.Logger) -> None:
        self.work, self.interval_s, self.name, self.log = work, interval_s, name, log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewal = renew_in_child(self._after_fork)
        self._start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, args=(self._stop,), name=self.name, daemon=True)
        self._thread.start()

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval_s):
            try:
                self.work()
            except Exception:  # noqa: BLE001 - the job must outlive any surprise
                self.log.exception("%s failed; trying again in %ss", self.name, self.interval_s)

    def _after_fork(self) -> None:
        running = self._thread is not None and not self._stop.is_set()
        self._stop, self._thread = threading.Event(), None
        if running:
            self._start()
