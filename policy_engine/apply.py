"""Stage 5, apply: put a decision on the wire.

Fast adds `speed: "fast"` and, for models that still need it, merges the fast-mode
beta into the caller's betas without duplicates; standard removes `speed`, whatever
the caller had set, so a request never reaches the API at a speed the policy did not
choose. Where a platform offers fast mode as a separate model id (Microsoft Foundry's
`-fast` models), the speed is the model id instead, and `speed` is never sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["apply_params", "apply_headers", "merge_beta"]


def merge_beta(existing: str | None, beta: str) -> str:
    """`anthropic-beta` header value with `beta` added once (comma-separated, order kept)."""
    values = [v.strip() for v in (existing or "").split(",") if v.strip()]
    if beta not in values:
        values.append(beta)
    return ",".join(values)


def apply_params(params: Mapping[str, Any], speed: str, beta: str | None,
                 models: tuple[str, str] | None = None) -> dict[str, Any]:
    """New Messages API params for `speed` (the SDK's `betas` list carries the beta; None: no beta).

    `models`: (standard id, fast id) on a platform that asks for fast mode by model id."""
    result = dict(params)
    if models is not None:
        result.pop("speed", None)
        result["model"] = models[1] if speed == "fast" else models[0]
        return result
    if speed == "fast":
        result["speed"] = "fast"
        if beta is not None:
            betas = list(result.get("betas") or ())
            if beta not in betas:
                betas.append(beta)
            result["betas"] = betas
    else:
        result.pop("speed", None)
    return result


def apply_headers(headers: Mapping[str, str], speed: str, beta: str | None) -> dict[str, str]:
    """New HTTP headers for `speed`: fast merges the beta into `anthropic-beta` (None: none to add)."""
    result = dict(headers)
    if speed == "fast" and beta is not None:
        name = next((k for k in result if k.lower() == "anthropic-beta"), "anthropic-beta")
        result[name] = merge_beta(result.get(name), beta)
    return result
