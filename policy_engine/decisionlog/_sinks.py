"""Where decision records go: a JSON Lines file, Python `logging`, OpenTelemetry logs.

Each sink gets records in batches from the log's writer thread, both as dicts and as the JSON
lines already serialized, and never sees the request path.
"""

from __future__ import annotations

import fcntl
import glob
import gzip
import logging
import os
import shutil
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Final

__all__ = ["Sink", "JsonlFile", "LoggerSink", "OtelLogSink"]

_INODE_CHECK_S: Final = 1.0


class Sink:
    """The interface of a sink: `write` a batch, `flush`, `close`. Subclass it for your own."""

    def write(self, records: Sequence[dict[str, Any]], lines: Sequence[str]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlFile(Sink):
    """Appends records to a JSON Lines file, rotated by size (`max_bytes`) or age (`max_age_s`).

    A rotated file is renamed `<path>.<UTC time>` and, with `compress=True`, gzip-compressed at the
    next rotation (or at close), so a process still appending to it is never cut off. `backups`
    rotated files are kept (None: all). Several processes (a pre-forking server's workers) may
    share one path: every batch is one append, and rotation is serialized by a lock on
    `<path>.lock`; the other processes notice the new file within a second.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int | None = None, max_age_s: float | None = None,
                 compress: bool = False, backups: int | None = None) -> None:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes!r}")
        if max_age_s is not None and max_age_s <= 0:
            raise ValueError(f"max_age_s must be positive, got {max_age_s!r}")
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.compress = compress
        self.backups = backups
        self._fd = -1
        self._opened_at = 0.0
        self._checked_at = 0.0

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._opened_at = self._checked_at = time.monotonic()

    def write(self, records: Sequence[dict[str, Any]], lines: Sequence[str]) -> None:
        if self._fd < 0:
            self._open()
        elif time.monotonic() - self._checked_at >= _INODE_CHECK_S:
            self._follow()
        data = ("\n".join(lines) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        if self._due():
            self._rotate()

    def _follow(self) -> None:
        """Reopen when another process has rotated the file away (its inode is no longer the path's)."""
        self._checked_at = time.monotonic()
        try:
            moved = os.stat(self.path).st_ino != os.fstat(self._fd).st_ino
        except FileNotFoundError:
            moved = True
        if moved:
            os.close(self._fd)
            self._open()

    def _due(self) -> bool:
        if self.max_bytes is not None and os.fstat(self._fd).st_size >= self.max_bytes:
            return True
        return self.max_age_s is not None and time.monotonic() - self._opened_at >= self.max_age_s

    def _rotate(self) -> None:
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:  # nobody rotated it meanwhile
                    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
                    os.rename(self.path, f"{self.path}.{stamp}")
                    self._tidy(keep_newest=True)
            except FileNotFoundError:
                pass
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(self._fd)
        self._open()

    def _rotated(self) -> list[str]:
        return sorted(p for p in glob.glob(glob.escape(self.path) + ".*") if not p.endswith(".lock"))

    def _tidy(self, keep_newest: bool) -> None:
        """Compress rotated files (all but the newest, which a process may still append to) and drop old ones."""
        rotated = self._rotated()
        if self.compress:
            for name in rotated[:-1] if keep_newest else rotated:
                if not name.endswith(".gz"):
                    with open(name, "rb") as src, gzip.open(name + ".gz", "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    os.remove(name)
            rotated = self._rotated()
        if self.backups is not None:
            for name in rotated[:max(0, len(rotated) - self.backups)]:
                os.remove(name)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.compress and self._rotated():
            with open(self.path + ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    self._tidy(keep_newest=False)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)


class LoggerSink(Sink):
    """Each record as one message of a Python logger (the JSON line), with the dict in `record.decision_record`."""

    def __init__(self, logger: str | logging.Logger = "policy_engine.decisions", level: int = logging.INFO) -> None:
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.level = level

    def write(self, records: Sequence[dict[str, Any]], lines: Sequence[str]) -> None:
        if not self.logger.isEnabledFor(self.level):
            return
        for record, line in zip(records, lines):
            self.logger.log(self.level, line, extra={"decision_record": record})


class OtelLogSink(Sink):
    """Each record as an OpenTelemetry log record (event `policy_engine.decision`, the record as its body), through
    the API's logger provider (or `logger_provider`): a collector ships them where the SDK's exporters say."""

    EVENT: Final = "policy_engine.decision"

    def __init__(self, logger_provider: Any = None) -> None:
        from opentelemetry import _logs  # the API's logs signal (its module name still marks it as unstable)

        self._logs = _logs
        provider = logger_provider or _logs.get_logger_provider()
        self._logger = provider.get_logger("policy_engine.decisions")

    def write(self, records: Sequence[dict[str, Any]], lines: Sequence[str]) -> None:
        severity = self._logs.SeverityNumber.INFO
        for record in records:
            decision = record["decision"]
            self._logger.emit(
                event_name=self.EVENT, body=_otel_value(record), severity_number=severity, severity_text="INFO",
                attributes={"policy_engine.policy.name": record["policy"]["name"],
                            "policy_engine.speed": decision["speed"], "policy_engine.outcome": decision["outcome"],
                            "policy_engine.event": record["event"]})


def _otel_value(value: Any) -> Any:
    """A record as an OpenTelemetry AnyValue: None entries left out (AnyValue has no null inside maps)."""
    if isinstance(value, dict):
        return {k: _otel_value(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_otel_value(v) for v in value if v is not None]
    return value
