"""The decision API, for services that call Anthropic themselves: decide, then settle or release.

    POST /v1/decide   {"params": {...}, "context": {...}}  -> the decision, the params and headers to send
    POST /v1/settle   {"decision_id": "...", "usage": {...}} -> what was counted
    POST /v1/release  {"decision_id": "..."}               -> the reservation freed

A decision is kept in this process until it is settled or released, or for an hour past the
engine's `reservation_ttl_s` (its reservation expires in the ledger at the TTL; a later settlement
still counts), so settle on the replica that decided. `usage: null` settles at the worst case the decision reserved for (max_tokens
of output): for a response that was billed but whose usage the caller does not have.

A decision nobody settled or released, because it expired or the server shut down first, is
settled as an attempt cut short (`on_incomplete_stream`: at the worst case by default): it was
handed out to be sent, and silence is no proof that it was not billed.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import telemetry
from ..errors import CeilingExceeded, InvalidContext, InvalidRequest, StateUnavailable
from ..integrations._core import Flight, Runtime

__all__ = ["DecideRequest", "DecideResponse", "SettleRequest", "SettleResponse", "ReleaseRequest", "ReleaseResponse",
           "ApiError", "ErrorResponse", "DecisionStore", "DecisionApi", "ApiFailure"]


log = logging.getLogger("policy_engine.serve")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DecideRequest(_Model):
    params: dict[str, Any] = Field(description="The Messages API request parameters, as the service would send them.")
    context: dict[str, Any] | None = Field(None, description="The decision context (the keys of `policy_context`).")
    account: str | None = Field(None, description="Rate-limit account the request is sent with (default: `default`).")
    policy: str | None = Field(None, description="Policy to decide with (default: the first loaded).")
    platform: str | None = Field(None, description="Platform the request goes to (default: the server's).")


class DecideResponse(_Model):
    decision_id: str = Field(description="Settle or release the decision with this id.")
    speed: Literal["fast", "standard"]
    decision: dict[str, Any] = Field(description="The full decision (`Decision.to_dict()`): rule, reasons, estimates.")
    params: dict[str, Any] = Field(description="The parameters to send: `speed` set or removed as decided.")
    headers: dict[str, str] = Field(description="Headers to add to the request (`anthropic-beta` when fast needs it).")
    expires_in_s: float = Field(description="Seconds this decision stays settleable.")


class SettleRequest(_Model):
    decision_id: str
    usage: dict[str, Any] | None = Field(
        description="The response's `usage` object; null counts the worst case (max_tokens of output).")


class SettleResponse(_Model):
    decision_id: str
    speed: str
    cost_usd: float
    input_tokens: int
    output_tokens: int


class ReleaseRequest(_Model):
    decision_id: str


class ReleaseResponse(_Model):
    decision_id: str
    released: bool


class ApiError(_Model):
    code: str = Field(description="Stable machine-readable code, e.g. `ceiling_exceeded`, `unknown_decision`.")
    message: str


class ErrorResponse(_Model):
    error: ApiError


class ApiFailure(Exception):
    """A request the decision API answers with an error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=ApiError(code=self.code, message=self.message)).model_dump()


_LATE_SETTLE_S = 3600.0


