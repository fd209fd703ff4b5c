"""policy_engine: decide, per Messages API request, whether to run it in fast mode.

    import policy_engine
    engine = policy_engine.load("policies/default.yaml")
    decision = engine.decide(params, context={"interactive": True, "latency_slo_ms": 20_000})
    response = client.beta.messages.create(**decision.apply(params))
    engine.settle(decision, response.usage)

Everything not named here is private to its module.
"""

from __future__ import annotations

from . import _mypyc

if _mypyc.PURE_PYTHON:
    _mypyc.prefer_sources()  # before any compiled module is imported

from .catalog import Catalog, load_catalog
from .decide import FAST_BETA, Decision, Engine, Settlement, StepCost, load
from .decisionlog import DecisionLog
from .errors import (
    CeilingExceeded,
    Diagnostic,
    InvalidContext,
    InvalidRequest,
    PolicyEngineError,
    PolicyError,
    PricingError,
    StateUnavailable,
)
from .load import load_policy
from .policy import Policy
from .reload import ReloadingEngine

__version__ = "0.1.0"

__all__ = [
    "FAST_BETA",
    "Catalog",
    "CeilingExceeded",
    "Decision",
    "DecisionLog",
    "Diagnostic",
    "Engine",
    "InvalidContext",
    "InvalidRequest",
    "Policy",
    "PolicyEngineError",
    "PolicyError",
    "PricingError",
    "ReloadingEngine",
    "Settlement",
    "StepCost",
    "StateUnavailable",
    "__version__",
    "load",
    "load_catalog",
    "load_policy",
]
