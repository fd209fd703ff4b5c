"""`policy-engine serve`: the proxy and decision API server."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from . import EXIT_OK, UsageError

__all__ = ["VERBS", "setup_serve"]


def setup_serve(p: argparse.ArgumentParser) -> None:
    """Serve the Messages API as a proxy that decides fast mode per request, and a decision API.

    Clients point their base URL here (ANTHROPIC_BASE_URL=http://127.0.0.1:8080): POST
    /v1/messages is decided, rewritten, forwarded and settled, streaming or not; every other
    path passes through untouched. Context comes from x-policy-* request headers
    (x-policy-tenant, x-policy-latency-slo-ms, x-policy-interactive, x-policy-label-NAME) and
    the decision comes back in x-policy-* response headers. Services that call Anthropic
    themselves use POST /v1/decide, /v1/settle and /v1/release. GET /healthz and /readyz for
    probes; SIGHUP reloads the policies; SIGTERM drains (see --drain-timeout).
    Needs the serve extra: pip install 'policy-engine[serve]'."""
    p.add_argument("policies", nargs="+", metavar="POLICY", help="policy files; the first decides by default")
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="address to listen on (default 127.0.0.1:8080; port 0 picks a free one, printed at start)")
    p.add_argument("--upstream", default="https://api.anthropic.com", metavar="URL",
                   help="where requests go (default https://api.anthropic.com)")
    p.add_argument("--allow-http-upstream", action="store_true",
                   help="allow a plain-http upstream (a local emulator): API keys would cross it in the clear")
    p.add_argument("--catalog", metavar="FILE", help="catalog file extending the packaged one")
    p.add_argument("--platform", default="claude_api",
                   help="platform the upstream is (prices and fast availability are its): claude_api (default), "
                        "claude_platform_aws or foundry")
    p.add_argument("--redis", metavar="URL",
                   help="share budgets and fast rate limits with every replica on this Redis (redis://host:6379/0)")
    p.add_argument("--redis-prefix", default="pe:", metavar="PREFIX", help="key prefix in Redis (default pe:)")
    p.add_argument("--ledger-path", metavar="FILE", help="keep budgets in this SQLite file (one machine)")
    p.add_argument("--decision-log", metavar="FILE", help="append a JSON record of each request that ended")
    p.add_argument("--auth-token-env", metavar="NAME",
                   help="environment variable holding the decision API's bearer token (no auth without it)")
    p.add_argument("--watch", type=float, default=0.0, metavar="SECONDS",
                   help="poll the policy files this often and reload on a change (default: on SIGHUP only)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, how long requests in flight may take to finish (default 30)")
    p.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024, metavar="N",
                   help="largest request body accepted (default 32 MiB, the Messages API's own limit)")
    p.add_argument("--upstream-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="longest wait for upstream data (default 600)")
    p.add_argument("--access-log", action="store_true", help="log each request line (never its headers)")
    p.set_defaults(run=run_serve)


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen must be HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _options(args: argparse.Namespace) -> Any:
    import httpx

    from ..serve import ServeOptions
    from ..serve.app import UpstreamRefused, check_platform, check_upstream, serve_env_token

    for path in args.policies:
        if not os.path.isfile(path):
            raise UsageError(f"no such policy file: {path}")
    if args.redis and args.ledger_path:
        raise UsageError("--redis and --ledger-path are two places for the same budgets: give one")
    try:
        check_upstream(args.upstream, args.allow_http_upstream)
        check_platform(args.platform)
        token = serve_env_token(args.auth_token_env)
    except (UpstreamRefused, ValueError) as exc:
        raise UsageError(str(exc)) from None
    host, port = _listen(args.listen)
    ledger: Any = None
    ratelimits: Any = None
    decision_log: Any = None
    if args.redis:
        from ..ledger.redis import RedisLedger, RedisRateLimitStore

        ledger = RedisLedger(url=args.redis, prefix=args.redis_prefix)
        ratelimits = RedisRateLimitStore(url=args.redis, prefix=args.redis_prefix)
    elif args.ledger_path:
        from ..ledger.sqlite import SqliteLedger

        ledger = SqliteLedger(args.ledger_path)
    if args.decision_log:
        from ..decisionlog import DecisionLog

        decision_log = DecisionLog(args.decision_log)
    from .commands import _catalog

    return ServeOptions(
        policies=args.policies, upstream=args.upstream, allow_http_upstream=args.allow_http_upstream, host=host,
        port=port, catalog=_catalog(args), platform=args.platform, ledger=ledger, ratelimits=ratelimits,
        decision_log=decision_log, auth_token=token, watch_s=args.watch, drain_timeout_s=args.drain_timeout,
        max_body_bytes=args.max_body_bytes, upstream_timeout=httpx.Timeout(args.upstream_timeout, connect=10.0))


def run_serve(args: argparse.Namespace) -> int:
    try:
        from ..serve import run
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    options = _options(args)
    run(options, access_log=args.access_log)
    return EXIT_OK


VERBS: dict[str, Callable[[argparse.ArgumentParser], None]] = {"serve": setup_serve}
