"""`policy-engine serve`: the engine for every language, as an Anthropic-compatible proxy and a decision API.

    policy-engine serve policies/default.yaml --listen 127.0.0.1:8080 --upstream https://api.anthropic.com

Needs the `serve` extra (`pip install 'policy-engine[serve]'`: uvicorn and starlette). The proxy
is a third driver of the one request life cycle (`integrations._core.exchange`), beside the SDK
middleware and the httpx transports: see `proxy`. The decision API is in `decisions`.
"""

from __future__ import annotations

try:
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by installs without the extra
    raise ImportError("policy-engine serve needs the serve extra: pip install 'policy-engine[serve]'") from exc

from .app import ServeOptions, Service, create_app, run
from .headers import PREFIX

__all__ = ["ServeOptions", "Service", "create_app", "run", "PREFIX"]
