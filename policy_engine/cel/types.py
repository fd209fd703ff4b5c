"""CEL types used for declarations and for the checker.

* Primitive constants: ``INT, UINT, DOUBLE, STRING, BOOL, BYTES, NULL, DYN,
  TIMESTAMP, DURATION, TYPE``.
* ``ListType(elem, max_size=None)``, ``MapType(key, value, max_size=None)``.
* ``ObjectType(name, fields)`` where ``fields`` maps names to :class:`Field` or
  a bare :class:`CelType`.  At run time an object is a plain ``Mapping[str, object]``;
  a field declared ``optional=True`` may be absent (``has(o.f)`` tests presence).
* ``OptionalType(t)``: an optional value (``optional.of(x)``, ``m.?key``).
* ``Nullable(t)``: the value may also be ``null`` (Python ``None``).
* String / bytes size bounds: ``StringType(max_size=...)`` or ``STRING.with_max(n)``
  (also works on lists and maps).  Sizes only feed the static cost estimate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Union


@dataclass(frozen=True)
class CelType:
    """Base of all CEL types. ``kind`` is the CEL type name ("int", "list", ...)."""

    kind: str
    max_size: int | None = None
    nullable: bool = field(default=False, kw_only=True)

    def with_max(self, max_size: int) -> "CelType":
        return dataclasses.replace(self, max_size=max_size)

    def __str__(self) -> str:
        return self.kind + ("?" if self.nullable else "")

    @property
    def is_dyn(self) -> bool:
        return self.kind == "dyn"


def _prim(kind: str) -> CelType:
    return CelType(kind)


INT = _prim("int")
UINT = _prim("uint")
DOUBLE = _prim("double")
STRING = _prim("string")
BOOL = _prim("bool")
BYTES = _prim("bytes")
NULL = _prim("null_type")
DYN = _prim("dyn")
TIMESTAMP = _prim("google.protobuf.Timestamp")
DURATION = _prim("google.protobuf.Duration")
TYPE = _prim("type")

PRIMITIVE_KINDS = {t.kind: t for t in (INT, UINT, DOUBLE, STRING, BOOL, BYTES, NULL, DYN, TIMESTAMP, DURATION, TYPE)}


def StringType(max_size: int | None = None) -> CelType:  # noqa: N802 - constructor-like
    return CelType("string", max_size)


def BytesType(max_size: int | None = None) -> CelType:  # noqa: N802
    return CelType("bytes", max_size)


@dataclass(frozen=True)
class ListType(CelType):
    kind: str = field(default="list", init=False)
    elem: CelType = DYN
    max_size: int | None = None

    def __init__(self, elem: CelType = DYN, max_size: int | None = None, *, nullable: bool = False) -> None:
        object.__setattr__(self, "kind", "list")
        object.__setattr__(self, "elem", elem)
        object.__setattr__(self, "max_size", max_size)
        object.__setattr__(self, "nullable", nullable)

    def __str__(self) -> str:
        return f"list({self.elem})" + ("?" if self.nullable else "")


@dataclass(frozen=True)
class MapType(CelType):
    kind: str = field(default="map", init=False)
    key: CelType = DYN
    value: CelType = DYN
    max_size: int | None = None

    def __init__(self, key: CelType = DYN, value: CelType = DYN, max_size: int | None = None, *, nullable: bool = False) -> None:
        object.__setattr__(self, "kind", "map")
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "max_size", max_size)
        object.__setattr__(self, "nullable", nullable)

    def __str__(self) -> str:
        return f"map({self.key}, {self.value})" + ("?" if self.nullable else "")


@dataclass(frozen=True)
class OptionalType(CelType):
    """``optional_type(T)``: a value of type ``T`` or none (the optional-values extension)."""

    kind: str = field(default="optional_type", init=False)
    elem: CelType = DYN

    def __init__(self, elem: CelType = DYN) -> None:
        object.__setattr__(self, "kind", "optional_type")
        object.__setattr__(self, "elem", elem)
        object.__setattr__(self, "max_size", None)
        object.__setattr__(self, "nullable", False)

    def __str__(self) -> str:
        return f"optional({self.elem})"


@dataclass(frozen=True)
class Field:
    """A field of an :class:`ObjectType`. ``optional`` fields may be absent at run time."""

    type: CelType
    optional: bool = False
    description: str = ""


@dataclass(frozen=True, eq=False)
class ObjectType(CelType):
    """A record type; its run-time value is a ``Mapping[str, object]``."""

    kind: str = field(default="object", init=False)
    name: str = ""
    fields: Mapping[str, Field] = field(default_factory=dict)

    def __init__(self, name: str, fields: Mapping[str, Union[Field, CelType]], *, nullable: bool = False) -> None:
        norm = {k: (v if isinstance(v, Field) else Field(v)) for k, v in fields.items()}
        object.__setattr__(self, "kind", "object")
        object.__setattr__(self, "max_size", None)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "fields", norm)
        object.__setattr__(self, "nullable", nullable)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectType) and other.name == self.name and other.nullable == self.nullable

    def __hash__(self) -> int:
        return hash(("object", self.name, self.nullable))

    def __str__(self) -> str:
        return self.name + ("?" if self.nullable else "")


def Nullable(t: CelType) -> CelType:  # noqa: N802
    """``t`` or ``null``."""
    if t.kind in ("dyn", "null_type") or isinstance(t, OptionalType):
        return t if not isinstance(t, OptionalType) else DYN
    return dataclasses.replace(t, nullable=True) if not isinstance(t, (ListType, MapType, ObjectType)) else _renull(t)


def _renull(t: CelType) -> CelType:
    if isinstance(t, ListType):
        return ListType(t.elem, t.max_size, nullable=True)
    if isinstance(t, MapType):
        return MapType(t.key, t.value, t.max_size, nullable=True)
    assert isinstance(t, ObjectType)
    return ObjectType(t.name, t.fields, nullable=True)


def non_null(t: CelType) -> CelType:
    if not t.nullable:
        return t
    if isinstance(t, ListType):
        return ListType(t.elem, t.max_size)
    if isinstance(t, MapType):
        return MapType(t.key, t.value, t.max_size)
    if isinstance(t, ObjectType):
        return ObjectType(t.name, t.fields)
    return dataclasses.replace(t, nullable=False)


def same_type(a: CelType, b: CelType) -> bool:
    """Structural equality ignoring size bounds and nullability."""
    if a.kind != b.kind:
        return False
    if isinstance(a, ListType) and isinstance(b, ListType):
        return same_type(a.elem, b.elem)
    if isinstance(a, MapType) and isinstance(b, MapType):
        return same_type(a.key, b.key) and same_type(a.value, b.value)
    if isinstance(a, OptionalType) and isinstance(b, OptionalType):
        return same_type(a.elem, b.elem)
    if isinstance(a, ObjectType) and isinstance(b, ObjectType):
        return a.name == b.name
    return True


def assignable(target: CelType, value: CelType) -> bool:
    """Can a value of static type ``value`` be used where ``target`` is required (dyn is wild)."""
    if target.kind == "dyn" or value.kind == "dyn":
        return True
    if value.kind == "null_type":
        return target.nullable or target.kind == "null_type"
    if target.kind != value.kind:
        return False
    if isinstance(target, ListType) and isinstance(value, ListType):
        return assignable(target.elem, value.elem)
    if isinstance(target, MapType) and isinstance(value, MapType):
        return assignable(target.key, value.key) and assignable(target.value, value.value)
    if isinstance(target, OptionalType) and isinstance(value, OptionalType):
        return assignable(target.elem, value.elem)
    if isinstance(target, ObjectType) and isinstance(value, ObjectType):
        return target.name == value.name
    return True


def unify(a: CelType, b: CelType) -> CelType:
    """The most specific common type of two branches (``dyn`` when they disagree)."""
    if a.kind == "null_type" and b.kind != "null_type":
        return Nullable(b)
    if b.kind == "null_type" and a.kind != "null_type":
        return Nullable(a)
    if a.kind != b.kind or a.kind == "dyn":
        return DYN
    nullable = a.nullable or b.nullable
    if isinstance(a, ListType) and isinstance(b, ListType):
        return ListType(unify(a.elem, b.elem), _max(a.max_size, b.max_size), nullable=nullable)
    if isinstance(a, MapType) and isinstance(b, MapType):
        return MapType(unify(a.key, b.key), unify(a.value, b.value), _max(a.max_size, b.max_size), nullable=nullable)
    if isinstance(a, OptionalType) and isinstance(b, OptionalType):
        return OptionalType(unify(a.elem, b.elem))
    if isinstance(a, ObjectType) and isinstance(b, ObjectType):
        return a if a.name == b.name and not b.nullable else (b if a.name == b.name else DYN)
    return CelType(a.kind, _max(a.max_size, b.max_size), nullable=nullable)


def _max(a: int | None, b: int | None) -> int | None:
    if a is None or b is None:
        return None
    return max(a, b)
