import datetime as dt

import pytest

from policy_engine.cel import (
    BOOL, DOUBLE, INT, STRING, TIMESTAMP, Field, ListType, MapType, Nullable, ObjectType,
)

REQUEST = ObjectType("Request", {
    "model": STRING,
    "max_tokens": INT,
    "input_tokens": INT,
    "stream": BOOL,
    "has_tools": BOOL,
    "betas": ListType(STRING, max_size=16),
    "temperature": Field(DOUBLE, optional=True),
    "service_tier": Field(Nullable(STRING)),
})
CONTEXT = ObjectType("Context", {
    "tenant": STRING,
    "interactive": BOOL,
    "latency_slo_ms": INT,
    "labels": MapType(STRING, STRING, max_size=32),
})
DECLS = {"request": REQUEST, "context": CONTEXT, "now": TIMESTAMP}


@pytest.fixture
def decls():
    return dict(DECLS)


@pytest.fixture
def act():
    return {
        "request": {
            "model": "claude-opus-4",
            "max_tokens": 1024,
            "input_tokens": 5000,
            "stream": True,
            "has_tools": False,
            "betas": ["fast-mode", "x"],
            "service_tier": None,
        },
        "context": {"tenant": "acme", "interactive": True, "latency_slo_ms": 800, "labels": {"tier": "vip"}},
        "now": dt.datetime(2024, 3, 15, 14, 30, 5, 250000, tzinfo=dt.timezone.utc),
    }
