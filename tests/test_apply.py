"""Putting a decision on the wire: params for the SDK and headers for raw HTTP."""

from __future__ import annotations

import inspect
from typing import Any

import anthropic
import pytest

from policy_engine.apply import apply_headers, apply_params, merge_beta
from policy_engine.decide import FAST_BETA

PARAMS: dict[str, Any] = {"model": "claude-opus-4-6", "max_tokens": 1024, "messages": [{"role": "user", "content": "Hi"}]}


def test_fast_adds_speed_and_the_beta_without_touching_the_input() -> None:
    original = {**PARAMS, "betas": ["files-api-2025-04-14"]}
    snapshot = {k: (list(v) if isinstance(v, list) else v) for k, v in original.items()}
    sent = apply_params(original, "fast", FAST_BETA)
    assert sent == {**PARAMS, "speed": "fast", "betas": ["files-api-2025-04-14", FAST_BETA]}
    assert original == snapshot  # the caller's dict and list are not modified
    assert sent["messages"] is original["messages"]  # shallow: the prompt is not copied


@pytest.mark.parametrize("betas", [[FAST_BETA], ("x", FAST_BETA), [FAST_BETA, "x"]])
def test_the_beta_is_never_duplicated(betas: Any) -> None:
    sent = apply_params({**PARAMS, "betas": betas}, "fast", FAST_BETA)
    assert sent["betas"] == list(betas) and sent["betas"].count(FAST_BETA) == 1


def test_fast_without_betas_gets_a_list_of_one() -> None:
    assert apply_params(PARAMS, "fast", FAST_BETA)["betas"] == [FAST_BETA]
    assert apply_params({**PARAMS, "betas": None}, "fast", FAST_BETA)["betas"] == [FAST_BETA]


def test_standard_removes_speed_whatever_the_caller_set() -> None:
    for speed in ("fast", "standard"):
        sent = apply_params({**PARAMS, "speed": speed, "betas": ["x"]}, "standard", FAST_BETA)
        assert "speed" not in sent and sent["betas"] == ["x"]
    assert apply_params(PARAMS, "standard", FAST_BETA) == PARAMS


def test_the_sdk_accepts_what_apply_returns() -> None:
    # Every key apply() can add is a parameter of the real SDK's beta create() (no **kwargs catch-all).
    create = anthropic.Anthropic(api_key="unused").beta.messages.create
    signature = inspect.signature(create)
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    signature.bind(**apply_params(PARAMS, "fast", FAST_BETA))
    signature.bind(**apply_params({**PARAMS, "speed": "fast"}, "standard", FAST_BETA))


@pytest.mark.parametrize("headers, expected", [
    ({}, {"anthropic-beta": FAST_BETA}),
    ({"anthropic-beta": "files-api-2025-04-14"}, {"anthropic-beta": f"files-api-2025-04-14,{FAST_BETA}"}),
    ({"Anthropic-Beta": f"a, {FAST_BETA} ,b"}, {"Anthropic-Beta": f"a,{FAST_BETA},b"}),
    ({"anthropic-beta": ""}, {"anthropic-beta": FAST_BETA}),
])
def test_headers_merge_the_beta_once(headers: dict[str, str], expected: dict[str, str]) -> None:
    base = {"x-api-key": "k", "content-type": "application/json"}
    assert apply_headers({**base, **headers}, "fast", FAST_BETA) == {**base, **expected}


def test_standard_headers_are_a_copy_unchanged() -> None:
    headers = {"anthropic-beta": "x", "x-api-key": "k"}
    result = apply_headers(headers, "standard", FAST_BETA)
    assert result == headers and result is not headers


def test_merge_beta() -> None:
    assert merge_beta(None, "b") == "b"
    assert merge_beta("a", "b") == "a,b"
    assert merge_beta(" a ,, b ", "b") == "a,b"
