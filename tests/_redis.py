"""A private, real redis-server for the tests: a free loopback port, a temp dir, no mocks.

`redis_server` (session-wide) is shared by every Redis test; each test isolates
itself with its own key prefix (`redis_prefix`). Fault tests that kill and restart
a server start their own with `RedisServer(...)` so nobody else sees the outage.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process on 127.0.0.1:<port>, data in `directory`.

    `persistent=True` turns on the append-only file with `appendfsync no`: Redis then
    write()s every change to the file before it replies (it never postpones the write,
    as `everysec` may while a slow fsync runs), so a server killed with kill -9 and
    restarted keeps every acknowledged write. What it leaves to the OS is surviving a
    machine crash, which production gets from `appendfsync always`; these tests kill
    processes, not machines, and fsync on every write is slow on a shared test box.
    """

    def __init__(self, directory: Path | None = None, *, persistent: bool = False, port: int | None = None) -> None:
        if not os.path.exists(REDIS_SERVER):
            pytest.fail("redis-server is not installed; `make test` installs it (apt-get install redis-server)")
        self.directory = Path(directory or tempfile.mkdtemp(prefix="pe-redis-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        persistence = ["--appendonly", "yes", "--appendfsync", "no"] if self.persistent else ["--appendonly", "no"]
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
             "--dir", str(self.directory), "--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning",
             "--logfile", str(self.directory / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace") if (self.directory / "redis.log").exists() else ""
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {log[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout}s")

    def kill(self) -> None:
        """SIGKILL: no shutdown save, connections reset, exactly like a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def client(self, **options: object) -> object:
        import redis

        return redis.Redis.from_url(self.url, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture()
def redis_prefix() -> str:
    """A key prefix of this test's own: tests share the server, never each other's keys."""
    return f"t{uuid.uuid4().hex[:10]}:"


FLEET_POLICY = """\
version: 1
name: fleet
default: standard
on_state_unavailable: {mode}
rules:
  - name: waiting
    when: context.interactive
    speed: fast
budgets:
  - name: fast_spend
    window: day
    limit_usd: {fast_usd}
    counts: fast
    on_exceed: downgrade
  - name: all_spend
    window: day
    limit_usd: {all_usd}
    counts: all
    on_exceed: reject
"""
"""What the Redis tests decide with: interactive requests go fast, within a budget for fast spend
and one for all spend (rejecting past it), per UTC day."""


def fleet_policy(path: Path, *, mode: str = "standard", fast_usd: float = 5, all_usd: float = 1000) -> Path:
    path.write_text(FLEET_POLICY.format(mode=mode, fast_usd=fast_usd, all_usd=all_usd))
    return path
