"""Fast-mode policies for the anthropic SDK, as one line of client configuration.

    import anthropic, policy_engine
    from policy_engine.integrations.anthropic import FastModePolicy, policy_context

    engine = policy_engine.load("policies/default.yaml", ledger_path="ledger.db")
    client = anthropic.Anthropic(middleware=[FastModePolicy(engine, context={"interactive": True})])

    with policy_context(tenant="acme", latency_slo_ms=8_000):
        message = client.messages.create(model="claude-opus-4-6", max_tokens=1024, messages=[...])

Every POST to /v1/messages (`client.messages` and `client.beta.messages`, sync or async,
streaming or not) is decided by the engine, sent with `speed: "fast"` and the fast-mode
beta merged into `anthropic-beta` (or with no `speed` at all for standard), and settled
against the budgets from the response's usage. The SDK's client-level middleware runs
once per HTTP attempt inside its retry loop, so the decision is keyed on the SDK's
idempotency key: retries reuse it, and one logical request makes one reservation and
one settlement. A fast-mode 429 follows the policy's `on_fast_rate_limited`. A rejected
request raises `CeilingExceeded` before anything is sent. Batches never go fast
(`speed` is removed from their requests); count_tokens and other endpoints pass through.

On Amazon Bedrock, Google Cloud Vertex AI and Microsoft Foundry, decisions use that
platform's catalog entries (model ids, fast availability, prices): build the middleware
with `FastModePolicy.attach(client, engine)`, which reads the platform off the client, or
pass `platform=` yourself. A middleware that finds its client on another platform than the
one it decided for switches to the client's from the next request on, and records a
`policy_engine.platform_mismatch` event.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import httpx2
from anthropic._constants import DEFAULT_MAX_RETRIES
from anthropic._exceptions import APIConnectionError, APIStatusError
from anthropic._middleware import AsyncCallNext, CallNext, Middleware
from anthropic._models import BaseModel as SDKModel
from anthropic._request import APIRequest
from anthropic._response import APIResponse, AsyncAPIResponse

from ..decide import Engine
from ._core import (
    ContextSource,
    FastModeRateLimited,
    Flight,
    Runtime,
    StreamTracker,
    UpstreamUnanswered,
    adrive,
    body_usage,
    drive,
    endpoint,
    exchange,
    policy_context,
    sdk_will_retry,
    strip_batch_speed,
)
from ._streams import decoded_headers, tracked_stream

__all__ = ["FastModePolicy", "FastModeRateLimited", "policy_context", "platform_of"]

try:  # the SDK's client-side refusal fallback, where this SDK has it
    from anthropic.lib.middleware import BetaRefusalFallbackMiddleware as _RefusalFallback
except ImportError:  # pragma: no cover - depends on the SDK version
    _RefusalFallback = None  # type: ignore[assignment,misc]

try:  # newer SDKs let any error opt into the retry loop
    from anthropic._exceptions import RetryableError as _RetryableError
except ImportError:  # pragma: no cover - depends on the SDK version
    _RetryableError = ()  # type: ignore[assignment,misc]


class FastModePolicy(Middleware):
    """anthropic SDK middleware applying an `Engine`'s decisions to every Messages request.

    `context`: the decision context (a mapping, or a function of the request body that
    returns one), merged under `policy_context(...)` blocks. `policy`: which of the
    engine's policies decides (default: its first). `account`: the rate-limit account
    (default: a hash of the client's API key). `observe`: time responses into the engine's
    throughput observer (created if the engine has none). `fast_retries` and
    `max_retry_wait_s` bound the waits of `on_fast_rate_limited: retry`.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        context: ContextSource = None,
        policy: str | None = None,
        account: str | None = None,
        observe: bool = True,
        fast_retries: int = 2,
        max_retry_wait_s: float = 30.0,
        platform: str | None = None,
    ) -> None:
        self.engine = engine
        self.runtime = Runtime(engine, context=context, policy=policy, account=account, observe=observe,
                               fast_retries=fast_retries, max_retry_wait_s=max_retry_wait_s, platform=platform)
        self._platforms: dict[type, str] = {}
        self._default_max_retries = DEFAULT_MAX_RETRIES

    @classmethod
    def attach(cls, client: Any, engine: Engine, **options: Any) -> Any:
        """A copy of `client` whose middleware ends with a FastModePolicy for the client's platform.

        `options` are FastModePolicy's (`context`, `policy`, ...). Works for every client class
        of the SDK, sync or async: Anthropic, AnthropicBedrock, AnthropicVertex, AnthropicFoundry."""
        options.setdefault("platform", platform_of(client))
        policy = cls(engine, **options)
        policy._default_max_retries = client.max_retries  # known before the first error response says it
        return client.with_options(middleware=[*client.middleware, policy])

    # -- shared by both clients ----------------------------------------------------------

    @staticmethod
    def _route(request: APIRequest) -> tuple[APIRequest | None, Mapping[str, Any] | None]:
        """(a request to pass on as it is, None) or (None, the Messages body to decide)."""
        kind = endpoint(request.url) if request.method.lower() == "post" else None
        body = request.json
        if kind == "batches":
            return _derive(request, strip_batch_speed(body), request.headers), None
        if kind is None or not isinstance(body, Mapping):
            return request, None
        return None, body

    def _start(self, request: APIRequest, call_next: Any) -> tuple[APIRequest | None, Any, _Call | None]:
        """What to do with a request: (pass it on as it is, -, None), (None, the SDK's refusal fallback and the
        chain after it, None) or (None, None, the call to run through the life cycle)."""
        passed, body = self._route(request)
        if body is None:
            return passed, None, None
        inner = _refusal_fallback_next(request, call_next)
        if inner is not None:
            # The SDK's refusal fallback comes next: let it run its hops through this middleware, so each
            # hop is decided, guarded and settled (the order [FallbackMiddleware, FastModePolicy]).
            return None, inner, None
        beta_name, beta = _beta(request.headers)
        call = _Call(self, request, body, beta_name, beta)
        return None, None, call

    def handle(self, request: APIRequest, call_next: CallNext) -> APIResponse[Any]:
        passed, fallback, call = self._start(request, call_next)
        if call is None:
            if fallback is None:
                return call_next(passed)  # type: ignore[arg-type]
            return fallback[0].handle(request, lambda hop: self.handle(hop, fallback[1]))  # type: ignore[no-any-return]
        return drive(call.steps(), call_next, _close, call.read, self.runtime.sleep)  # type: ignore[no-any-return]

    async def handle_async(self, request: APIRequest, call_next: AsyncCallNext) -> AsyncAPIResponse[Any]:
        passed, fallback, call = self._start(request, call_next)
        if call is None:
            if fallback is None:
                return await call_next(passed)  # type: ignore[arg-type]
            return await fallback[0].handle_async(request, lambda hop: self.handle_async(hop, fallback[1]))  # type: ignore[no-any-return]
        return await adrive(call.steps(), call_next, _aclose, call.aread, self.runtime.offload)  # type: ignore[no-any-return]

    def _platform(self, client: Any, flight: Flight | None) -> None:
        """Follow the client's platform: decide for it from now on, and settle this flight at its prices."""
        platform = self._platforms.get(type(client))
        if platform is None:
            platform = self._platforms[type(client)] = platform_of(client)
        if platform != self.runtime.platform or (flight is not None and flight.decision.platform != platform):
            self.runtime.learn_platform(platform, flight)

    # -- the SDK's retry loop ------------------------------------------------------------

    def _max_retries(self, request: APIRequest) -> int:
        return request.options.get_max_retries(self._default_max_retries)

    def _error_response(self, request: APIRequest, flight: Flight, response: APIResponse[Any] | AsyncAPIResponse[Any]) -> None:
        """An error response: the flight lives on if the SDK will retry it, else its reservation goes."""
        http = response.http_response
        if not sdk_will_retry(http.status_code, http.headers, request.retries_taken, self._max_retries(request)):
            self.runtime.release(flight)

    def _attempt_failed(self, request: APIRequest, flight: Flight | None, exc: BaseException) -> None:
        if flight is None:
            return
        retry = False
        if request.retries_taken < self._max_retries(request):
            cause: BaseException | None = exc
            seen: set[int] = set()
            while cause is not None and id(cause) not in seen:
                seen.add(id(cause))
                if isinstance(cause, APIStatusError):
                    retry = sdk_will_retry(cause.status_code, cause.response.headers, request.retries_taken,
                                           self._max_retries(request))
                    break
                if isinstance(cause, UpstreamUnanswered):
                    retry = sdk_will_retry(cause.status, cause.headers, request.retries_taken, self._max_retries(request))
                    break
                if isinstance(cause, (APIConnectionError, _RetryableError)):
                    retry = True
                    break
                cause = cause.__cause__
        self.runtime.abandon(flight, exc, retried=retry)


