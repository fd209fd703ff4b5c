"""`policy-engine serve`: the engine for every language, as an Anthropic-compatible proxy and a decision API.

    policy-engine serve policies/default.yaml --listen 127.0.0.1:8080 --upstream https://api.anthropic.com

The server needs the `serve` extra (`pip install 'policy-engine[serve]'`: uvicorn, starlette,
httptools and uvloop). The proxy's upstream client is `upstream.UpstreamTransport`.
The proxy is a third driver of the one request life cycle (`integrations._core.exchange`), beside
the SDK middleware and the httpx transports: see `proxy`. The decision API is `decisions` (its
models and OpenAPI description need only pydantic).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeOptions", "Service", "create_app", "run", "PREFIX"]


def __getattr__(name: str) -> Any:
    # The server's parts import starlette: only when asked for, so the models load without the extra.
    if name not in __all__:
        raise AttributeError(name)
    try:
        from . import app, headers
    except ImportError as exc:
        raise ImportError(f"policy-engine serve needs the serve extra: pip install 'policy-engine[serve]' ({exc})") from exc
    return getattr(headers if name == "PREFIX" else app, name)
