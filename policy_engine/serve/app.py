"""The ASGI application of `policy-engine serve` and the server process around it.

Routes: `POST /v1/decide|settle|release` (the decision API), `GET /healthz`, `GET /readyz`, and
everything else to the proxy (`POST /v1/messages` decided and settled, other paths passed on).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..catalog import Catalog
from ..integrations._core import Runtime
from ..ledger import Ledger, MemoryLedger
from ..ratelimit import RateLimitStore
from ..reload import ReloadingEngine
from .._threads import run_in_thread
from .decisions import ApiFailure, DecisionApi, DecisionStore
from .proxy import BodyTooLarge, ClientGone, Proxy, read_body

__all__ = ["ServeOptions", "Service", "create_app", "run"]

log = logging.getLogger("policy_engine.serve")


@dataclass
class ServeOptions:
    """How `policy-engine serve` runs (the CLI's options)."""

    policies: Sequence[str]
    upstream: str = "https://api.anthropic.com"
    allow_http_upstream: bool = False
    """A plain-http upstream sends API keys in the clear: only for a local emulator."""
    host: str = "127.0.0.1"
    port: int = 8080
    catalog: Catalog | str | None = None
    platform: str = "claude_api"
    ledger: Ledger | None = None
    ratelimits: RateLimitStore | None = None
    decision_log: Any = None
    auth_token: str | None = None
    """When set, the decision API wants `Authorization: Bearer <token>` (the proxy passes the client's own on)."""
    watch_s: float = 0.0
    """Poll the policy files this often and reload on a change (0: reload on SIGHUP only)."""
    drain_timeout_s: float = 30.0
    max_body_bytes: int = 32 * 1024 * 1024
    upstream_timeout: httpx.Timeout = field(default_factory=lambda: httpx.Timeout(600.0, connect=10.0))
    transport: httpx.AsyncBaseTransport | None = None


class UpstreamRefused(ValueError):
    """An upstream the server will not serve: a URL it will not send API keys to, or a platform whose clients
    call paths it does not decide."""


PROXIED_PLATFORMS: Final = ("claude_api", "claude_platform_aws", "foundry")
"""The platforms whose clients call the Messages API's own paths (`/v1/messages`), which the proxy decides."""


def check_platform(platform: str) -> str:
    if platform not in PROXIED_PLATFORMS:
        raise UpstreamRefused(
            f"--platform {platform}: the proxy decides calls to /v1/messages, and "
            f"{'Bedrock' if platform == 'bedrock' else 'Vertex AI' if platform == 'vertex' else 'that platform'}'s "
            f"clients call endpoints of their own, which it would pass on undecided and unmetered; give one of "
            f"{', '.join(PROXIED_PLATFORMS)}, or put the engine in the client (FastModePolicy, FastModeTransport)")
    return platform


def check_upstream(url: str, allow_http: bool) -> str:
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise UpstreamRefused(f"--upstream must be an http(s) URL with a host, got {url!r}")
    if parsed.scheme == "http" and not allow_http:
        raise UpstreamRefused(f"refusing plain-http upstream {url}: clients' API keys would cross the network "
                              f"in the clear; pass --allow-http-upstream for a local emulator")
    return url


class Service:
    """The engine (reloaded on change), its runtime, the proxy and the decision API of one server process."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        check_upstream(options.upstream, options.allow_http_upstream)
        check_platform(options.platform)
        engine_options: dict[str, Any] = {"platform": options.platform}
        for name in ("ledger", "ratelimits", "decision_log"):
            if getattr(options, name) is not None:
                engine_options[name] = getattr(options, name)
        self.engines = ReloadingEngine(list(options.policies), options.catalog, poll_interval_s=options.watch_s,
                                       **engine_options)
        self._runtime: Runtime | None = None
        self.offload = not isinstance(self.engines.engine.ledger, MemoryLedger)
        self.proxy = Proxy(options.upstream, self.runtime, offload=self.offload, max_body_bytes=options.max_body_bytes,
                           timeout=options.upstream_timeout, transport=options.transport)
        self.decisions = DecisionApi(self.runtime, self.call, DecisionStore(self.engines.engine.reservation_ttl_s))

    def runtime(self) -> Runtime:
        """The runtime of the engine deciding now (a reload makes a new one; requests in flight keep theirs)."""
        engine = self.engines.engine
        runtime = self._runtime
        if runtime is None or runtime.engine is not engine:
            runtime = self._runtime = Runtime(engine, platform=self.options.platform)
        return runtime

    async def call(self, function: Callable[..., Any], *args: Any, undo: Callable[[Any], Any] | None = None,
                   **kwargs: Any) -> Any:
        if self.offload:
            return await run_in_thread(functools.partial(function, *args, **kwargs), undo=undo)
        return function(*args, **kwargs)

    def reload(self) -> bool:
        changed = self.engines.reload()
        if self.engines.last_error is not None:
            log.error("policy reload failed; the previous version keeps deciding:\n%s", self.engines.last_error)
        elif changed:
            log.warning("policies reloaded: %s", self.engines.versions)
        return changed

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Policies loaded, and the shared state reachable or every policy going on without it."""
        engine = self.engines.engine
        state = _reachable(engine.ledger)
        without = all(p.policy.on_state_unavailable == "standard" for p in engine.policies.values())
        return state or without, {"policies": self.engines.versions, "state_reachable": state,
                                  "on_state_unavailable": "standard" if without else "reject"}

    async def aclose(self) -> None:
        await self.proxy.aclose()
        waiting = self.decisions.store.drain()  # a client settling them later would find no decision
        if waiting:
            await self.call(self.decisions.settle_unclaimed, self.runtime(), waiting, "left at shutdown")
        self.engines.close()
        engine = self.engines.engine
        for part in (engine.decision_log, engine.ratelimits, engine.ledger):
            close = getattr(part, "close", None)
            if close is not None:
                await asyncio.to_thread(close)  # flushes what is journaled or buffered


def _reachable(ledger: Any) -> bool:
    client = getattr(ledger, "client", None)
    ping = getattr(client, "ping", None)
    if ping is None:
        return True  # in-process or a local file: nothing to reach
    try:
        return bool(ping())
    except Exception:  # noqa: BLE001 - any failure means not reachable
        return False


API_PATHS: Final = frozenset({"/v1/decide", "/v1/settle", "/v1/release", "/healthz", "/readyz"})


def create_app(service: Service) -> ASGIApp:
    """The ASGI application serving `service`: the proxy for every path but the server's own (`API_PATHS`),
    which a Starlette application serves, with the lifespan."""
    token = service.options.auth_token

    def authorized(request: Request) -> bool:
        if not token:
            return True
        given = request.headers.get("authorization", "")
        return given[:7].lower() == "bearer " and hmac.compare_digest(given[7:].encode(), token.encode())

    def api(verb: Callable[[Any], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                if not authorized(request):
                    raise ApiFailure(401, "unauthorized", "the decision API wants Authorization: Bearer <token>")
                try:
                    data = json.loads(await read_body(request.receive, request.headers.get("content-length"),
                                                      service.options.max_body_bytes))
                except ClientGone:
                    raise ApiFailure(400, "client_gone", "the client left before sending its request") from None
                except BodyTooLarge:
                    raise ApiFailure(413, "request_too_large", "request body too large") from None
                except ValueError:
                    raise ApiFailure(400, "invalid_json", "the request body is not JSON") from None
                return JSONResponse(await verb(data))
            except ApiFailure as failure:
                return JSONResponse(failure.body(), status_code=failure.status)
        return endpoint

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        ready, detail = await asyncio.to_thread(service.ready)
        return JSONResponse({"status": "ready" if ready else "not ready", **detail}, status_code=200 if ready else 503)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        # Not on Windows, nor off the main thread (asyncio raises RuntimeError there, uvloop ValueError).
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, service.reload))
        try:
            yield
        finally:
            await service.aclose()

    own = Starlette(lifespan=lifespan, routes=[
        Route("/v1/decide", api(service.decisions.decide), methods=["POST"]),
        Route("/v1/settle", api(service.decisions.settle), methods=["POST"]),
        Route("/v1/release", api(service.decisions.release), methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ])
    proxy = service.proxy

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        # (`/v1/settle/` too is the server's: proxied, it would carry the decision API's token upstream)
        if scope["type"] == "http" and scope["path"].rstrip("/") not in API_PATHS:
            await proxy(scope, receive, send)
        else:
            await own(scope, receive, send)
    return app


def run(options: ServeOptions, *, access_log: bool = False) -> int:
    """Serve until SIGTERM or SIGINT: then stop accepting, let requests in flight finish (streams within
    `drain_timeout_s`; one cut there settles by `on_incomplete_stream`) and flush the ledger."""
    import uvicorn

    service = Service(options)
    # IPPROTO_TCP said explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (a default
    # socket's is 0), and without it Nagle's algorithm and the client's delayed ACK add ~40 ms per response.
    sock = socket.socket(socket.AF_INET6 if ":" in options.host else socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((options.host, options.port))
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(create_app(service), log_level="info" if access_log else "warning", access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=math.ceil(options.drain_timeout_s), server_header=False, date_header=False)
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    print(f"policy-engine serve: listening on http://{shown}:{port} (upstream {options.upstream}; "
          f"policies {', '.join(service.engines.versions)})", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    return 0


def serve_env_token(name: str | None) -> str | None:
    """The decision API's token from the environment variable `name` (never from the command line: it would
    show in `ps`)."""
    if not name:
        return None
    value = os.environ.get(name)
    if not value:
        raise ValueError(f"--auth-token-env {name}: the variable is not set or empty")
    return value
