"""Run an expression through celpy's interpreter and convert values both ways."""

import math

import celpy

from policy_engine.cel.celpy_values import from_celpy as _from_celpy
from policy_engine.cel.celpy_values import to_celpy

_ENV = celpy.Environment(runner_class=celpy.InterpretedRunner)


def from_celpy(v):
    """celpy's result, or ERROR for the errors it returns as values."""
    if isinstance(v, Exception):
        return ERROR
    return _from_celpy(v)


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
