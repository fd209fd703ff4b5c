"""A small WSGI app for the pre-fork tests: each request to `/` makes one Messages API call
through the anthropic SDK with `FastModePolicy`, against the emulator.

Everything is built at import, as an app served with `gunicorn --preload` builds it in the
master before forking workers: the engine, its ledger (and the ledger's connection, opened by
one call made here), the SDK client and the middleware. Configured by the environment:

    PE_EMULATOR_URL   the emulator's base URL
    PE_POLICY         the policy file
    PE_LEDGER         sqlite:<path> or redis://... (PE_REDIS_PREFIX: the key prefix)

`/` answers JSON: {"pid", "outcome": "ok" | "rejected" | "error", "error"?}; `/health` {"pid"}
after 50 ms (so concurrent probes reach several workers).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import anthropic

from policy_engine.decide import load
from policy_engine.errors import CeilingExceeded
from policy_engine.integrations.anthropic import FastModePolicy

API_KEY = "sk-fork-test"
REQUEST: dict[str, Any] = {"model": "claude-opus-5", "max_tokens": 64, "messages": [{"role": "user", "content": "Hello there"}]}


def make_ledger(spec: str, prefix: str = "pe:") -> Any:
    if spec.startswith("sqlite:"):
        from policy_engine.ledger.sqlite import SqliteLedger

        return SqliteLedger(spec[len("sqlite:"):])
    from policy_engine.ledger.redis import RedisLedger

    return RedisLedger(url=spec, prefix=prefix, timeout_s=2.0)


def build(url: str, policy: str, ledger_spec: str, prefix: str = "pe:") -> tuple[FastModePolicy, anthropic.Anthropic]:
    """The engine, the middleware and the client; one call made now, so every connection is open before a fork."""
    engine = load(policy, ledger=make_ledger(ledger_spec, prefix))
    middleware = FastModePolicy(engine)
    # The warm-up call goes through a client of its own, closed after: an SDK client's keep-alive
    # connections must not cross a fork either, and that is the application's business, not ours.
    with anthropic.Anthropic(base_url=url, api_key=API_KEY, middleware=[middleware], max_retries=0) as warm:
        warm.messages.create(**REQUEST)
    return middleware, anthropic.Anthropic(base_url=url, api_key=API_KEY, middleware=[middleware], max_retries=0)


def call(client: anthropic.Anthropic) -> dict[str, Any]:
    """One request; what happened to it."""
    try:
        client.messages.create(**REQUEST)
    except CeilingExceeded:
        return {"pid": os.getpid(), "outcome": "rejected"}
    except Exception as exc:  # noqa: BLE001 - the test wants to see every failure
        return {"pid": os.getpid(), "outcome": "error", "error": f"{type(exc).__name__}: {exc}"}
    return {"pid": os.getpid(), "outcome": "ok"}


if "PE_EMULATOR_URL" in os.environ:
    _middleware, _client = build(os.environ["PE_EMULATOR_URL"], os.environ["PE_POLICY"], os.environ["PE_LEDGER"],
                                 os.environ.get("PE_REDIS_PREFIX", "pe:"))


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    if environ.get("PATH_INFO") == "/health":
        time.sleep(0.05)
        body = json.dumps({"pid": os.getpid()}).encode()
    else:
        body = json.dumps(call(_client)).encode()
    start_response("200 OK", [("content-type", "application/json"), ("content-length", str(len(body)))])
    return [body]
