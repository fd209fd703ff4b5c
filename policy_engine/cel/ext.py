"""CEL extension libraries, as cel-go (ext.Strings, ext.Math, ext.Lists, ext.Sets, ext.Encoders,
cel.OptionalTypes) and Kubernetes define them.

Each function is one :class:`Function`: its overloads (what the checker accepts and what it
returns), its run-time implementation (which checks its arguments' run-time types itself, so
it serves dynamic mode and ``dyn`` arguments too) and its cost class for the estimator.
The macros of these libraries (``cel.bind``, ``optMap``, ``optFlatMap``, ``sortBy``, the
two-variable comprehensions) are AST nodes; their run-time helpers live here too.
"""

from __future__ import annotations

import base64 as _b64
import binascii
import datetime as _dt
import ipaddress
import math
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from . import runtime as rt
from .errors import CelEvaluationError
from .runtime import OPTIONAL_NONE, CelCIDR, CelIP, CelOptional, CelUint, kind, no_overload, opt_of
from .types import (
    BOOL, BYTES, DOUBLE, DYN, INT, STRING, UINT, CelType, ListType, MapType, ObjectType, OptionalType, unify,
)

Typer = Callable[[Sequence[CelType]], CelType]


@dataclass(frozen=True)
class Overload:
    receiver: bool  # written as a method, x.f(...)
    params: tuple[str, ...]  # see _accepts; "*num" = one or more numbers
    result: CelType | Typer


@dataclass(frozen=True)
class Function:
    impl: Callable[..., Any]
    overloads: tuple[Overload, ...]
    cost: str = "const"  # const | string (0.1 per character) | list (1 per element) | sort (n log n)
    can_error: bool = True


FUNCTIONS: dict[str, Function] = {}


def _fn(name: str, impl: Callable[..., Any], *overloads: Overload, cost: str = "const", can_error: bool = True) -> None:
    FUNCTIONS[name] = Function(impl, overloads, cost, can_error)


def M(*params: str, result: CelType | Typer) -> Overload:  # noqa: N802 - a method overload
    return Overload(True, params, result)


def G(*params: str, result: CelType | Typer) -> Overload:  # noqa: N802 - a global overload
    return Overload(False, params, result)


_KIND = {"timestamp": "google.protobuf.Timestamp", "duration": "google.protobuf.Duration", "optional": "optional_type"}


def _accepts(param: str, t: CelType) -> bool:
    if t.kind == "dyn" or param == "dyn":
        return True
    if param == "num":
        return t.kind in ("int", "uint", "double")
    if param.startswith("list(") and t.kind == "list":
        inner = param[5:-1]
        return _accepts(inner, t.elem)  # type: ignore[attr-defined]
    return t.kind == _KIND.get(param, param)


def check_call(fn: Function, receiver: bool, types: Sequence[CelType]) -> CelType | None:
    """The result type of the first overload the argument types match, or None."""
    for o in fn.overloads:
        if o.receiver != receiver:
            continue
        if o.params and o.params[0] == "*num":
            ok = (len(types) >= 1 and all(_accepts("num", t) for t in types)) or \
                 (len(types) == 1 and _accepts("list(num)", types[0]))
        else:
            ok = len(o.params) == len(types) and all(_accepts(p, t) for p, t in zip(o.params, types))
        if ok:
            return o.result(types) if callable(o.result) else o.result
    return None


def _elem(t: CelType) -> CelType:
    return getattr(t, "elem", DYN)


def _same(ts: Sequence[CelType]) -> CelType:
    return ts[0] if ts[0].kind != "dyn" else DYN


# ------------------------------------------------------------------ argument checks
def _want(fn: str, args: tuple[Any, ...], *kinds: str) -> None:
    if len(args) != len(kinds) or any(k != "dyn" and kind(a) != k for a, k in zip(args, kinds)):
        raise no_overload(fn, *args)


def _arity(fn: str, args: tuple[Any, ...], *shapes: tuple[str, ...]) -> int:
    """Which of the argument `shapes` the run-time arguments have (index), else no overload."""
    for i, shape in enumerate(shapes):
        if len(args) == len(shape) and all(k == "dyn" or kind(a) == k for a, k in zip(args, shape)):
            return i
    raise no_overload(fn, *args)


def _range(i: int, lo: int, hi: int) -> int:
    if not lo <= i <= hi:
        raise CelEvaluationError(f"index out of range: {i}")
    return i


# ------------------------------------------------------------------ strings
def char_at(*a: Any) -> str:
    _want("charAt", a, "string", "int")
    s, i = a
    _range(i, 0, len(s))
    return s[i : i + 1]


def index_of(*a: Any) -> int:
    if len(a) == 2 and kind(a[0]) == "list":  # Kubernetes' list.indexOf(x)
        return next((i for i, x in enumerate(a[0]) if rt.eq(x, a[1])), -1)
    if _arity("indexOf", a, ("string", "string"), ("string", "string", "int")) == 0:
        return a[0].find(a[1])  # type: ignore[no-any-return]
    s, sub, start = a
    _range(start, 0, len(s))
    return s.find(sub, start)  # type: ignore[no-any-return]


