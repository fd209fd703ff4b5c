"""Values between this package's Python mapping and cel-python's `celtypes`.

The differential tests and the benchmarks run the same expressions through celpy's
interpreter; this is the one converter they share. Not used on any decision path.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from celpy import celtypes

from .runtime import CelUint

__all__ = ["to_celpy", "from_celpy"]


def to_celpy(v: Any) -> Any:
    """A Python value (as `Program.evaluate` takes it) -> the celpy value of the same CEL value."""
    if isinstance(v, bool):
        return celtypes.BoolType(v)
    if isinstance(v, CelUint):
        return celtypes.UintType(int(v))
    if isinstance(v, int):
        return celtypes.IntType(v)
    if isinstance(v, float):
        return celtypes.DoubleType(v)
    if isinstance(v, str):
        return celtypes.StringType(v)
    if isinstance(v, bytes):
        return celtypes.BytesType(v)
    if isinstance(v, dt.datetime):
        return celtypes.TimestampType(v)
    if isinstance(v, dt.timedelta):
        return celtypes.DurationType(v)
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return celtypes.ListType([to_celpy(x) for x in v])
    if isinstance(v, dict):
        return celtypes.MapType({to_celpy(k): to_celpy(x) for k, x in v.items()})
    raise TypeError(f"no CEL value for {type(v).__name__}")


def from_celpy(v: Any) -> Any:
    """A celpy result -> this package's Python mapping. celpy sometimes returns plain Python values; they pass."""
    if isinstance(v, celtypes.BoolType):
        return bool(v)
    if isinstance(v, celtypes.UintType):
        return CelUint(int(v))
    if isinstance(v, celtypes.IntType):
        return int(v)
    if isinstance(v, celtypes.DoubleType):
        return float(v)
    if isinstance(v, celtypes.StringType):
        return str(v)
    if isinstance(v, celtypes.BytesType):
        return bytes(v)
    if isinstance(v, (celtypes.ListType, list)):
        return [from_celpy(x) for x in v]
    if isinstance(v, (celtypes.MapType, dict)):
        return {from_celpy(k): from_celpy(x) for k, x in v.items()}
    if v is None or type(v) in (bool, int, float, str, bytes):
        return v
    raise TypeError(f"unexpected celpy value {type(v).__name__}")
