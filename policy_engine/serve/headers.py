"""The proxy's HTTP headers: the decision context a client sends, what is forwarded, what is answered.

A client gives the context of its request in headers under `x-policy-`: one per context key, the
key's underscores written as dashes (`x-policy-latency-slo-ms: 8000`, `x-policy-tenant: acme`,
`x-policy-interactive: true`), and one per label (`x-policy-label-team: search`). They are never
forwarded upstream. Values are converted to the key's type when they read as one; a value that
does not (`x-policy-latency-slo-ms: soon`), or an unknown key, is passed on as it came, so the
engine refuses it exactly as it refuses a bad `policy_context` (the policy's `on_invalid_context`).

Each proxied Messages response carries the decision under the same prefix (`x-policy-speed`, ...).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

import httpx

from ..integrations._core import Flight

__all__ = ["PREFIX", "context_from_headers", "upstream_headers", "client_headers", "decision_headers"]

PREFIX: Final = "x-policy-"
_LABEL: Final = PREFIX + "label-"

_HOP_BY_HOP: Final = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
})
"""Headers that describe one connection, not the message: each hop sets its own."""

_INTS: Final = frozenset({"latency_slo_ms"})
_BOOLS: Final = frozenset({"interactive"})


def context_from_headers(headers: Iterable[tuple[str, str]]) -> dict[str, Any] | None:
    """The decision context of a request's `x-policy-*` headers (None when it has none)."""
    context: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for name, value in headers:
        name = name.lower()
        if not name.startswith(PREFIX):
            continue
        if name.startswith(_LABEL):
            labels[name[len(_LABEL):]] = value
            continue
        key = name[len(PREFIX):].replace("-", "_")
        context[key] = _typed(key, value.strip())
    if labels:
        context["labels"] = labels
    return context or None


def _typed(key: str, value: str) -> Any:
    if key in _INTS:
        try:
            return int(value)
        except ValueError:
            return value
    if key in _BOOLS:
        lowered = value.lower()
        return True if lowered == "true" else False if lowered == "false" else value
    return value


def upstream_headers(headers: Iterable[tuple[str, str]], *, identity: bool) -> list[tuple[str, str]]:
    """A client's request headers as they go upstream: its credentials unchanged, without hop-by-hop headers
    or the `x-policy-*` context. `identity`: ask for an uncompressed body (the proxy reads it on the way)."""
    headers = list(headers)
    dropped = _HOP_BY_HOP | _named_by_connection(v for n, v in headers if n.lower() == "connection")
    kept = [(n, v) for n, v in headers if (low := n.lower()) not in dropped and not low.startswith(PREFIX)
            and not (identity and low == "accept-encoding")]
    if identity:
        kept.append(("accept-encoding", "identity"))
    return kept


_HOP_BY_HOP_BYTES: Final = frozenset(name.encode() for name in _HOP_BY_HOP)


def client_headers(headers: httpx.Headers) -> list[tuple[bytes, bytes]]:
    """An upstream response's headers as they go back to the client, byte for byte (the server sets the framing)."""
    named = _named_by_connection(headers.get_list("connection"))
    dropped = _HOP_BY_HOP_BYTES | {name.encode("latin-1") for name in named} if named else _HOP_BY_HOP_BYTES
    return [(n, v) for n, v in headers.raw if n.lower() not in dropped]


def _named_by_connection(values: Iterable[str]) -> frozenset[str]:
    """The headers a `Connection` header names: they are about this connection only (RFC 9110, 7.6.1)."""
    return frozenset(name.strip().lower() for value in values for name in value.split(",") if name.strip())


def decision_headers(flight: Flight | None) -> list[tuple[str, str]]:
    """What was decided for a proxied Messages request, for its response."""
    if flight is None:
        return [(PREFIX + "decision", "undecidable")]  # sent at standard speed, unmetered
    decision = flight.decision
    return [
        (PREFIX + "speed", flight.speed),
        (PREFIX + "decided-speed", decision.speed),
        (PREFIX + "rule", decision.rule),
        (PREFIX + "outcome", decision.outcome),
        (PREFIX + "policy", f"{decision.policy_name}@{decision.policy_version}"),
    ]