def last_index_of(*a: Any) -> int:
    if len(a) == 2 and kind(a[0]) == "list":  # Kubernetes' list.lastIndexOf(x)
        return next((i for i in range(len(a[0]) - 1, -1, -1) if rt.eq(a[0][i], a[1])), -1)
    if _arity("lastIndexOf", a, ("string", "string"), ("string", "string", "int")) == 0:
        return a[0].rfind(a[1])  # type: ignore[no-any-return]
    s, sub, end = a
    _range(end, 0, len(s))
    return s.rfind(sub, 0, end + len(sub))  # type: ignore[no-any-return]


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def lower_ascii(*a: Any) -> str:
    _want("lowerAscii", a, "string")
    return a[0].translate(_ASCII_LOWER)  # type: ignore[no-any-return]


def upper_ascii(*a: Any) -> str:
    _want("upperAscii", a, "string")
    return a[0].translate(_ASCII_UPPER)  # type: ignore[no-any-return]


def replace(*a: Any) -> str:
    if _arity("replace", a, ("string", "string", "string"), ("string", "string", "string", "int")) == 0:
        return a[0].replace(a[1], a[2])  # type: ignore[no-any-return]
    s, old, new, n = a
    return s.replace(old, new, n if n >= 0 else -1)  # type: ignore[no-any-return]


def split(*a: Any) -> list[str]:
    if _arity("split", a, ("string", "string"), ("string", "string", "int")) == 0:
        s, sep, n = a[0], a[1], -1
    else:
        s, sep, n = a
    if n == 0:
        return []
    if sep == "":  # Go's strings.SplitN with an empty separator: one code point per part
        chars = list(s)
        if 0 < n < len(chars):
            return chars[: n - 1] + ["".join(chars[n - 1 :])]
        return chars
    return s.split(sep, n - 1 if n > 0 else -1)  # type: ignore[no-any-return]


def substring(*a: Any) -> str:
    if _arity("substring", a, ("string", "int"), ("string", "int", "int")) == 0:
        s, start = a
        return s[_range(start, 0, len(s)):]  # type: ignore[no-any-return]
    s, start, end = a
    _range(start, 0, len(s))
    _range(end, 0, len(s))
    if start > end:
        raise CelEvaluationError(f"invalid substring range. start: {start}, end: {end}")
    return s[start:end]  # type: ignore[no-any-return]


def _is_space(c: str) -> bool:  # Go's unicode.IsSpace (what cel-go's trim uses)
    return c in "\t\n\v\f\r \x85\xa0" or unicodedata.category(c) in ("Zs", "Zl", "Zp")


def trim(*a: Any) -> str:
    _want("trim", a, "string")
    s = a[0]
    i, j = 0, len(s)
    while i < j and _is_space(s[i]):
        i += 1
    while j > i and _is_space(s[j - 1]):
        j -= 1
    return s[i:j]  # type: ignore[no-any-return]


def join(*a: Any) -> str:
    if _arity("join", a, ("list",), ("list", "string")) == 0:
        items, sep = a[0], ""
    else:
        items, sep = a
    if any(type(x) is not str for x in items):
        raise CelEvaluationError("join: the list must hold strings")
    return sep.join(items)  # type: ignore[no-any-return]


def reverse(*a: Any) -> Any:
    k = _arity("reverse", a, ("string",), ("list",))
    return a[0][::-1] if k == 0 else list(a[0])[::-1]


_QUOTE_ESC = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v",
              "\\": "\\\\", '"': '\\"'}


def quote(*a: Any) -> str:
    _want("strings.quote", a, "string")
    return '"' + "".join(_QUOTE_ESC.get(c, c) for c in a[0]) + '"'


