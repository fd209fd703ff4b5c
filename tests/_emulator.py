"""Shared pieces of the runtime tests: the local emulator, policies and engines, telemetry counts.

Imported by the test modules (not a conftest, so other suites are not affected).
"""

from __future__ import annotations

import http.server
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from policy_engine.decide import Engine, load
from policy_engine.testing.emulator import Emulator


def event_count(telemetry: Any, event: str) -> float:
    """How many `policy_engine.events` of this name the test caused (conftest's `telemetry` fixture)."""
    points = telemetry.metrics().get("policy_engine.events", [])
    return sum(p.value for p in points if p.attributes.get("policy_engine.event") == event)


POLICY_ALWAYS_FAST = """
version: 1
name: always-fast
default: fast
{extra}
"""


def write_policy(tmp_path: Path, extra: str = "", name: str = "policy.yaml") -> Path:
    """A policy whose default is fast, plus `extra` YAML (budgets, on_fast_rate_limited, ...)."""
    path = tmp_path / name
    path.write_text(POLICY_ALWAYS_FAST.format(extra=textwrap.dedent(extra)))
    return path


def engine_for(tmp_path: Path, extra: str = "", **options: Any) -> Engine:
    return load(write_policy(tmp_path, extra), **options)


def started(**options: Any) -> Iterator[Emulator]:
    """A running emulator for a fixture: fast output (no artificial token delay), no minimum cache size."""
    emu = Emulator(standard_otps=None, min_cache_tokens=0, **options)
    emu.start()
    try:
        yield emu
    finally:
        emu.close()


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    """A fresh emulator per test, serving the Claude API."""
    yield from started()


def messages_params(text: str = "Hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "claude-opus-5", "max_tokens": 64, "messages": [{"role": "user", "content": text}], **extra}


class Gateway:
    """A real HTTP intermediary in front of the emulator (a load balancer, a CDN): it forwards each
    request, waits for the API's answer (so the emulator has billed it), and answers the next `fail`
    requests itself with a 504 page of its own, which carries no `request-id` (and `fail_headers`: AWS API
    Gateway's carry its `x-amzn-RequestId`)."""

    def __init__(self, upstream: str) -> None:
        gateway = self
        self.upstream, self.fail = upstream, 0
        self.fail_headers: dict[str, str] = {}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                answer = httpx.post(gateway.upstream + self.path, content=body, headers=headers, timeout=10)
                if gateway.fail > 0:
                    gateway.fail -= 1
                    status, sent, content = 504, {"content-type": "text/html", **gateway.fail_headers}, b"<html>504</html>"
                else:
                    status, sent, content = answer.status_code, dict(answer.headers), answer.content
                self.send_response(status)
                for name, value in sent.items():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(name, value)
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gateway(emulator: Emulator) -> Iterator[Gateway]:  # noqa: F811
    gw = Gateway(emulator.url)
    yield gw
    gw.close()