class _Call:
    """The `Wire` of one SDK call: the SDK's request and response types, for the life cycle (`_core.exchange`)."""

    __slots__ = ("policy", "sdk_request", "body", "beta_name", "beta", "streaming")

    def __init__(self, policy: FastModePolicy, request: APIRequest, body: Mapping[str, Any], beta_name: str,
                 beta: str | None) -> None:
        self.policy = policy
        self.sdk_request = request
        self.body = body
        self.beta_name = beta_name
        self.beta = beta
        self.streaming = request.stream

    def steps(self) -> Any:
        return exchange(self.policy.runtime, self, self.body, self.beta, self.sdk_request.options.idempotency_key)

    def request(self, flight: Flight | None) -> APIRequest:
        runtime, request = self.policy.runtime, self.sdk_request
        headers = request.headers
        wire_beta = runtime.wire_beta(flight, self.beta)
        if wire_beta is not None and wire_beta != self.beta:
            headers = {**headers, self.beta_name: wire_beta}
        wire = _derive(request, runtime.wire_body(flight, self.body), headers)
        if flight is not None:
            flight.sent_at = time.perf_counter()
        return wire

    def inspect(self, flight: Flight | None, response: Any) -> tuple[int, Any, str | None]:
        client = response._client
        self.policy._platform(client, flight)
        self.policy._default_max_retries = client.max_retries  # what the SDK's retry loop goes by
        # The client's key, not the sent headers: a case-insensitive header scan costs more.
        credential = getattr(client, "api_key", None) or getattr(client, "auth_token", None)
        http = response.http_response
        return http.status_code, http.headers, credential

    def failed(self, flight: Flight, exc: BaseException) -> None:
        self.policy._attempt_failed(self.sdk_request, flight, exc)

    def refused(self, flight: Flight, response: Any) -> None:
        self.policy._error_response(self.sdk_request, flight, response)

    def tracked(self, response: Any, tracker: StreamTracker) -> Any:
        return _rewrap(response, _Tracked(response.http_response, tracker))

    def concluded(self, response: Any, usage: Any) -> tuple[Any, Any]:
        return usage, response

    def read(self, response: APIResponse[Any]) -> Any:
        # Parsing through the response caches the model the SDK hands the caller: parsed once.
        if _parses_to_model(self.sdk_request):
            return getattr(response.parse(), "usage", None)
        return body_usage(response.http_response.read() or b"null")

    async def aread(self, response: AsyncAPIResponse[Any]) -> Any:
        if _parses_to_model(self.sdk_request):
            return getattr(await response.parse(), "usage", None)
        return body_usage(await response.http_response.aread() or b"null")


