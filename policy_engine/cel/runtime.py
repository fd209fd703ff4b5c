"""Run-time support for compiled CEL programs.

Value mapping (CEL -> Python)::

    int       -> int (range-checked to int64)
    uint      -> CelUint (an ``int`` subclass, range-checked to [0, 2**64))
    double    -> float
    string    -> str
    bytes     -> bytes
    bool      -> bool
    null      -> None
    list      -> list (tuples accepted as input)
    map       -> dict (any Mapping accepted as input)
    timestamp -> timezone-aware datetime (results are in UTC)
    duration  -> timedelta
                 (nanoseconds beyond the microsecond: the subclasses NanoTimestamp / NanoDuration)
    type      -> CelTypeValue

Every helper raises :class:`CelEvaluationError` (or a plain Python error that
the program boundary translates into one).
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from collections.abc import Mapping
from decimal import Decimal
from functools import lru_cache
from typing import Any, Callable, Iterable

from .errors import CelEvaluationError

try:  # pragma: no cover - depends on environment
    import re2 as _re2  # type: ignore[import-not-found]
except Exception:  # pragma: no cover
    _re2 = None

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1
UTC = _dt.timezone.utc
# cel-spec timestamp range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z
# duration range: what an int64 count of nanoseconds holds (about +/-292 years), as in cel-go and
# cel-cpp. MAX_DURATION is that bound rounded down to a microsecond (the plain-timedelta check);
# a NanoDuration is checked in nanoseconds.
MAX_DURATION = _dt.timedelta(microseconds=(2**63 - 1) // 1000)


class CelUint(int):
    """A CEL ``uint``: an ``int`` subclass so arithmetic stays fast; CEL ops keep it distinct."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"{int(self)}u"


