"""Run an expression through celpy's interpreter and convert values both ways."""

import math

import celpy
from celpy import celtypes

from policy_engine.cel import CelUint

_ENV = celpy.Environment(runner_class=celpy.InterpretedRunner)


def to_celpy(v):
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
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return celtypes.ListType([to_celpy(x) for x in v])
    if isinstance(v, dict):
        return celtypes.MapType({to_celpy(k): to_celpy(x) for k, x in v.items()})
    raise TypeError(type(v))


def from_celpy(v):
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
    if v is None:
        return None
    if isinstance(v, (celtypes.ListType, list)):
        return [from_celpy(x) for x in v]
    if isinstance(v, (celtypes.MapType, dict)):
        return {from_celpy(k): from_celpy(x) for k, x in v.items()}
    if isinstance(v, Exception):
        return ERROR
    # celpy sometimes returns plain Python values (e.g. str concatenation)
    if type(v) in (bool, str, bytes, float):
        return v
    if type(v) is int:
        return v
    raise TypeError(type(v))


class _Error:
    def __repr__(self):
        return "<error>"


ERROR = _Error()


def celpy_eval(src, act):
    try:
        prog = _ENV.program(_ENV.compile(src))
        result = prog.evaluate({k: to_celpy(v) for k, v in act.items()})
    except Exception:  # celpy raises CELEvalError (and sometimes plain Python errors)
        return ERROR
    try:
        return from_celpy(result)
    except TypeError:
        return ERROR


def same(a, b):
    """Type-strict equality (bool is not int, CelUint is not int, NaN == NaN)."""
    if a is ERROR or b is ERROR:
        return a is b
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    return a == b