def _close(response: APIResponse[Any]) -> None:
    response.http_response.close()


async def _aclose(response: AsyncAPIResponse[Any]) -> None:
    await response.http_response.aclose()


def platform_of(client: Any) -> str:
    """The catalog platform an anthropic SDK client sends its requests to.

    `claude_api` for `Anthropic` (and `AnthropicGoogleCloud`, the Claude API run by Anthropic
    on Google Cloud), `claude_platform_aws` for `AnthropicAWS`, and `bedrock`, `vertex` or
    `foundry` for those clients."""
    import anthropic

    kinds = (("claude_platform_aws", ("AnthropicAWS", "AsyncAnthropicAWS")),
             ("bedrock", ("AnthropicBedrock", "AsyncAnthropicBedrock", "AnthropicBedrockMantle", "AsyncAnthropicBedrockMantle")),
             ("vertex", ("AnthropicVertex", "AsyncAnthropicVertex")),
             ("foundry", ("AnthropicFoundry", "AsyncAnthropicFoundry")))
    for platform, names in kinds:
        classes = tuple(c for c in (getattr(anthropic, n, None) for n in names) if isinstance(c, type))
        if classes and isinstance(client, classes):
            return platform
    return "claude_api"


def _refusal_fallback_next(request: APIRequest, call_next: Any) -> tuple[Any, Any] | None:
    """(the SDK's BetaRefusalFallbackMiddleware, the chain after it) when it is the next middleware, else None.

    Placed after this middleware, it would send its fallback hops straight to the API, unseen: no hop
    would be guarded and a refused hop's billed output never settled. The SDK builds its chain of
    closures over (`handler`, `call_next`); since 2.17 each middleware's `call_next` is a `forward`
    closure over (`req`, `call_next`) that hands the client's headers on before calling the next one.
    A chain of another shape is left as it is.
    """
    if (request.options.qualifiers or {}).get("beta") != "true":
        return None  # the SDK's fallback middleware handles beta requests only
    free = _free_variables(call_next)
    forwarded = free is not None and "handler" not in free and "req" in free
    if forwarded:
        free = _free_variables(free.get("call_next"))  # type: ignore[union-attr]
    if free is None:
        return None
    handler, rest = free.get("handler"), free.get("call_next")
    fallback = getattr(handler, "__self__", None)
    if rest is None or _RefusalFallback is None or not isinstance(fallback, _RefusalFallback):
        return None
    if forwarded:
        rest = _forwarding(rest, request)
    return fallback, rest