class CelTypeValue:
    """A CEL type as a run-time value (``type(1) == int``)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


TYPE_VALUES = {
    n: CelTypeValue(n)
    for n in ("int", "uint", "double", "bool", "string", "bytes", "list", "map", "null_type", "type",
              "google.protobuf.Timestamp", "google.protobuf.Duration", "optional_type", "net.IP", "net.CIDR")
}


class CelOptional:
    """A CEL optional value (``optional.of(x)`` / ``optional.none()``); ``OPTIONAL_NONE`` is the none."""

    __slots__ = ("has", "value")

    def __init__(self, has: bool, value: Any = None) -> None:
        self.has = has
        self.value = value

    def __repr__(self) -> str:
        return f"optional.of({self.value!r})" if self.has else "optional.none()"


OPTIONAL_NONE = CelOptional(False)


class CelIP:
    """A Kubernetes CEL ``net.IP`` (an IPv4 or IPv6 address, no zone)."""

    __slots__ = ("addr",)

    def __init__(self, addr: Any) -> None:
        self.addr = addr  # ipaddress.IPv4Address | IPv6Address

    def _key(self) -> Any:
        mapped = getattr(self.addr, "ipv4_mapped", None)  # ::ffff:c0a8:1 is 192.168.0.1
        return mapped or self.addr

    def __eq__(self, other: object) -> bool:
        return type(other) is CelIP and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return str(self.addr)

    def __repr__(self) -> str:
        return f"ip({str(self.addr)!r})"


class CelCIDR:
    """A Kubernetes CEL ``net.CIDR``: an address (host bits kept, as written) and a prefix length."""

    __slots__ = ("addr", "prefix")

    def __init__(self, addr: Any, prefix: int) -> None:
        self.addr = addr
        self.prefix = prefix

    def __eq__(self, other: object) -> bool:
        return type(other) is CelCIDR and (self.addr, self.prefix) == (other.addr, other.prefix)

    def __hash__(self) -> int:
        return hash((self.addr, self.prefix))

    def __str__(self) -> str:
        return f"{self.addr}/{self.prefix}"

    def __repr__(self) -> str:
        return f"cidr({str(self)!r})"


def opt_of(v: Any) -> CelOptional:
    return CelOptional(True, v)


class _Err:
    """Raised-error wrapper used only inside absorption helpers."""


def var(act: Mapping[str, Any], name: str) -> Any:
    """A variable read where it is used (see Compiler.lazy_depth)."""
    try:
        return act[name]
    except KeyError:
        raise CelEvaluationError(f"no value for variable {name!r} in the activation") from None


def resolve(act: Mapping[str, Any], candidates: tuple[tuple[str, tuple[str, ...]], ...]) -> Any:
    """Dynamic-mode qualified name: the first (variable, fields) candidate whose variable is bound."""
    for name, fields in candidates:
        if name in act:
            v = act[name]
            for f in fields:
                v = select(v, f)
            return v
    raise CelEvaluationError(f"no value for variable {candidates[-1][0]!r} in the activation")


def err(msg: str) -> CelEvaluationError:
    return CelEvaluationError(msg)


def fail(msg: str) -> Any:
    raise CelEvaluationError(msg)


def kind(v: Any) -> str:
    t = type(v)
    if t is bool:
        return "bool"
    if t is int:
        return "int"
    if t is CelUint:
        return "uint"
    if t is float:
        return "double"
    if t is str:
        return "string"
    if t is bytes:
        return "bytes"
    if v is None:
        return "null_type"
    if t is list or t is tuple:
        return "list"
    if isinstance(v, Mapping):
        return "map"
    if t is _dt.datetime:
        return "google.protobuf.Timestamp"
    if t is _dt.timedelta:
        return "google.protobuf.Duration"
    if t is CelTypeValue:
        return "type"
    if t is CelOptional:
        return "optional_type"
    if t is CelIP:
        return "net.IP"
    if t is CelCIDR:
        return "net.CIDR"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, CelUint):
        return "uint"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "double"
    if isinstance(v, str):
        return "string"
    if isinstance(v, (list, tuple)):
        return "list"
    if isinstance(v, _dt.datetime):
        return "google.protobuf.Timestamp"
    if isinstance(v, _dt.timedelta):
        return "google.protobuf.Duration"
    return "unknown"


def _short(k: str) -> str:
    return {"google.protobuf.Timestamp": "timestamp", "google.protobuf.Duration": "duration"}.get(k, k)


def no_overload(op: str, *args: Any) -> CelEvaluationError:
    return CelEvaluationError(f"no matching overload for '{op}' applied to ({', '.join(_short(kind(a)) for a in args)})")


# ---------------------------------------------------------------- integers
def ck(v: int) -> int:
    if INT64_MIN <= v <= INT64_MAX:
        return v
    raise CelEvaluationError("int64 overflow")


def cku(v: int) -> CelUint:
    if 0 <= v <= UINT64_MAX:
        return CelUint(v)
    raise CelEvaluationError("uint64 overflow")


def idiv(a: int, b: int) -> int:
    if b == 0:
        raise CelEvaluationError("division by zero")
    q = abs(a) // abs(b)
    return ck(q if (a < 0) == (b < 0) else -q)


def imod(a: int, b: int) -> int:
    if b == 0:
        raise CelEvaluationError("modulus by zero")
    r = abs(a) % abs(b)
    return -r if a < 0 else r


def udiv(a: int, b: int) -> CelUint:
    if b == 0:
        raise CelEvaluationError("division by zero")
    return CelUint(a // b)


def umod(a: int, b: int) -> CelUint:
    if b == 0:
        raise CelEvaluationError("modulus by zero")
    return CelUint(a % b)


def fdiv(a: float, b: float) -> float:
    try:
        return a / b
    except ZeroDivisionError:
        if a != a or a == 0:
            return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)


def ineg(a: int) -> int:
    return ck(-a)


# ---------------------------------------------------------------- time
# Timestamps and durations are datetime / timedelta (microseconds). A value with nanoseconds
# beyond the microsecond (a literal such as '...59.999999999Z' or '1ns', and arithmetic on one)
# is a NanoTimestamp / NanoDuration: the same type with `nanos` (1..999, added to the
# microseconds; a duration's microseconds are floored). Values without such nanoseconds --
# every value the features give policies -- stay plain and take no slower path.
class NanoTimestamp(_dt.datetime):
    __slots__ = ("nanos",)


class NanoDuration(_dt.timedelta):
    __slots__ = ("nanos",)

    def __neg__(self) -> _dt.timedelta:
        return dur_from_ns(-dur_ns(self))


def ts_ns(t: _dt.datetime) -> int:
    """Nanoseconds since the Unix epoch."""
    return dur_ns(t - _EPOCH) + getattr(t, "nanos", 0)


def dur_ns(d: _dt.timedelta) -> int:
    return ((d.days * 86400 + d.seconds) * 1_000_000 + d.microseconds) * 1000 + getattr(d, "nanos", 0)


def ts_from_ns(ns: int) -> _dt.datetime:
    us, nanos = divmod(ns, 1000)
    try:
        t = _EPOCH + _dt.timedelta(microseconds=us)
    except OverflowError:
        raise CelEvaluationError("timestamp out of range") from None
    if not nanos:
        return t
    out = NanoTimestamp(t.year, t.month, t.day, t.hour, t.minute, t.second, t.microsecond, t.tzinfo)
    out.nanos = nanos
    return out


def dur_from_ns(ns: int) -> _dt.timedelta:
    if not -(2**63) <= ns <= 2**63 - 1:
        raise CelEvaluationError("duration out of range")
    us, nanos = divmod(ns, 1000)
    if not nanos:
        return _dt.timedelta(microseconds=us)
    out = NanoDuration(microseconds=us)
    out.nanos = nanos
    return out


def _nano_compare(cls: type, key: Callable[[Any], int], base: type) -> None:
    import operator

    def make(op: Callable[[int, int], bool]) -> Callable[[Any, Any], Any]:
        def method(self: Any, other: Any) -> Any:
            return op(key(self), key(other)) if isinstance(other, base) else NotImplemented
        return method

    for name in ("eq", "ne", "lt", "le", "gt", "ge"):
        setattr(cls, f"__{name}__", make(getattr(operator, name)))
    cls.__hash__ = base.__hash__  # type: ignore[attr-defined]


_nano_compare(NanoTimestamp, ts_ns, _dt.datetime)
_nano_compare(NanoDuration, dur_ns, _dt.timedelta)


def ts_check(t: _dt.datetime) -> _dt.datetime:
    return t


def dur_check(d: _dt.timedelta) -> _dt.timedelta:
    if -MAX_DURATION <= d <= MAX_DURATION:
        return d
    if type(d) is NanoDuration:
        return dur_from_ns(dur_ns(d))
    raise CelEvaluationError("duration out of range")


_NANO_TYPES = (NanoTimestamp, NanoDuration)


def ts_add(t: _dt.datetime, d: _dt.timedelta) -> _dt.datetime:
    if type(t) in _NANO_TYPES or type(d) in _NANO_TYPES:
        return ts_from_ns(ts_ns(t) + dur_ns(d))
    try:
        return t + d
    except OverflowError:
        raise CelEvaluationError("timestamp out of range") from None


def ts_sub(t: _dt.datetime, d: _dt.timedelta) -> _dt.datetime:
    if type(t) in _NANO_TYPES or type(d) in _NANO_TYPES:
        return ts_from_ns(ts_ns(t) - dur_ns(d))
    try:
        return t - d
    except OverflowError:
        raise CelEvaluationError("timestamp out of range") from None


def ts_diff(a: _dt.datetime, b: _dt.datetime) -> _dt.timedelta:
    if type(a) in _NANO_TYPES or type(b) in _NANO_TYPES:
        return dur_from_ns(ts_ns(a) - ts_ns(b))
    return dur_check(a - b)


def dur_add(a: _dt.timedelta, b: _dt.timedelta) -> _dt.timedelta:
    if type(a) in _NANO_TYPES or type(b) in _NANO_TYPES:
        return dur_from_ns(dur_ns(a) + dur_ns(b))
    try:
        return dur_check(a + b)
    except OverflowError:
        raise CelEvaluationError("duration out of range") from None


def dur_sub(a: _dt.timedelta, b: _dt.timedelta) -> _dt.timedelta:
    if type(a) in _NANO_TYPES or type(b) in _NANO_TYPES:
        return dur_from_ns(dur_ns(a) - dur_ns(b))
    try:
        return dur_check(a - b)
    except OverflowError:
        raise CelEvaluationError("duration out of range") from None


_TS_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})$"
)


@lru_cache(maxsize=1024)
def parse_timestamp(s: str) -> _dt.datetime:
    m = _TS_RE.match(s)
    if not m:
        raise CelEvaluationError(f"invalid timestamp {s!r}")
    y, mo, d, h, mi, sec, frac, tz = m.groups()
    digits = (frac or "0").ljust(9, "0")
    us, nanos = int(digits[:6]), int(digits[6:])
    try:
        if tz in ("Z", "z"):
            off = UTC
        else:
            sign = 1 if tz[0] == "+" else -1
            off = _dt.timezone(sign * _dt.timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6])))
        sec_i = int(sec)
        if sec_i == 60:
            raise ValueError("leap second")
        t = _dt.datetime(int(y), int(mo), int(d), int(h), int(mi), sec_i, us, tzinfo=off).astimezone(UTC)
        return ts_from_ns(ts_ns(t) + nanos) if nanos else t
    except (ValueError, OverflowError) as e:
        raise CelEvaluationError(f"invalid timestamp {s!r}: {e}") from None


_DUR_UNITS = {"h": 3600_000_000_000, "m": 60_000_000_000, "s": 1_000_000_000, "ms": 1_000_000,
              "us": 1_000, "\u00b5s": 1_000, "\u03bcs": 1_000, "ns": 1}
_DUR_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|\u00b5s|\u03bcs|ns)")


@lru_cache(maxsize=1024)
def parse_duration(s: str) -> _dt.timedelta:
    """Go-style duration string: ``[-+]?(number unit)+`` with units h m s ms us ns."""
    text = s
    sign = 1
    if text[:1] in "+-":
        sign = -1 if text[0] == "-" else 1
        text = text[1:]
    if text == "0":
        return _dt.timedelta(0)
    if not text:
        raise CelEvaluationError(f"invalid duration {s!r}")
    pos = 0
    total = Decimal(0)
    while pos < len(text):
        m = _DUR_PART.match(text, pos)
        if not m:
            raise CelEvaluationError(f"invalid duration {s!r}")
        total += Decimal(m.group(1)) * _DUR_UNITS[m.group(2)]
        pos = m.end()
    return dur_from_ns(int(total) * sign)


@lru_cache(maxsize=256)
def tzinfo(name: str) -> _dt.tzinfo:
    m = re.fullmatch(r"([+-])?(\d{1,2}):(\d{2})", name)
    if m:
        sign = -1 if m.group(1) == "-" else 1
        return _dt.timezone(sign * _dt.timedelta(hours=int(m.group(2)), minutes=int(m.group(3))))
    if name in ("UTC", "Z", "utc"):
        return UTC
    try:
        from zoneinfo import ZoneInfo

        return ZoneInfo(name)
    except Exception:
        raise CelEvaluationError(f"unknown time zone {name!r}") from None


def _local(t: Any, tz: Any, fn: str) -> _dt.datetime:
    if not isinstance(t, _dt.datetime):
        raise no_overload(fn, t)
    if tz is None:
        return t.astimezone(UTC)
    if type(tz) is not str:
        raise no_overload(fn, t, tz)
    return t.astimezone(tzinfo(tz))


def _trunc_div(a: int, b: int) -> int:
    q = abs(a) // b
    return q if a >= 0 else -q


def get_full_year(t: Any, tz: Any = None) -> int:
    return _local(t, tz, "getFullYear").year


def get_month(t: Any, tz: Any = None) -> int:
    return _local(t, tz, "getMonth").month - 1


def get_day_of_year(t: Any, tz: Any = None) -> int:
    return _local(t, tz, "getDayOfYear").timetuple().tm_yday - 1


def get_day_of_month(t: Any, tz: Any = None) -> int:
    return _local(t, tz, "getDayOfMonth").day - 1


def get_date(t: Any, tz: Any = None) -> int:
    return _local(t, tz, "getDate").day


def get_day_of_week(t: Any, tz: Any = None) -> int:
    return (_local(t, tz, "getDayOfWeek").weekday() + 1) % 7  # 0 = Sunday


def get_hours(t: Any, tz: Any = None) -> int:
    if isinstance(t, _dt.timedelta) and tz is None:
        return _trunc_div(dur_ns(t), 3_600_000_000_000)
    return _local(t, tz, "getHours").hour


def get_minutes(t: Any, tz: Any = None) -> int:
    if isinstance(t, _dt.timedelta) and tz is None:
        return _trunc_div(dur_ns(t), 60_000_000_000)
    return _local(t, tz, "getMinutes").minute


def get_seconds(t: Any, tz: Any = None) -> int:
    if isinstance(t, _dt.timedelta) and tz is None:
        return _trunc_div(dur_ns(t), 1_000_000_000)
    return _local(t, tz, "getSeconds").second


def get_milliseconds(t: Any, tz: Any = None) -> int:
    if isinstance(t, _dt.timedelta) and tz is None:
        ns = dur_ns(t)
        return _trunc_div(ns, 1_000_000) - _trunc_div(ns, 1_000_000_000) * 1000
    return _local(t, tz, "getMilliseconds").microsecond // 1000


TIME_ACCESSORS: dict[str, Callable[..., int]] = {
    "getFullYear": get_full_year, "getMonth": get_month, "getDayOfYear": get_day_of_year,
    "getDayOfMonth": get_day_of_month, "getDate": get_date, "getDayOfWeek": get_day_of_week,
    "getHours": get_hours, "getMinutes": get_minutes, "getSeconds": get_seconds,
    "getMilliseconds": get_milliseconds,
}


def format_timestamp(t: _dt.datetime) -> str:
    nanos = getattr(t, "nanos", 0)
    t = t.astimezone(UTC)
    base = t.strftime("%Y-%m-%dT%H:%M:%S")
    if len(base) < 19:  # years < 1000 on some platforms
        base = f"{t.year:04d}" + base[base.index("-"):]
    if t.microsecond or nanos:
        base += "." + f"{t.microsecond:06d}{nanos:03d}".rstrip("0")
    return base + "Z"


def format_duration(d: _dt.timedelta) -> str:
    ns = dur_ns(d)
    sign = "-" if ns < 0 else ""
    s, frac = divmod(abs(ns), 1_000_000_000)
    return f"{sign}{s}" + (("." + f"{frac:09d}".rstrip("0")) if frac else "") + "s"


def format_double(f: float) -> str:
    """Like Go's ``strconv.FormatFloat(f, 'g', -1, 64)`` (what cel-go's string(double) prints)."""
    if f != f:
        return "NaN"
    if f in (math.inf, -math.inf):
        return "+Inf" if f > 0 else "-Inf"
    if f == 0:
        return "-0" if math.copysign(1.0, f) < 0 else "0"
    sign, digits, exp = Decimal(repr(f)).normalize().as_tuple()
    ds = "".join(map(str, digits))
    x = len(ds) + int(exp) - 1
    neg = "-" if sign else ""
    if x < -4 or x >= 21:
        mant = ds[0] + ("." + ds[1:] if len(ds) > 1 else "")
        return f"{neg}{mant}e{'+' if x >= 0 else '-'}{abs(x):02d}"
    if x >= len(ds) - 1:
        return neg + ds + "0" * (x - len(ds) + 1)
    if x >= 0:
        return neg + ds[: x + 1] + "." + ds[x + 1 :]
    return neg + "0." + "0" * (-x - 1) + ds


# ---------------------------------------------------------------- conversions
_INT_STR = re.compile(r"^[+-]?\d+$")


def to_int(v: Any) -> int:
    k = kind(v)
    if k == "int":
        return v
    if k == "uint":
        return ck(int(v))
    if k == "double":
        if v != v or v in (math.inf, -math.inf) or not (-(2.0**63) < v < 2.0**63):
            raise CelEvaluationError("int64 overflow converting double to int")
        return ck(int(v))
    if k == "string":
        if not _INT_STR.match(v):
            raise CelEvaluationError(f"cannot convert {v!r} to int")
        return ck(int(v))
    if k == "google.protobuf.Timestamp":
        return int((v - _EPOCH) // _dt.timedelta(seconds=1))
    raise no_overload("int", v)


_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=UTC)


def double_to_int(v: float) -> int:
    """`to_int` of a value statically known to be a double (the checks `to_int` makes for one)."""
    # Exclusive at both ends, as cel-spec requires: -2^63 as a double is already out of range.
    if -(2.0**63) < v < 2.0**63:  # False for NaN and the infinities too
        return int(v)
    raise CelEvaluationError("int64 overflow converting double to int")


def to_uint(v: Any) -> CelUint:
    k = kind(v)
    if k == "uint":
        return v
    if k == "int":
        return cku(v)
    if k == "double":
        if v != v or not (0 <= v < 2.0**64):
            raise CelEvaluationError("uint64 overflow converting double to uint")
        return cku(int(v))
    if k == "string":
        if not re.match(r"^\+?\d+$", v):
            raise CelEvaluationError(f"cannot convert {v!r} to uint")
        return cku(int(v))
    raise no_overload("uint", v)


_FLOAT_STR = re.compile(r"^[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|[Ii]nf(inity)?|NaN|nan)$")


def to_double(v: Any) -> float:
    k = kind(v)
    if k == "double":
        return v
    if k in ("int", "uint"):
        return float(v)
    if k == "string":
        if not _FLOAT_STR.match(v):
            raise CelEvaluationError(f"cannot convert {v!r} to double")
        return float(v)
    raise no_overload("double", v)


def to_string(v: Any) -> str:
    k = kind(v)
    if k == "string":
        return v
    if k == "bool":
        return "true" if v else "false"
    if k in ("int", "uint"):
        return str(int(v))
    if k == "double":
        return format_double(v)
    if k == "bytes":
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            raise CelEvaluationError("invalid UTF-8 in bytes converted to string") from None
    if k == "google.protobuf.Timestamp":
        return format_timestamp(v)
    if k == "google.protobuf.Duration":
        return format_duration(v)
    if k in ("net.IP", "net.CIDR"):
        return str(v)
    raise no_overload("string", v)


def to_bool(v: Any) -> bool:
    k = kind(v)
    if k == "bool":
        return v
    if k == "string":
        if v in ("true", "True", "TRUE", "t", "1"):
            return True
        if v in ("false", "False", "FALSE", "f", "0"):
            return False
        raise CelEvaluationError(f"cannot convert {v!r} to bool")
    raise no_overload("bool", v)


def to_bytes(v: Any) -> bytes:
    k = kind(v)
    if k == "bytes":
        return v
    if k == "string":
        return v.encode("utf-8")
    raise no_overload("bytes", v)


def to_duration(v: Any) -> _dt.timedelta:
    k = kind(v)
    if k == "google.protobuf.Duration":
        return v
    if k == "string":
        return parse_duration(v)
    raise no_overload("duration", v)


def to_timestamp(v: Any) -> _dt.datetime:
    k = kind(v)
    if k == "google.protobuf.Timestamp":
        return v
    if k == "string":
        return parse_timestamp(v)
    if k == "int":
        try:
            return _EPOCH + _dt.timedelta(seconds=v)
        except OverflowError:
            raise CelEvaluationError("timestamp out of range") from None
    raise no_overload("timestamp", v)


def type_of(v: Any) -> CelTypeValue:
    k = kind(v)
    if k == "unknown":
        raise CelEvaluationError(f"unsupported value of Python type {type(v).__name__}")
    return TYPE_VALUES[k]


# ---------------------------------------------------------------- equality / ordering
_NUM = ("int", "uint", "double")


def eq(a: Any, b: Any) -> bool:
    """CEL heterogeneous equality: different types are unequal, numbers compare by value."""
    ka, kb = kind(a), kind(b)
    if ka != kb:
        if ka in _NUM and kb in _NUM:
            return a == b
        return False
    if ka == "list":
        return len(a) == len(b) and all(eq(x, y) for x, y in zip(a, b))
    if ka == "map":
        if len(a) != len(b):
            return False
        for k, v in a.items():
            found, bv = map_get(b, k)
            if not found or not eq(v, bv):
                return False
        return True
    if ka == "type":
        return a is b or a.name == b.name
    if ka == "optional_type":
        return a.has == b.has and (not a.has or eq(a.value, b.value))
    return a == b


def ne(a: Any, b: Any) -> bool:
    return not eq(a, b)


_ORDERED = {"int", "uint", "double", "string", "bytes", "bool", "google.protobuf.Timestamp", "google.protobuf.Duration"}


def _cmp_args(op: str, a: Any, b: Any) -> tuple[Any, Any]:
    """The operands as compared: an int or uint against a double is converted to double first
    (lossy near 2^63, as cel-spec's conformance suite expects)."""
    ka, kb = kind(a), kind(b)
    if ka == kb and ka in _ORDERED:
        return a, b
    if ka in _NUM and kb in _NUM:
        if ka == "double" or kb == "double":
            return float(a), float(b)
        return a, b
    raise no_overload(op, a, b)


def lt(a: Any, b: Any) -> bool:
    a, b = _cmp_args("_<_", a, b)
    return a < b  # type: ignore[no-any-return]


def le(a: Any, b: Any) -> bool:
    a, b = _cmp_args("_<=_", a, b)
    return a <= b  # type: ignore[no-any-return]


def gt(a: Any, b: Any) -> bool:
    a, b = _cmp_args("_>_", a, b)
    return a > b  # type: ignore[no-any-return]


def ge(a: Any, b: Any) -> bool:
    a, b = _cmp_args("_>=_", a, b)
    return a >= b  # type: ignore[no-any-return]


# ---------------------------------------------------------------- dynamic arithmetic
def add(a: Any, b: Any) -> Any:
    ka, kb = kind(a), kind(b)
    if ka == kb:
        if ka == "int":
            return ck(a + b)
        if ka == "uint":
            return cku(a + b)
        if ka in ("double", "string", "bytes"):
            return a + b
        if ka == "list":
            return [*a, *b]
        if ka == "google.protobuf.Duration":
            return dur_add(a, b)
    elif ka == "google.protobuf.Timestamp" and kb == "google.protobuf.Duration":
        return ts_add(a, b)
    elif ka == "google.protobuf.Duration" and kb == "google.protobuf.Timestamp":
        return ts_add(b, a)
    raise no_overload("_+_", a, b)


def sub(a: Any, b: Any) -> Any:
    ka, kb = kind(a), kind(b)
    if ka == kb:
        if ka == "int":
            return ck(a - b)
        if ka == "uint":
            return cku(a - b)
        if ka == "double":
            return a - b
        if ka == "google.protobuf.Duration":
            return dur_sub(a, b)
        if ka == "google.protobuf.Timestamp":
            return ts_diff(a, b)
    elif ka == "google.protobuf.Timestamp" and kb == "google.protobuf.Duration":
        return ts_sub(a, b)
    raise no_overload("_-_", a, b)


def mul(a: Any, b: Any) -> Any:
    ka, kb = kind(a), kind(b)
    if ka == kb:
        if ka == "int":
            return ck(a * b)
        if ka == "uint":
            return cku(a * b)
        if ka == "double":
            return a * b
    raise no_overload("_*_", a, b)


def div(a: Any, b: Any) -> Any:
    ka, kb = kind(a), kind(b)
    if ka == kb:
        if ka == "int":
            return idiv(a, b)
        if ka == "uint":
            return udiv(a, b)
        if ka == "double":
            return fdiv(a, b)
    raise no_overload("_/_", a, b)


def mod(a: Any, b: Any) -> Any:
    ka, kb = kind(a), kind(b)
    if ka == kb:
        if ka == "int":
            return imod(a, b)
        if ka == "uint":
            return umod(a, b)
    raise no_overload("_%_", a, b)


def neg(a: Any) -> Any:
    k = kind(a)
    if k == "int":
        return ck(-a)
    if k == "double":
        return -a
    if k == "google.protobuf.Duration":
        return dur_check(-a)
    raise no_overload("-_", a)


def not_(a: Any) -> bool:
    if type(a) is bool:
        return not a
    raise no_overload("!_", a)


def as_bool(a: Any, op: str = "_?_:_") -> bool:
    if type(a) is bool:
        return a
    raise no_overload(op, a)


def and_(fa: Callable[[], Any], fb: Callable[[], Any]) -> bool:
    """CEL ``&&``: false wins over errors on either side (commutative absorption)."""
    try:
        a = fa()
        if type(a) is not bool:
            raise no_overload("_&&_", a)
        if a is False:
            return False
        ea = None
    except Exception as e:  # noqa: BLE001 - absorbed per CEL semantics
        ea = e
    try:
        b = fb()
        if type(b) is not bool:
            raise no_overload("_&&_", b)
    except Exception:
        if ea is not None:
            raise ea from None
        raise
    if b is False:
        return False
    if ea is not None:
        raise ea
    return True


def or_(fa: Callable[[], Any], fb: Callable[[], Any]) -> bool:
    """CEL ``||``: true wins over errors on either side (commutative absorption)."""
    try:
        a = fa()
        if type(a) is not bool:
            raise no_overload("_||_", a)
        if a is True:
            return True
        ea = None
    except Exception as e:  # noqa: BLE001
        ea = e
    try:
        b = fb()
        if type(b) is not bool:
            raise no_overload("_||_", b)
    except Exception:
        if ea is not None:
            raise ea from None
        raise
    if b is True:
        return True
    if ea is not None:
        raise ea
    return False


# ---------------------------------------------------------------- containers
def map_get(m: Mapping[Any, Any], k: Any) -> tuple[bool, Any]:
    kk = kind(k)
    if kk not in ("int", "uint", "double", "string", "bool"):
        raise CelEvaluationError(f"unsupported map key type {_short(kk)}")
    try:
        v = m[k]
    except (KeyError, TypeError):
        return False, None
    # Python conflates True/1 and False/0 as dict keys; CEL does not.
    if (kk == "bool" or (kk in _NUM and (k == 0 or k == 1))) and not _key_kind_matches(m, k, kk):
        return False, None
    return True, v


def _key_kind_matches(m: Mapping[Any, Any], k: Any, kk: str) -> bool:
    # Fast path: the exact object kind is present.
    for stored in m.keys():
        if stored == k:
            ks = kind(stored)
            if ks == kk or (ks in _NUM and kk in _NUM):
                return True
    return False


def index(c: Any, i: Any) -> Any:
    kc = kind(c)
    if kc == "list":
        return list_index(c, i)
    if kc == "map":
        found, v = map_get(c, i)
        if not found:
            raise CelEvaluationError(f"no such key: {i!r}")
        return v
    if kc == "optional_type":  # indexing through an optional gives an optional
        return opt_index(c, i)
    raise no_overload("_[_]", c, i)


def list_index(c: Any, i: Any) -> Any:
    ki = kind(i)
    if ki == "double":
        if i != int(i) if i == i and abs(i) != math.inf else True:
            raise CelEvaluationError(f"invalid list index {i!r}")
        i = int(i)
    elif ki not in ("int", "uint"):
        raise no_overload("_[_]", c, i)
    if 0 <= i < len(c):
        return c[i]
    raise CelEvaluationError(f"index out of range: {i}")


def select(o: Any, f: str) -> Any:
    if isinstance(o, Mapping):
        try:
            return o[f]
        except KeyError:
            raise CelEvaluationError(f"no such key: {f!r}") from None
    if type(o) is CelOptional:  # selecting through an optional gives an optional
        return opt_select(o, f)
    raise CelEvaluationError(f"type '{_short(kind(o))}' does not support field selection")


def has(o: Any, f: str) -> bool:
    if isinstance(o, Mapping):
        return f in o
    if type(o) is CelOptional:
        return o.has and has(o.value, f)
    raise CelEvaluationError(f"type '{_short(kind(o))}' does not support has()")


def opt_select(o: Any, f: str) -> CelOptional:
    """`o.?f`: optional.of(o.f) when o has the field, else optional.none()."""
    if type(o) is CelOptional:
        if not o.has:
            return OPTIONAL_NONE
        o = o.value
    if isinstance(o, Mapping):
        return CelOptional(True, o[f]) if f in o else OPTIONAL_NONE
    raise CelEvaluationError(f"type '{_short(kind(o))}' does not support field selection")


def opt_index(c: Any, i: Any) -> CelOptional:
    """`c[?i]`: optional.of(c[i]) when the index or key exists, else optional.none()."""
    if type(c) is CelOptional:
        if not c.has:
            return OPTIONAL_NONE
        c = c.value
    kc = kind(c)
    if kc == "list":
        ki = kind(i)
        if ki not in ("int", "uint", "double"):
            raise no_overload("_[?_]", c, i)
        if ki == "double" and (i != i or i != int(i)):
            return OPTIONAL_NONE
        return CelOptional(True, c[int(i)]) if 0 <= i < len(c) else OPTIONAL_NONE
    if kc == "map":
        found, v = map_get(c, i)
        return CelOptional(True, v) if found else OPTIONAL_NONE
    raise no_overload("_[?_]", c, i)


def in_(x: Any, c: Any) -> bool:
    kc = kind(c)
    if kc == "list":
        for y in c:
            if eq(x, y):
                return True
        return False
    if kc == "map":
        return map_get(c, x)[0]
    raise no_overload("@in", x, c)


def in_list(x: Any, c: Any) -> bool:
    for y in c:
        if eq(x, y):
            return True
    return False


def make_map(entries: Iterable[tuple[Any, Any]]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for k, v in entries:
        kk = kind(k)
        if kk not in ("int", "uint", "string", "bool"):
            raise CelEvaluationError(f"unsupported map key type {_short(kk)}")
        if k in out:  # Python-equal: 1, 1u and 1.0 -- and also true
            stored = next(x for x in out if x == k)
            if eq(stored, k):
                raise CelEvaluationError(f"duplicate map key {k!r}")
            # CEL keeps 1 and true apart; a Python dict cannot: refuse rather than drop an entry
            raise CelEvaluationError(f"map keys {stored!r} and {k!r} cannot be in one map here "
                                     "(bool and numeric keys 0/1 collide in the Python mapping)")
        out[k] = v
    return out


def size(v: Any) -> int:
    k = kind(v)
    if k in ("string", "bytes", "list", "map"):
        return len(v)
    raise no_overload("size", v)


def iter_range(counter: list[int], limit: int, r: Any) -> Any:
    """Charge ``len(r)`` iterations to this evaluation's budget and return ``r``."""
    k = kind(r)
    if k not in ("list", "map"):
        raise CelEvaluationError(f"expression of type '{_short(k)}' cannot be the range of a comprehension")
    n = counter[0] + len(r)
    if n > limit:
        raise CelEvaluationError(f"iteration limit exceeded ({limit} comprehension iterations per evaluation)")
    counter[0] = n
    return r


def exists(r: Iterable[Any], pred: Callable[..., Any], star: bool = False) -> bool:
    first: Exception | None = None
    for x in r:
        try:
            v = pred(*x) if star else pred(x)
            if type(v) is not bool:
                raise no_overload("exists", v)
        except Exception as e:  # noqa: BLE001
            if first is None:
                first = e
            continue
        if v:
            return True
    if first is not None:
        raise first
    return False


def all_(r: Iterable[Any], pred: Callable[..., Any], star: bool = False) -> bool:
    first: Exception | None = None
    for x in r:
        try:
            v = pred(*x) if star else pred(x)
            if type(v) is not bool:
                raise no_overload("all", v)
        except Exception as e:  # noqa: BLE001
            if first is None:
                first = e
            continue
        if not v:
            return False
    if first is not None:
        raise first
    return True


# ---------------------------------------------------------------- strings
def _str_args(fn: str, s: Any, a: Any) -> None:
    if type(s) is not str or type(a) is not str:
        raise no_overload(fn, s, a)


def contains(s: Any, a: Any) -> bool:
    _str_args("contains", s, a)
    return a in s


def starts_with(s: Any, a: Any) -> bool:
    _str_args("startsWith", s, a)
    return s.startswith(a)


def ends_with(s: Any, a: Any) -> bool:
    _str_args("endsWith", s, a)
    return s.endswith(a)


_UNSUPPORTED_RE = re.compile(r"\\[1-9]|\\k<|\(\?P=|\(\?=|\(\?!|\(\?<=|\(\?<!|\(\?>|[*+?}]\+")


def regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not an RE2 pattern we can run, or None."""
    if _re2 is not None:
        try:
            _re2.compile(pattern)
        except Exception as e:  # noqa: BLE001
            msg = e.args[0] if e.args else e
            if isinstance(msg, bytes):
                msg = msg.decode("utf-8", "replace")
            return f"invalid regular expression: {msg}"
        return None
    if _UNSUPPORTED_RE.search(pattern):
        return "regular expression uses a construct RE2 does not support (backreference, lookaround, atomic/possessive)"
    try:
        re.compile(pattern)
    except re.error as e:
        return f"invalid regular expression: {e}"
    return None


@lru_cache(maxsize=512)
def compile_regex(pattern: str) -> Any:
    problem = regex_problem(pattern)
    if problem:
        raise CelEvaluationError(problem)
    if _re2 is not None:
        return _re2.compile(pattern)
    return re.compile(pattern)  # fallback: Python re can backtrack on adversarial input


@lru_cache(maxsize=512)
def make_matcher(pattern: str) -> Callable[[str], bool]:
    """A ``str -> bool`` partial-match (search) function for ``pattern``, compiled once.

    With google-re2 this calls RE2's low-level ``Match`` directly (the public
    ``search`` builds match objects and costs several microseconds more).
    """
    rx = compile_regex(pattern)
    if _re2 is not None:
        try:
            low = rx._regexp
            anchor = _re2._Anchor.UNANCHORED
            low.Match(anchor, b"", 0, 0)

            def match_re2(s: str) -> bool:
                b = s.encode("utf-8")
                return bool(low.Match(anchor, b, 0, len(b))[0][0] >= 0)

            return match_re2
        except Exception:  # noqa: BLE001 - private API changed: use the public one
            pass
    search = rx.search
    return lambda s: search(s) is not None


def matches(s: Any, pattern: Any) -> bool:
    _str_args("matches", s, pattern)
    return make_matcher(pattern)(s)


HAS_RE2 = _re2 is not None


# ---------------------------------------------------------------- result checks / boundary
def check_result(v: Any, expected: str) -> Any:
    k = kind(v)
    if k == expected or expected == "dyn":
        return v
    raise CelEvaluationError(f"expression produced a {_short(k)}, expected {_short(expected)}")


def translate(e: BaseException) -> CelEvaluationError:
    """Turn a stray Python exception from generated code into a CelEvaluationError."""
    if isinstance(e, CelEvaluationError):
        return e
    if isinstance(e, KeyError):
        return CelEvaluationError(f"no such key: {e.args[0]!r}" if e.args else "no such key")
    if isinstance(e, ZeroDivisionError):
        return CelEvaluationError("division by zero")
    if isinstance(e, OverflowError):
        return CelEvaluationError(f"overflow: {e}")
    if isinstance(e, IndexError):
        return CelEvaluationError("index out of range")
    if isinstance(e, (TypeError, AttributeError)):
        return CelEvaluationError(f"no matching overload ({e})")
    if isinstance(e, RecursionError):
        return CelEvaluationError("expression nesting too deep")
    return CelEvaluationError(f"{type(e).__name__}: {e}")
