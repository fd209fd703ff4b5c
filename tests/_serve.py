"""`policy-engine serve` as a real process for the tests: started on a free port, in front of an emulator.

    with serving(policy_path, upstream=emulator.url) as server:
        anthropic.Anthropic(base_url=server.url, api_key="sk-test").messages.create(...)
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class Server:
    url: str
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    """What the server wrote (stderr and stdout) so far."""

    def stderr(self) -> str:
        return "".join(self.lines)

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, then wait for the drain; the exit status (negative: ended by that signal)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise AssertionError(f"policy-engine serve did not stop within {timeout_s}s:\n{self.stderr()}") from None


def start(policies: Sequence[str | Path], *, upstream: str, args: Sequence[str] = (),
          env: dict[str, str] | None = None, timeout_s: float = 30.0) -> Server:
    command = [sys.executable, "-m", "policy_engine", "serve", *map(str, policies), "--listen", "127.0.0.1:0",
               "--upstream", upstream, "--allow-http-upstream", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **(env or {})})
    server = Server("", process)
    found = threading.Event()

    def drain() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            server.lines.append(line)
            match = re.search(r"listening on (http://\S+)", line)
            if match and not found.is_set():
                server.url = match.group(1)
                found.set()
        found.set()

    threading.Thread(target=drain, daemon=True).start()
    if not found.wait(timeout_s) or not server.url:
        process.kill()
        raise AssertionError(f"policy-engine serve did not start:\n{server.stderr()}")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(server.url + "/healthz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise AssertionError(f"policy-engine serve is not healthy:\n{server.stderr()}")
        time.sleep(0.05)


@contextlib.contextmanager
def serving(*policies: str | Path, upstream: str, args: Sequence[str] = (),
            env: dict[str, str] | None = None) -> Iterator[Server]:
    server = start(policies, upstream=upstream, args=args, env=env)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.stop()