def _free_variables(function: Any) -> dict[str, Any] | None:
    code, cells = getattr(function, "__code__", None), getattr(function, "__closure__", None)
    if code is None or not cells:
        return None
    try:
        return dict(zip(code.co_freevars, (cell.cell_contents for cell in cells)))
    except ValueError:  # an empty cell
        return None


def _forwarding(rest: Any, request: APIRequest) -> Any:
    """`rest` behind the `forward` step the SDK puts before each middleware's next one (sync or async alike): a
    hop carries the client's headers on, so the SDK still tells them from the call's own."""
    def forward(hop: APIRequest) -> Any:
        hop._client_headers = request._client_headers
        return rest(hop)
    return forward


def _beta(headers: Mapping[str, Any]) -> tuple[str, str | None]:
    """The caller's `anthropic-beta` header: its key as spelt, and its value (if a string)."""
    for name, value in headers.items():
        if name.lower() == "anthropic-beta":
            return name, value if isinstance(value, str) else None
    return "anthropic-beta", None


def _derive(request: APIRequest, body: Any, headers: Mapping[str, Any]) -> APIRequest:
    """`request` with another body and headers, sharing everything else.

    `APIRequest.copy` deep-copies the body; the body here is already a new dict, and
    copying a long conversation on every request would cost more than deciding it.
    """
    if body is request.json and headers is request.headers:
        return request
    # `update` sets the two fields in the copy's __dict__, not through pydantic's __setattr__ twice.
    options = request.options.model_copy(update={"json_data": body, "headers": dict(headers)})
    return APIRequest(options=options, cast_to=request.cast_to, stream=request.stream, stream_cls=request.stream_cls,
                      retries_taken=request.retries_taken)


def _parses_to_model(request: APIRequest) -> bool:
    cast_to = request.cast_to
    return isinstance(cast_to, type) and issubclass(cast_to, SDKModel)


_Tracked = tracked_stream(httpx2)


def _rewrap(response: Any, stream: httpx2.SyncByteStream | httpx2.AsyncByteStream) -> Any:
    """The same SDK response, reading its body through `stream` (already decoded, so no encoding headers)."""
    raw = response.http_response
    wrapped = httpx2.Response(status_code=raw.status_code, headers=decoded_headers(raw.headers), stream=stream, request=raw.request,
                              extensions=raw.extensions)
    return type(response)(raw=wrapped, cast_to=response._cast_to, client=response._client, stream=True,
                          stream_cls=response._stream_cls, options=response._options, retries_taken=response.retries_taken)