def format_(*a: Any) -> str:
    _want("format", a, "string", "list")
    fmt, args = a
    out: list[str] = []
    i, n, argi = 0, len(fmt), 0
    while i < n:
        c = fmt[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        i += 1
        if i < n and fmt[i] == "%":
            out.append("%")
            i += 1
            continue
        precision: int | None = None
        if i < n and fmt[i] == ".":
            j = i + 1
            while j < n and fmt[j].isdigit():
                j += 1
            if j == i + 1:
                raise CelEvaluationError("could not parse formatting clause: missing precision")
            precision = int(fmt[i + 1 : j])
            i = j
        if i >= n:
            raise CelEvaluationError("could not parse formatting clause: unterminated clause")
        verb = fmt[i]
        i += 1
        if verb not in "sdfeboxX":
            raise CelEvaluationError(f'could not parse formatting clause: unrecognized formatting clause "{verb}"')
        if argi >= len(args):
            raise CelEvaluationError(f"index {argi} out of range")
        out.append(_format_one(verb, precision, args[argi]))
        argi += 1
    return "".join(out)


def _nonfinite(v: float) -> str | None:
    if v != v:
        return "NaN"
    if v in (math.inf, -math.inf):
        return "Infinity" if v > 0 else "-Infinity"
    return None


def _format_one(verb: str, precision: int | None, v: Any) -> str:
    k = kind(v)
    if verb == "s":
        return _as_string(v)
    if verb == "d":
        if k in ("int", "uint"):
            return str(int(v))
        if k == "double" and _nonfinite(v):
            return _nonfinite(v)  # type: ignore[return-value]
        raise CelEvaluationError(f"error during formatting: decimal clause can only be used on integers, was given {rt._short(k)}")
    if verb in "fe":
        if k in ("int", "uint"):
            v = float(v)
        elif k != "double":
            what = "fixed-point" if verb == "f" else "scientific"
            raise CelEvaluationError(f"error during formatting: {what} clause can only be used on doubles, was given {rt._short(k)}")
        bad = _nonfinite(v)
        if bad:
            return bad
        return f"{v:.{6 if precision is None else precision}{verb}}"
    if verb == "b":
        if k in ("int", "uint", "bool"):
            return format(int(v), "b")
        raise CelEvaluationError(f"error during formatting: only integers and bools can be formatted as binary, was given {rt._short(k)}")
    if verb == "o":
        if k in ("int", "uint"):
            return format(int(v), "o")
        raise CelEvaluationError(f"error during formatting: octal clause can only be used on integers, was given {rt._short(k)}")
    # x / X
    if k in ("int", "uint"):
        s = format(int(v), "x")
    elif k == "string":
        s = v.encode("utf-8").hex()
    elif k == "bytes":
        s = v.hex()
    else:
        raise CelEvaluationError(f"error during formatting: only integers, byte buffers, and strings can be formatted as hex, was given {rt._short(k)}")
    return s.upper() if verb == "X" else s


def _as_string(v: Any) -> str:
    """`%s` of a value (cel-go's string formatting: lists and maps too, map keys sorted)."""
    k = kind(v)
    if k == "null_type":
        return "null"
    if k == "double":
        return _nonfinite(v) or rt.format_double(v)
    if k == "list":
        return "[" + ", ".join(_as_string(x) for x in v) + "]"
    if k == "map":
        return "{" + ", ".join(sorted(f"{_as_string(x)}: {_as_string(y)}" for x, y in v.items())) + "}"
    if k == "type":
        return v.name  # type: ignore[no-any-return]
    return rt.to_string(v)


# ------------------------------------------------------------------ math
_NUMK = ("int", "uint", "double")


def _numbers(fn: str, a: tuple[Any, ...]) -> Sequence[Any]:
    vals = a[0] if len(a) == 1 and kind(a[0]) == "list" else a
    if not vals:
        raise CelEvaluationError(f"{fn}(): no arguments")
    for v in vals:
        if kind(v) not in _NUMK:
            raise no_overload(fn, v)
    return vals  # type: ignore[no-any-return]


def _best(vals: Sequence[Any], better: Callable[[Any, Any], bool]) -> Any:
    """The first value no later one is `better` than (the greatest or least, by CEL ordering)."""
    best = vals[0]
    for v in vals[1:]:
        if better(v, best):
            best = v
    return best


def greatest(*a: Any) -> Any:
    return _best(_numbers("math.greatest", a), rt.gt)


def least(*a: Any) -> Any:
    return _best(_numbers("math.least", a), rt.lt)


def _double(fn: str, a: tuple[Any, ...]) -> float:
    _want(fn, a, "double")
    return a[0]  # type: ignore[no-any-return]


def ceil(*a: Any) -> float:
    v = _double("math.ceil", a)
    return float(math.ceil(v)) if math.isfinite(v) else v


def floor(*a: Any) -> float:
    v = _double("math.floor", a)
    return float(math.floor(v)) if math.isfinite(v) else v


def round_(*a: Any) -> float:
    v = _double("math.round", a)  # half away from zero, as Go's math.Round
    if not math.isfinite(v):
        return v
    r = math.floor(abs(v) + 0.5)
    return math.copysign(float(r), v)


def trunc(*a: Any) -> float:
    v = _double("math.trunc", a)
    return float(math.trunc(v)) if math.isfinite(v) else v


def sqrt(*a: Any) -> float:
    if len(a) != 1 or kind(a[0]) not in _NUMK:
        raise no_overload("math.sqrt", *a)
    v = float(a[0])
    return math.sqrt(v) if v >= 0 else math.nan


def abs_(*a: Any) -> Any:
    if len(a) != 1 or kind(a[0]) not in _NUMK:
        raise no_overload("math.abs", *a)
    v = a[0]
    if kind(v) == "int":
        return rt.ck(abs(v))
    if kind(v) == "uint":
        return v
    return abs(v)


def sign(*a: Any) -> Any:
    if len(a) != 1 or kind(a[0]) not in _NUMK:
        raise no_overload("math.sign", *a)
    v = a[0]
    k = kind(v)
    if k == "double":
        if v != v:
            return v
        return 1.0 if v > 0 else -1.0 if v < 0 else 0.0
    s = 1 if v > 0 else -1 if v < 0 else 0
    return CelUint(s) if k == "uint" else s


def is_nan(*a: Any) -> bool:
    v = _double("math.isNaN", a)
    return v != v


def is_inf(*a: Any) -> bool:
    return math.isinf(_double("math.isInf", a))


def is_finite(*a: Any) -> bool:
    return math.isfinite(_double("math.isFinite", a))


def _wrap_int(v: int) -> int:
    v &= 0xFFFF_FFFF_FFFF_FFFF
    return v - (1 << 64) if v >= 1 << 63 else v


def _bits(fn: str, a: tuple[Any, ...], op: Callable[[int, int], int]) -> Any:
    if len(a) != 2 or kind(a[0]) != kind(a[1]) or kind(a[0]) not in ("int", "uint"):
        raise no_overload(fn, *a)
    r = op(int(a[0]), int(a[1]))
    return CelUint(r & 0xFFFF_FFFF_FFFF_FFFF) if kind(a[0]) == "uint" else _wrap_int(r)


def bit_and(*a: Any) -> Any:
    return _bits("math.bitAnd", a, lambda x, y: x & y)


def bit_or(*a: Any) -> Any:
    return _bits("math.bitOr", a, lambda x, y: x | y)


def bit_xor(*a: Any) -> Any:
    return _bits("math.bitXor", a, lambda x, y: x ^ y)


def bit_not(*a: Any) -> Any:
    if len(a) != 1 or kind(a[0]) not in ("int", "uint"):
        raise no_overload("math.bitNot", *a)
    if kind(a[0]) == "uint":
        return CelUint(~int(a[0]) & 0xFFFF_FFFF_FFFF_FFFF)
    return ~a[0]


def _shift(fn: str, a: tuple[Any, ...]) -> tuple[int, int, bool]:
    if len(a) != 2 or kind(a[0]) not in ("int", "uint") or kind(a[1]) != "int":
        raise no_overload(fn, *a)
    if a[1] < 0:
        raise CelEvaluationError(f"{fn}() negative offset: {a[1]}")
    return int(a[0]), a[1], kind(a[0]) == "uint"


def bit_shift_left(*a: Any) -> Any:
    v, n, unsigned = _shift("math.bitShiftLeft", a)
    r = (v << n) & 0xFFFF_FFFF_FFFF_FFFF if n < 64 else 0
    return CelUint(r) if unsigned else _wrap_int(r)


def bit_shift_right(*a: Any) -> Any:
    v, n, unsigned = _shift("math.bitShiftRight", a)  # logical shift, for ints too (as cel-go)
    r = ((v & 0xFFFF_FFFF_FFFF_FFFF) >> n) if n < 64 else 0
    return CelUint(r) if unsigned else _wrap_int(r)


# ------------------------------------------------------------------ lists
def slice_(*a: Any) -> list[Any]:
    _want("slice", a, "list", "int", "int")
    xs, start, end = a
    if start < 0 or end < 0:
        raise CelEvaluationError(f"cannot slice({start}, {end}), negative indexes not supported")
    if start > end:
        raise CelEvaluationError(f"cannot slice({start}, {end}), start index must be less than or equal to end index")
    if end > len(xs):
        raise CelEvaluationError(f"cannot slice({start}, {end}), list is length {len(xs)}")
    return list(xs[start:end])


def flatten(*a: Any) -> list[Any]:
    if _arity("flatten", a, ("list",), ("list", "int")) == 0:
        depth = 1
    else:
        depth = a[1]
        if depth < 0:
            raise CelEvaluationError("flatten(): level must be non-negative")
    return _flatten(a[0], depth)


def _flatten(xs: Iterable[Any], depth: int) -> list[Any]:
    out: list[Any] = []
    for x in xs:
        if depth > 0 and kind(x) == "list":
            out.extend(_flatten(x, depth - 1))
        else:
            out.append(x)
    return out


def _sortable(fn: str, keys: Sequence[Any]) -> None:
    kinds = {kind(k) for k in keys}
    if not kinds:
        return
    if len(kinds) > 1 and not kinds <= set(_NUMK):
        raise CelEvaluationError(f"{fn}(): list elements must have the same type")
    if not kinds <= rt._ORDERED:
        raise CelEvaluationError(f"{fn}(): list elements must be comparable, got {rt._short(kinds.pop())}")


def sort(*a: Any) -> list[Any]:
    _want("sort", a, "list")
    xs = a[0]
    _sortable("sort", xs)
    return sorted(xs, key=_sort_key)


def _sort_key(v: Any) -> Any:
    return float(v) if kind(v) == "double" else v


def sort_by(xs: Any, key: Callable[[Any], Any]) -> list[Any]:
    _want("sortBy", (xs,), "list")
    keys = [key(x) for x in xs]
    _sortable("sortBy", keys)
    order = sorted(range(len(xs)), key=lambda i: _sort_key(keys[i]))
    return [xs[i] for i in order]


def distinct(*a: Any) -> list[Any]:
    _want("distinct", a, "list")
    out: list[Any] = []
    for x in a[0]:
        if not rt.in_list(x, out):
            out.append(x)
    return out


def is_sorted(*a: Any) -> bool:
    _want("isSorted", a, "list")
    xs = a[0]
    _sortable("isSorted", xs)
    return all(rt.le(xs[i], xs[i + 1]) for i in range(len(xs) - 1))


def sum_(*a: Any) -> Any:
    """Kubernetes' list.sum(): 0 for an empty list; int and uint sums are overflow-checked."""
    _want("sum", a, "list")
    xs = a[0]
    if not xs:
        return 0
    total = xs[0]
    if kind(total) not in ("int", "uint", "double", "google.protobuf.Duration"):
        raise no_overload("sum", total)
    for x in xs[1:]:
        total = rt.add(total, x)
    return total


def _extreme(fn: str, a: tuple[Any, ...], better: Callable[[Any, Any], bool]) -> Any:
    _want(fn, a, "list")
    xs = a[0]
    if not xs:
        raise CelEvaluationError(f"{fn}(): the list is empty")
    _sortable(fn, xs)
    return _best(xs, better)


def list_min(*a: Any) -> Any:
    return _extreme("min", a, rt.lt)


def list_max(*a: Any) -> Any:
    return _extreme("max", a, rt.gt)


def lists_range(*a: Any) -> list[int]:
    _want("lists.range", a, "int")
    return list(range(a[0]))


def first(*a: Any) -> CelOptional:
    _want("first", a, "list")
    return opt_of(a[0][0]) if a[0] else OPTIONAL_NONE


def last(*a: Any) -> CelOptional:
    _want("last", a, "list")
    return opt_of(a[0][-1]) if a[0] else OPTIONAL_NONE


# ------------------------------------------------------------------ sets
def sets_contains(*a: Any) -> bool:
    _want("sets.contains", a, "list", "list")
    return all(rt.in_list(y, a[0]) for y in a[1])


def sets_equivalent(*a: Any) -> bool:
    _want("sets.equivalent", a, "list", "list")
    return all(rt.in_list(y, a[0]) for y in a[1]) and all(rt.in_list(x, a[1]) for x in a[0])


def sets_intersects(*a: Any) -> bool:
    _want("sets.intersects", a, "list", "list")
    return any(rt.in_list(y, a[0]) for y in a[1])


# ------------------------------------------------------------------ encoders
def b64_encode(*a: Any) -> str:
    _want("base64.encode", a, "bytes")
    return _b64.b64encode(a[0]).decode("ascii")


def b64_decode(*a: Any) -> bytes:
    _want("base64.decode", a, "string")
    s = a[0]
    try:
        return _b64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise CelEvaluationError(f"base64.decode: invalid base64 {s!r}") from None


# ------------------------------------------------------------------ optionals
def optional_of(*a: Any) -> CelOptional:
    if len(a) != 1:
        raise no_overload("optional.of", *a)
    return opt_of(a[0])


def optional_none(*a: Any) -> CelOptional:
    if a:
        raise no_overload("optional.none", *a)
    return OPTIONAL_NONE


def _is_zero(v: Any) -> bool:
    k = kind(v)
    if k in ("int", "uint", "double", "bool", "string", "bytes", "list", "map"):
        return not v
    if k == "null_type":
        return True
    if k == "google.protobuf.Duration":
        return v == _dt.timedelta(0)
    if k == "google.protobuf.Timestamp":
        return v == rt._EPOCH
    return False


def optional_of_non_zero(*a: Any) -> CelOptional:
    if len(a) != 1:
        raise no_overload("optional.ofNonZeroValue", *a)
    return OPTIONAL_NONE if _is_zero(a[0]) else opt_of(a[0])


def _opt(fn: str, v: Any) -> CelOptional:
    if type(v) is not CelOptional:
        raise no_overload(fn, v)
    return v


def has_value(*a: Any) -> bool:
    _want("hasValue", a, "optional_type")
    return a[0].has  # type: ignore[no-any-return]


def value(*a: Any) -> Any:
    _want("value", a, "optional_type")
    if not a[0].has:
        raise CelEvaluationError("optional.none() dereference")
    return a[0].value


def or_value(*a: Any) -> Any:
    _want("orValue", a, "optional_type", "dyn")
    return a[0].value if a[0].has else a[1]


def or_(*a: Any) -> CelOptional:
    _want("or", a, "optional_type", "optional_type")
    return a[0] if a[0].has else a[1]  # type: ignore[no-any-return]


def opt_map(o: Any, fn: Callable[[Any], Any]) -> CelOptional:
    o = _opt("optMap", o)
    return opt_of(fn(o.value)) if o.has else OPTIONAL_NONE


def opt_flat_map(o: Any, fn: Callable[[Any], Any]) -> CelOptional:
    o = _opt("optFlatMap", o)
    if not o.has:
        return OPTIONAL_NONE
    return _opt("optFlatMap", fn(o.value))


def opt_items(v: Any) -> tuple[Any, ...]:
    """`[?x]`: the list items an optional element contributes."""
    o = _opt("[?_]", v)
    return (o.value,) if o.has else ()


def make_map_opt(entries: Iterable[tuple[Any, Any, bool]]) -> dict[Any, Any]:
    """A map literal with `?key: value` entries (included only when the optional has a value)."""
    kept: list[tuple[Any, Any]] = []
    for k, v, optional in entries:
        if optional:
            o = _opt("{?_:_}", v)
            if not o.has:
                continue
            v = o.value
        kept.append((k, v))
    return rt.make_map(kept)


def merge_entries(maps: Iterable[Any]) -> dict[Any, Any]:
    """transformMapEntry: the union of one-entry maps, a duplicate key is an error."""
    out: list[tuple[Any, Any]] = []
    for m in maps:
        if kind(m) != "map":
            raise CelEvaluationError(f"transformMapEntry: the expression must give a map, got {rt._short(kind(m))}")
        out.extend(m.items())
    return rt.make_map(out)


def pairs(counter: list[int], limit: int, r: Any) -> list[tuple[Any, Any]]:
    """The (index, value) or (key, value) pairs a two-variable comprehension iterates."""
    r = rt.iter_range(counter, limit, r)
    return list(enumerate(r)) if kind(r) == "list" else list(r.items())


def bind(value_: Any, body: Callable[[Any], Any]) -> Any:
    return body(value_)


# ------------------------------------------------------------------ network (Kubernetes' ip/cidr library)
IP_T = CelType("net.IP")
CIDR_T = CelType("net.CIDR")


def _parse_addr(s: str, what: str = "IP Address") -> Any:
    if "%" in s:
        raise CelEvaluationError(f"{what} with zone value is not allowed")
    try:
        addr = ipaddress.ip_address(s)
    except ValueError:
        raise CelEvaluationError(f"{what} {s!r} parse error during conversion from string") from None
    if getattr(addr, "ipv4_mapped", None) is not None and "." in s:
        raise CelEvaluationError("IPv4-mapped IPv6 address is not allowed")
    return addr


def ip(*a: Any) -> CelIP:
    if len(a) == 1 and kind(a[0]) == "net.CIDR":  # cidr.ip(): the address part
        return CelIP(a[0].addr)
    _want("ip", a, "string")
    return CelIP(_parse_addr(a[0]))


def cidr(*a: Any) -> CelCIDR:
    _want("cidr", a, "string")
    s = a[0]
    addr_s, slash, plen = s.partition("/")
    if "%" in addr_s:
        raise CelEvaluationError("CIDR with zone value is not allowed")
    if not slash or not plen.isdigit():
        raise CelEvaluationError(f"network address parse error during conversion from string: {s!r}")
    addr = _parse_addr(addr_s, "CIDR")
    prefix = int(plen)
    if prefix > addr.max_prefixlen:
        raise CelEvaluationError(f"network address parse error during conversion from string: {s!r}")
    return CelCIDR(addr, prefix)


def _parses(fn: str, parse: Callable[[str], Any], a: tuple[Any, ...]) -> bool:
    _want(fn, a, "string")
    try:
        parse(a[0])
    except CelEvaluationError:
        return False
    return True


def is_ip(*a: Any) -> bool:
    return _parses("isIP", _parse_addr, a)


def is_cidr(*a: Any) -> bool:
    return _parses("isCIDR", cidr, a)


def ip_is_canonical(*a: Any) -> bool:
    _want("ip.isCanonical", a, "string")
    return str(_parse_addr(a[0])) == a[0]


def _addr(fn: str, a: tuple[Any, ...]) -> Any:
    _want(fn, a, "net.IP")
    return a[0].addr


def family(*a: Any) -> int:
    return _addr("family", a).version  # type: ignore[no-any-return]


def is_unspecified(*a: Any) -> bool:
    return _addr("isUnspecified", a).is_unspecified  # type: ignore[no-any-return]


def is_loopback(*a: Any) -> bool:
    return _addr("isLoopback", a).is_loopback  # type: ignore[no-any-return]


_LL_MCAST = (ipaddress.ip_network("224.0.0.0/24"), ipaddress.ip_network("ff02::/16"))


def is_link_local_multicast(*a: Any) -> bool:
    addr = _addr("isLinkLocalMulticast", a)
    return any(addr.version == n.version and addr in n for n in _LL_MCAST)


def is_link_local_unicast(*a: Any) -> bool:
    addr = _addr("isLinkLocalUnicast", a)
    return addr.is_link_local and not addr.is_multicast  # type: ignore[no-any-return]


def is_global_unicast(*a: Any) -> bool:
    """Go's net.IP.IsGlobalUnicast: private ranges count; broadcast, multicast, link-local do not."""
    addr = _addr("isGlobalUnicast", a)
    if addr.version == 4 and addr == ipaddress.IPv4Address("255.255.255.255"):
        return False
    return not (addr.is_unspecified or addr.is_loopback or addr.is_multicast or addr.is_link_local)


def _as_ip(fn: str, v: Any) -> Any:
    k = kind(v)
    if k == "net.IP":
        return v.addr
    if k == "string":
        return _parse_addr(v)
    raise no_overload(fn, v)


def _network(c: CelCIDR) -> Any:
    return ipaddress.ip_network(f"{c.addr}/{c.prefix}", strict=False)


def contains_ip(*a: Any) -> bool:
    if len(a) != 2 or kind(a[0]) != "net.CIDR":
        raise no_overload("containsIP", *a)
    addr = _as_ip("containsIP", a[1])
    net = _network(a[0])
    return addr.version == net.version and addr in net


def contains_cidr(*a: Any) -> bool:
    if len(a) != 2 or kind(a[0]) != "net.CIDR" or kind(a[1]) not in ("net.CIDR", "string"):
        raise no_overload("containsCIDR", *a)
    other = a[1] if kind(a[1]) == "net.CIDR" else cidr(a[1])
    net, sub = _network(a[0]), _network(other)
    return net.version == sub.version and sub.subnet_of(net)  # type: ignore[arg-type]


def masked(*a: Any) -> CelCIDR:
    _want("masked", a, "net.CIDR")
    return CelCIDR(_network(a[0]).network_address, a[0].prefix)


def prefix_length(*a: Any) -> int:
    _want("prefixLength", a, "net.CIDR")
    return a[0].prefix  # type: ignore[no-any-return]


# ------------------------------------------------------------------ the registry
def _opt_result(ts: Sequence[CelType]) -> CelType:
    return OptionalType(ts[0])


def _value_of(ts: Sequence[CelType]) -> CelType:
    return _elem(ts[0]) if isinstance(ts[0], OptionalType) else DYN


def _or_value(ts: Sequence[CelType]) -> CelType:
    return unify(_value_of(ts), ts[1])


def _num_result(ts: Sequence[CelType]) -> CelType:
    if len(ts) == 1 and ts[0].kind == "list":
        ts = [_elem(ts[0])]
    kinds = {t.kind for t in ts}
    return ts[0] if len(kinds) == 1 and "dyn" not in kinds else DYN


def _list_of(ts: Sequence[CelType]) -> CelType:
    return ListType(_elem(ts[0]))


def _flat(ts: Sequence[CelType]) -> CelType:
    inner = _elem(ts[0])
    return ListType(_elem(inner)) if inner.kind == "list" else ListType(DYN)


def _first(ts: Sequence[CelType]) -> CelType:
    return OptionalType(_elem(ts[0]))


_str = STRING  # (short, for the table below)
_fn("charAt", char_at, M("string", "int", result=_str), cost="string")
_fn("indexOf", index_of, M("string", "string", result=INT), M("string", "string", "int", result=INT),
    M("list", "dyn", result=INT), cost="string")
_fn("lastIndexOf", last_index_of, M("string", "string", result=INT), M("string", "string", "int", result=INT),
    M("list", "dyn", result=INT), cost="string")
_fn("lowerAscii", lower_ascii, M("string", result=_str), cost="string", can_error=False)
_fn("upperAscii", upper_ascii, M("string", result=_str), cost="string", can_error=False)
_fn("replace", replace, M("string", "string", "string", result=_str), M("string", "string", "string", "int", result=_str),
    cost="string")
_fn("split", split, M("string", "string", result=ListType(STRING)), M("string", "string", "int", result=ListType(STRING)),
    cost="string")
_fn("substring", substring, M("string", "int", result=_str), M("string", "int", "int", result=_str), cost="string")
_fn("trim", trim, M("string", result=_str), cost="string", can_error=False)
_fn("join", join, M("list(string)", result=_str), M("list(string)", "string", result=_str), cost="list")
_fn("reverse", reverse, M("string", result=_str), M("list", result=_same), cost="string")
_fn("strings.quote", quote, G("string", result=_str), cost="string", can_error=False)
_fn("format", format_, M("string", "list", result=_str), cost="string")

_fn("math.greatest", greatest, G("*num", result=_num_result), cost="list")
_fn("math.least", least, G("*num", result=_num_result), cost="list")
for _name, _impl in (("ceil", ceil), ("floor", floor), ("round", round_), ("trunc", trunc)):
    _fn(f"math.{_name}", _impl, G("double", result=DOUBLE), can_error=False)
_fn("math.sqrt", sqrt, G("num", result=DOUBLE))
_fn("math.abs", abs_, G("num", result=_same))
_fn("math.sign", sign, G("num", result=_same))
for _name, _impl in (("isNaN", is_nan), ("isInf", is_inf), ("isFinite", is_finite)):
    _fn(f"math.{_name}", _impl, G("double", result=BOOL), can_error=False)
for _name, _impl in (("bitAnd", bit_and), ("bitOr", bit_or), ("bitXor", bit_xor)):
    _fn(f"math.{_name}", _impl, G("int", "int", result=INT), G("uint", "uint", result=UINT))
_fn("math.bitNot", bit_not, G("int", result=INT), G("uint", result=UINT))
_fn("math.bitShiftLeft", bit_shift_left, G("int", "int", result=INT), G("uint", "int", result=UINT))
_fn("math.bitShiftRight", bit_shift_right, G("int", "int", result=INT), G("uint", "int", result=UINT))

_fn("slice", slice_, M("list", "int", "int", result=_same), cost="list")
_fn("flatten", flatten, M("list", result=_flat), M("list", "int", result=lambda ts: ListType(DYN)), cost="list")
_fn("sort", sort, M("list", result=_same), cost="sort")
_fn("distinct", distinct, M("list", result=_same), cost="sort")
_fn("lists.range", lists_range, G("int", result=ListType(INT)), cost="list")
_fn("isSorted", is_sorted, M("list", result=BOOL), cost="list")
_fn("sum", sum_, M("list", result=lambda ts: _elem(ts[0]) if _elem(ts[0]).kind != "dyn" else DYN), cost="list")
_fn("min", list_min, M("list", result=lambda ts: _elem(ts[0])), cost="list")
_fn("max", list_max, M("list", result=lambda ts: _elem(ts[0])), cost="list")
_fn("first", first, M("list", result=_first), can_error=False)
_fn("last", last, M("list", result=_first), can_error=False)

_fn("sets.contains", sets_contains, G("list", "list", result=BOOL), cost="sort")
_fn("sets.equivalent", sets_equivalent, G("list", "list", result=BOOL), cost="sort")
_fn("sets.intersects", sets_intersects, G("list", "list", result=BOOL), cost="sort")

_fn("base64.encode", b64_encode, G("bytes", result=STRING), cost="string", can_error=False)
_fn("base64.decode", b64_decode, G("string", result=BYTES), cost="string")

_fn("optional.of", optional_of, G("dyn", result=_opt_result), can_error=False)
_fn("optional.ofNonZeroValue", optional_of_non_zero, G("dyn", result=_opt_result), can_error=False)
_fn("optional.none", optional_none, G(result=OptionalType(DYN)), can_error=False)
_fn("hasValue", has_value, M("optional", result=BOOL), can_error=False)
_fn("value", value, M("optional", result=_value_of))
_fn("orValue", or_value, M("optional", "dyn", result=_or_value), can_error=False)
_fn("or", or_, M("optional", "optional", result=lambda ts: unify(ts[0], ts[1])), can_error=False)


_fn("ip", ip, G("string", result=IP_T), M("net.CIDR", result=IP_T))
_fn("cidr", cidr, G("string", result=CIDR_T))
_fn("isIP", is_ip, G("string", result=BOOL), can_error=False)
_fn("isCIDR", is_cidr, G("string", result=BOOL), can_error=False)
_fn("ip.isCanonical", ip_is_canonical, G("string", result=BOOL))
_fn("family", family, M("net.IP", result=INT), can_error=False)
for _name, _impl in (("isUnspecified", is_unspecified), ("isLoopback", is_loopback),
                     ("isLinkLocalMulticast", is_link_local_multicast), ("isLinkLocalUnicast", is_link_local_unicast),
                     ("isGlobalUnicast", is_global_unicast)):
    _fn(_name, _impl, M("net.IP", result=BOOL), can_error=False)
_fn("containsIP", contains_ip, M("net.CIDR", "net.IP", result=BOOL), M("net.CIDR", "string", result=BOOL))
_fn("containsCIDR", contains_cidr, M("net.CIDR", "net.CIDR", result=BOOL), M("net.CIDR", "string", result=BOOL))
_fn("masked", masked, M("net.CIDR", result=CIDR_T), can_error=False)
_fn("prefixLength", prefix_length, M("net.CIDR", result=INT), can_error=False)


def selected_type(t: CelType, field: str) -> CelType:
    """The static type of `t.field` where `t` may be a map or object (else dyn)."""
    if isinstance(t, MapType):
        return t.value
    if isinstance(t, ObjectType) and field in t.fields:
        return t.fields[field].type
    return DYN


__all__ = ["FUNCTIONS", "Function", "Overload", "check_call", "selected_type"]