class DecisionStore:
    """The decisions waiting for their settlement, by id.

    A decision stays settleable for an hour past its reservation's TTL: the ledger still counts a
    late settlement (a long response), and refusing it would leave billed spend uncounted."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.keep_s = ttl_s + _LATE_SETTLE_S
        self._clock = clock
        self._flights: dict[str, Flight] = {}
        self._lock = threading.Lock()
        self._next_sweep = 0.0

    def add(self, flight: Flight) -> str:
        decision_id = secrets.token_urlsafe(16)
        with self._lock:
            self._flights[decision_id] = flight
        return decision_id

    def expired(self) -> list[Flight]:
        """The decisions past their hour (looked for at most once a minute), taken out: for the caller to settle."""
        now = self._clock()
        with self._lock:
            if now < self._next_sweep:
                return []
            self._next_sweep = now + 60.0
            stale = [k for k, f in self._flights.items() if now - f.created > self.keep_s]
            return [self._flights.pop(k) for k in stale]

    def drain(self) -> list[Flight]:
        """Every decision still waiting, taken out (the server is shutting down)."""
        with self._lock:
            flights, self._flights = list(self._flights.values()), {}
        return flights

    def take(self, decision_id: str) -> Flight:
        with self._lock:
            flight = self._flights.pop(decision_id, None)
        if flight is None:
            raise ApiFailure(404, "unknown_decision", "no such decision: it was settled or released already, "
                                                      "expired (reservation_ttl_s + 1 h), or made by another replica")
        return flight

    def __len__(self) -> int:
        return len(self._flights)


Call = Callable[..., Awaitable[Any]]
"""`call(function, *args, undo=None, **kwargs)`: runs an engine call (in a worker thread when the ledger does I/O;
`undo` gets its result if the caller was cancelled meanwhile)."""


class DecisionApi:
    """The three verbs, on the same runtime (engine, ledger, rate limits) as the proxy."""

    def __init__(self, runtime: Callable[[], Runtime], call: Call, store: DecisionStore) -> None:
        self.runtime = runtime
        self.call = call
        self.store = store

    async def decide(self, data: Any) -> dict[str, Any]:
        request = _parsed(DecideRequest, data)
        runtime = self.runtime()
        try:
            decision = await self.call(runtime.engine.decide, request.params, request.context,
                                       account=request.account or "default", policy=request.policy,
                                       platform=request.platform or runtime.platform,
                                       undo=runtime.engine.release)  # (a client gone: nobody will settle it)
        except CeilingExceeded as exc:
            raise ApiFailure(403, "ceiling_exceeded", str(exc)) from None
        except InvalidContext as exc:
            raise ApiFailure(400, "invalid_context", str(exc)) from None
        except InvalidRequest as exc:
            raise ApiFailure(400, "invalid_request", str(exc)) from None
        except StateUnavailable as exc:
            raise ApiFailure(503, "state_unavailable", str(exc)) from None
        except KeyError as exc:
            raise ApiFailure(400, "unknown_policy", f"no policy named {exc.args[0]!r} is loaded") from None
        except ValueError as exc:
            raise ApiFailure(400, "invalid_request", str(exc)) from None
        flight = Flight(decision, decision.speed, None, time.monotonic())
        beta = runtime.wire_beta(flight, None)
        store = self.store
        stale = store.expired()
        if stale:
            await self.call(self.settle_unclaimed, runtime, stale, "expired")
        return DecideResponse(
            decision_id=store.add(flight), speed=decision.speed, decision=decision.to_dict(),  # type: ignore[arg-type]
            params=runtime.wire_body(flight, request.params), headers={"anthropic-beta": beta} if beta else {},
            expires_in_s=store.keep_s).model_dump()

    async def settle(self, data: Any) -> dict[str, Any]:
        request = _parsed(SettleRequest, data)
        runtime = self.runtime()
        flight = self.store.take(request.decision_id)
        settlement = await self.call(runtime.settle, flight, request.usage, timed=False)
        if settlement is None:  # settled by another call in the meantime
            raise ApiFailure(404, "unknown_decision", "the decision was settled or released already")
        return SettleResponse(decision_id=request.decision_id, speed=settlement.speed,
                              cost_usd=settlement.cost_micro / 1_000_000, input_tokens=settlement.input_tokens,
                              output_tokens=settlement.output_tokens).model_dump()

    @staticmethod
    def settle_unclaimed(runtime: Runtime, flights: list[Flight], why: str) -> None:
        """Settle decisions nobody settled nor released, as attempts cut short (by `on_incomplete_stream`)."""
        for flight in flights:
            decision = flight.decision
            log.warning("decision %s %s unsettled: settled by on_incomplete_stream", decision.reservation_id, why)
            telemetry.record_event("policy_engine.decision_unclaimed", {"policy_engine.policy.name": decision.policy_name,
                                                                        "policy_engine.reason": why})
            runtime.settle_incomplete(flight, None, 0)

    async def release(self, data: Any) -> dict[str, Any]:
        request = _parsed(ReleaseRequest, data)
        runtime = self.runtime()
        flight = self.store.take(request.decision_id)
        await self.call(runtime.release, flight)
        return ReleaseResponse(decision_id=request.decision_id, released=True).model_dump()


def _parsed(model: type[_Model], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiFailure(400, "invalid_body", f"{where}: {first['msg']}") from None


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 description of the decision API (and the probes), from the models above."""
    models: list[type[_Model]] = [DecideRequest, DecideResponse, SettleRequest, SettleResponse, ReleaseRequest,
                                  ReleaseResponse, ErrorResponse]
    components: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
    errors = {str(status): {"description": meaning, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        for status, meaning in _ERRORS.items()}

    def verb(summary: str, request: type[_Model], response: type[_Model]) -> dict[str, Any]:
        return {"post": {
            "summary": summary, "security": [{}, {"bearer": []}],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{request.__name__}"}}}},
            "responses": {"200": {"description": "OK", "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{response.__name__}"}}}}, **errors}}}

    probe = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}
    return {
        "openapi": "3.1.0",
        "info": {"title": "policy_engine decision API", "version": "1",
                 "description": "Served by `policy-engine serve` beside its Messages API proxy. Auth: "
                                "`Authorization: Bearer <token>` when the server runs with --auth-token-env."},
        "paths": {
            "/v1/decide": verb("Decide a request's speed and reserve its worst-case cost", DecideRequest, DecideResponse),
            "/v1/settle": verb("Settle a decision with the response's usage", SettleRequest, SettleResponse),
            "/v1/release": verb("Release a decision whose request was never billed", ReleaseRequest, ReleaseResponse),
            "/healthz": {"get": {"summary": "The process is up", "responses": {"200": {
                "description": "OK", "content": {"application/json": {"schema": probe}}}}}},
            "/readyz": {"get": {"summary": "Policies loaded and shared state reachable (or not needed)", "responses": {
                "200": {"description": "ready", "content": {"application/json": {"schema": probe}}},
                "503": {"description": "not ready", "content": {"application/json": {"schema": probe}}}}}},
        },
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


_ERRORS: dict[int, str] = {
    400: "invalid_json, invalid_body, invalid_request, invalid_context or unknown_policy",
    401: "unauthorized: the bearer token is missing or wrong",
    403: "ceiling_exceeded: the policy rejects the request (a ceiling or budget)",
    404: "unknown_decision: settled or released already, expired, or decided by another replica",
    413: "request_too_large",
    503: "state_unavailable: the shared budget state did not answer and the policy says reject",
}
