"""Hot reload: an `Engine` handle that follows its policy files.

    engine = ReloadingEngine(["policies/default.yaml"], ledger=RedisLedger(url=...))
    decision = engine.decide(params, context)       # the same API as Engine
    ...
    engine.close()

A background thread polls the files' (mtime, size, inode) every `poll_interval_s`;
once a changed file has stayed unchanged for one poll (so a half-written file is not
read), its text is hashed and, when different, every file is compiled again off the
request path and the new `Engine` swapped in with one reference assignment. Requests
in flight finish on the engine they started with; each `Decision.policy_version`
says which version decided it. The ledger, rate-limit state, conversation stickiness
and other state objects pass from one engine to the next, so reloading never resets
a budget.

An invalid new version is not loaded: the old one keeps deciding, and the failure is
logged (logger `policy_engine.reload`, ERROR, with every diagnostic), counted
(`policy_engine.events{policy_engine.event=policy_engine.policy.reload_failed}`) and
recorded as a span event on a `policy_engine.reload` span. The same broken text is
reported once, not at every poll.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from . import telemetry
from ._fork import Periodic, renew_in_child
from .catalog import Catalog, load_catalog
from .compile import CompiledPolicy, compile_file
from .decide import Decision, Engine, Settlement
from .errors import Diagnostic, PolicyError

__all__ = ["ReloadingEngine"]

log = logging.getLogger("policy_engine.reload")

_SHARED_STATE = ("ledger", "ratelimits", "conversations")
"""Engine attributes that carry state across versions (and override the options' own)."""


@dataclass(frozen=True, slots=True)
class _Seen:
    stamp: tuple[int, int, int] | None  # (mtime_ns, size, inode); None when the file could not be read
    digest: str | None = None
    data: bytes | None = None
    error: str | None = None


class ReloadingEngine:
    """A handle on the current `Engine` for a set of policy files, reloaded when they change.

    `paths`, `catalog` and `engine_options` are those of `policy_engine.load`; the first
    load must succeed (it raises `PolicyError` otherwise). `poll_interval_s=0` starts no
    thread: call `reload()` yourself (e.g. on SIGHUP).
    """

    def __init__(
        self,
        paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        catalog: Catalog | str | os.PathLike[str] | None = None,
        *,
        poll_interval_s: float = 1.0,
        **engine_options: Any,
    ) -> None:
        self.paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("a ReloadingEngine needs at least one policy file")
        if poll_interval_s < 0:
            raise ValueError(f"poll_interval_s must be >= 0, got {poll_interval_s!r}")
        self.catalog = catalog if catalog is None or isinstance(catalog, Catalog) else load_catalog(catalog)
        self._options = dict(engine_options)
        self._reload_lock = threading.Lock()
        self.last_error: PolicyError | None = None
        """Why the newest version on disk is not the one deciding (None once one loads)."""
        self.reloads = 0
        """Versions swapped in since the first load."""
        seen = {path: self._look(path, read=True) for path in self.paths}
        compiled = self._compile(seen)  # the first version must load: raises PolicyError
        self._engine = Engine(compiled, self.catalog, **self._options)
        self._seen = {path: _Seen(s.stamp, s.digest) for path, s in seen.items()}  # the texts need not stay
        self._failed: tuple[str | None, ...] | None = None
        self._pending: dict[Path, tuple[int, int, int] | None] = {}
        # A forked child (a pre-fork server's worker) keeps watching the files: `Periodic` starts again there.
        self._watcher = Periodic(self._check, poll_interval_s, "policy-engine-reload", log) if poll_interval_s > 0 else None
        self._renewal = renew_in_child(self._renew_lock)

    def _renew_lock(self) -> None:
        self._reload_lock = threading.Lock()  # in a forked child: a parent thread may have held it at the fork

    # -- the Engine API, on whichever version is current ----------------------------------

    @property
    def engine(self) -> Engine:
        """The current engine. Read it once per request: a reload may swap it at any time."""
        return self._engine

    @property
    def versions(self) -> dict[str, str]:
        """Policy name -> version (sha256 prefix of the file's text) now deciding."""
        return {name: p.version for name, p in self._engine.policies.items()}

    def decide(self, params: Mapping[str, Any], context: Mapping[str, Any] | None = None, **kwargs: Any) -> Decision:
        """`Engine.decide` on the current version."""
        return self._engine.decide(params, context, **kwargs)

    async def adecide(self, params: Mapping[str, Any], context: Mapping[str, Any] | None = None, **kwargs: Any) -> Decision:
        """`Engine.adecide` on the current version."""
        return await self._engine.adecide(params, context, **kwargs)

    def settle(self, decision: Decision, usage: Mapping[str, Any] | Any) -> Settlement:
        """`Engine.settle`; a decision made by an older version settles into the same ledger."""
        return self._engine.settle(decision, usage)

    def release(self, decision: Decision) -> bool:
        """`Engine.release`."""
        return self._engine.release(decision)

    def __getattr__(self, name: str) -> Any:
        # Everything else an Engine offers (policy(), ledger, catalog, ...), from the current one.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._engine, name)

    # -- reloading ------------------------------------------------------------------------

    def reload(self) -> bool:
        """Load the files again now if their text changed; True when a new version was swapped in.

        False when nothing changed or the new text is invalid (then `last_error` says why
        and the old version keeps deciding). Never raises for a bad policy file.
        """
        return self._reload(stable_only=False)

    def close(self) -> None:
        """Stop watching the files (the engine itself keeps working)."""
        if self._watcher is not None:
            self._watcher.stop(timeout_s=5)

    def __enter__(self) -> ReloadingEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self) -> None:
        self._reload(stable_only=True)

    def _reload(self, *, stable_only: bool) -> bool:
        with self._reload_lock:
            changed = False
            stamps = {path: self._look(path, read=False).stamp for path in self.paths}
            for path, stamp in stamps.items():
                if stamp != self._seen[path].stamp:
                    changed = True
            if not changed:
                self._pending.clear()
                return False
            if stable_only:
                # Compile only what has stopped changing: an editor may still be writing.
                unstable = {p: s for p, s in stamps.items() if s != self._seen[p].stamp and self._pending.get(p, ()) != s}
                if unstable:
                    self._pending.update(unstable)
                    return False
            self._pending.clear()
            seen = {path: self._look(path, read=True) for path in self.paths}
            digests = tuple(s.digest for s in seen.values())
            if digests == tuple(s.digest for s in self._seen.values()):
                self._seen = {path: _Seen(s.stamp, s.digest) for path, s in seen.items()}  # touched, not changed
                return False
            if digests == self._failed:
                return False  # this broken text was reported already
            with trace.get_tracer(telemetry.TRACER_NAME).start_as_current_span("policy_engine.reload") as span:
                try:
                    compiled = self._compile(seen)
                    engine = self._successor(compiled)
                except PolicyError as exc:
                    self._failed = digests
                    self.last_error = exc
                    self._report_failure(exc, span)
                    return False
                old = self.versions
                self._engine = engine  # the swap: one reference assignment, atomic for readers
                self._seen = {path: _Seen(s.stamp, s.digest) for path, s in seen.items()}
                self._failed, self.last_error = None, None
                self.reloads += 1
                new = self.versions
                changes = ", ".join(f"{name} {old.get(name, '-')} -> {version}" for name, version in new.items()
                                    if old.get(name) != version)
                log.info("policy reloaded: %s", changes or "same versions")
                span.set_attribute("policy_engine.policy.versions", [f"{n}@{v}" for n, v in new.items()])
                telemetry.record_event("policy_engine.policy.reloaded", {"policy_engine.policy.changes": changes})
                return True

    def _successor(self, compiled: list[CompiledPolicy]) -> Engine:
        options = dict(self._options)
        options.pop("ledger_path", None)  # the ledger it opened is handed over below
        current = self._engine
        for name in _SHARED_STATE:
            options[name] = getattr(current, name)
        if "throughput" in options or getattr(current, "throughput", None) is not None:
            options["throughput"] = current.throughput
        try:
            return Engine(compiled, self.catalog, **options)
        except ValueError as exc:  # e.g. two files now declare the same policy name
            raise PolicyError([Diagnostic(str(self.paths[0]), 1, 1, "PE020", str(exc))]) from exc

    def _compile(self, seen: Mapping[Path, _Seen]) -> list[CompiledPolicy]:
        compiled, problems, sources = [], [], {}
        for path in self.paths:
            data = seen[path].data
            if data is None:
                problems.append(Diagnostic(str(path), 1, 1, "PE001", f"cannot read the policy file: {seen[path].error}"))
                continue
            try:
                compiled.append(compile_file(str(path), text=data))
            except PolicyError as exc:
                problems.extend(exc.diagnostics)
                sources.update(exc.sources)
        if problems:
            raise PolicyError(problems, sources)
        return compiled

    @staticmethod
    def _look(path: Path, *, read: bool) -> _Seen:
        try:
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if not read:
                return _Seen(stamp)
            data = path.read_bytes()
        except OSError as exc:
            return _Seen(None, error=exc.strerror or str(exc))
        return _Seen(stamp, hashlib.sha256(data).hexdigest(), data)

    def _report_failure(self, exc: PolicyError, span: Any) -> None:
        first = exc.diagnostics[0] if exc.diagnostics else None
        summary = f"{first.file}:{first.line}:{first.col}: {first.code} {first.message}" if first else str(exc)
        log.error("policy reload failed; still deciding with %s\n%s",
                  ", ".join(f"{n}@{v}" for n, v in self.versions.items()), exc.format())
        span.set_status(Status(StatusCode.ERROR, summary))
        telemetry.record_event("policy_engine.policy.reload_failed", {
            "policy_engine.error": summary, "policy_engine.errors.count": len(exc.diagnostics)})
