"""Type checker, cost estimator and Python code generator for CEL.

The checker annotates every AST node with its static type (``node.type``),
whether evaluating it may raise (``node.can_error``), its static cost
(``node.cost``) and, for strings/bytes/lists/maps, an upper bound on its size
(``node.msize``).  The generator then emits one Python expression per node:
plain Python operators where the static types prove the operation cannot fail
or differ from CEL, and run-time helpers (``runtime.py``) everywhere else.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Mapping

from . import ext
from . import runtime as rt
from .ast import (
    Bind, Call, Comprehension, Cond, Ident, Index, Invalid, ListLit, Lit, MapLit, Node, ObjLit, OptMap, OptSelect, Select,
)
from .errors import CelEvaluationError, CelIssue, line_col
from .types import (
    BOOL, BYTES, DOUBLE, DURATION, DYN, INT, NULL, STRING, TIMESTAMP, TYPE, UINT,
    CelType, Field, ListType, MapType, Nullable, ObjectType, OptionalType, assignable, non_null, unify,
)

# Cost model defaults (see Program.cost).
DEFAULT_LIST_SIZE = 1000
DEFAULT_STRING_SIZE = 10_000
STRING_COST_FACTOR = 0.1  # cost per character traversed, as in Kubernetes CEL

NUMERIC = ("int", "uint", "double")
ORDERED = {"int", "uint", "double", "string", "bytes", "bool", TIMESTAMP.kind, DURATION.kind}
TYPE_NAMES = {
    "int": "int", "uint": "uint", "double": "double", "bool": "bool", "string": "string",
    "bytes": "bytes", "list": "list", "map": "map", "null_type": "null_type", "type": "type",
    "dyn": "dyn",
    "google.protobuf.Timestamp": "google.protobuf.Timestamp",
    "google.protobuf.Duration": "google.protobuf.Duration",
    "optional_type": "optional_type",
}
# Type names written qualified (`google.protobuf.Timestamp == type(t)`).
QUALIFIED_TYPE_NAMES = {"google.protobuf.Timestamp", "google.protobuf.Duration", "net.IP", "net.CIDR"}
# In dynamic mode these checker findings become evaluation errors of the node (so `||`/`&&` can
# absorb them, as cel-go's unchecked evaluation does); any other finding stays a compile error.
DEFERRABLE = {"no-overload", "undeclared-function", "undeclared", "no-such-field"}
TIME_FUNCS = set(rt.TIME_ACCESSORS)
DURATION_FUNCS = {"getHours", "getMinutes", "getSeconds", "getMilliseconds"}
CONVERSIONS = {"int", "uint", "double", "string", "bool", "bytes", "duration", "timestamp", "dyn", "type"}
STRING_METHODS = {"contains", "startsWith", "endsWith", "matches"}
KNOWN_FUNCTIONS = sorted(TIME_FUNCS | CONVERSIONS | STRING_METHODS | set(ext.FUNCTIONS) | {
    "size", "has", "all", "exists", "exists_one", "existsOne", "map", "filter", "cel.bind", "optMap", "optFlatMap",
    "sortBy", "transformList", "transformMap", "transformMapEntry"})

_HELPER_NAMES = {
    "ck": rt.ck, "cku": rt.cku, "idiv": rt.idiv, "imod": rt.imod, "udiv": rt.udiv, "umod": rt.umod,
    "fdiv": rt.fdiv, "ts_add": rt.ts_add, "ts_sub": rt.ts_sub, "ts_diff": rt.ts_diff,
    "dur_add": rt.dur_add, "dur_check": rt.dur_check, "dur_sub": rt.dur_sub, "add": rt.add, "sub": rt.sub, "mul": rt.mul,
    "div": rt.div, "mod": rt.mod, "neg": rt.neg, "not_": rt.not_, "as_bool": rt.as_bool,
    "and_": rt.and_, "or_": rt.or_, "eq": rt.eq, "ne": rt.ne, "lt": rt.lt, "le": rt.le, "gt": rt.gt,
    "ge": rt.ge, "index": rt.index, "list_index": rt.list_index, "select": rt.select, "has": rt.has,
    "in_": rt.in_, "in_list": rt.in_list, "make_map": rt.make_map, "size": rt.size,
    "iter_range": rt.iter_range, "exists": rt.exists, "all_": rt.all_, "contains": rt.contains,
    "starts_with": rt.starts_with, "ends_with": rt.ends_with, "matches": rt.matches,
    "to_int": rt.to_int, "double_to_int": rt.double_to_int, "to_uint": rt.to_uint, "to_double": rt.to_double, "to_string": rt.to_string,
    "to_bool": rt.to_bool, "to_bytes": rt.to_bytes, "to_duration": rt.to_duration,
    "to_timestamp": rt.to_timestamp, "type_of": rt.type_of, "check_result": rt.check_result,
    "translate": rt.translate, "fail": rt.fail, "CelUint": rt.CelUint, "var": rt.var, "resolve": rt.resolve,
    "CelEvaluationError": CelEvaluationError, "map_get": rt.map_get,
    "opt_select": rt.opt_select, "opt_index": rt.opt_index, "opt_items": ext.opt_items,
    "make_map_opt": ext.make_map_opt, "merge_entries": ext.merge_entries, "pairs": ext.pairs, "bind": ext.bind,
    "opt_map": ext.opt_map, "opt_flat_map": ext.opt_flat_map, "sort_by": ext.sort_by,
    **{"t_" + k: v for k, v in rt.TIME_ACCESSORS.items()},
}


def exact(t: CelType) -> bool:
    """Statically known, not dyn, not nullable: Python ops on it behave as CEL's."""
    return t.kind != "dyn" and not t.nullable


def _suggest(name: str, candidates: Any) -> str | None:
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def _tname(t: CelType) -> str:
    return {"google.protobuf.Timestamp": "timestamp", "google.protobuf.Duration": "duration"}.get(t.kind, str(t))


class Compiler:
    def __init__(self, source: str, declarations: Mapping[str, CelType] | None, max_iterations: int,
                 container: str = "") -> None:
        self.src = source
        # container-relative name resolution: `y` in container `a.b` tries a.b.y, a.y, y
        parts = container.split(".") if container else []
        self.prefixes = [".".join(parts[:i]) + "." for i in range(len(parts), 0, -1)] + [""]
        self.decls = dict(declarations) if declarations is not None else None
        self.dynamic = declarations is None
        self.max_iterations = max_iterations
        self.issues: list[CelIssue] = []
        self.scopes: list[dict[str, tuple[CelType, str]]] = []
        self.globals: dict[str, str] = {}  # CEL name -> the Python expression reading it
        self.consts: dict[str, Any] = {}
        self._const_ids: dict[Any, str] = {}
        self.paths: dict[int, str] = {}
        self.path_nodes: dict[int, Node] = {}
        self.uses_iter = False
        self._n = 0
        # Variables are read from the activation once, up front, when some read of them is
        # unconditional. One read only under `&&`/`||`/`?:` or in a macro body must not fail
        # when the variable is absent (`false && x`): such variables make the generator emit a
        # second, lazy variant of the function that the fast one falls back to on a KeyError.
        self.lazy_depth = 0
        self.strict_globals: set[str] = set()
        self.lazy_mode = False
        self._lazy_reads = 0

    # ------------------------------------------------------------ issues
    def error(self, offset: int, message: str, code: str, hint: str | None = None, end: int | None = None) -> CelType:
        line, col = line_col(self.src, offset)
        self.issues.append(CelIssue(offset, line, col, message, code, hint, end))
        return DYN

    def fresh(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def const(self, value: Any) -> str:
        key = (type(value).__name__, repr(value)) if not callable(getattr(value, "search", None)) else id(value)
        name = self._const_ids.get(key)
        if name is None:
            name = self.fresh("_k")
            self._const_ids[key] = name
            self.consts[name] = value
        return name

    # ------------------------------------------------------------ checker
    def check(self, node: Node) -> CelType:
        before = len(self.issues)
        reads = self._lazy_reads
        t = getattr(self, "c_" + type(node).__name__)(node)
        node.lazy_reads = self._lazy_reads > reads  # type: ignore[attr-defined]
        if self.dynamic and len(self.issues) > before and all(i.code in DEFERRABLE for i in self.issues[before:]):
            node.deferred = self.issues[before].message  # type: ignore[attr-defined]
            del self.issues[before:]
            node.can_error = True
            t = DYN
        node.type = t
        if not hasattr(node, "msize"):
            node.msize = getattr(t, "max_size", None)
        return t

    def _set(self, node: Node, can_error: bool, cost: float, size: int | None = None) -> None:
        node.can_error = can_error
        node.cost = cost
        if size is not None:
            node.msize = size

    def c_Lit(self, n: Lit) -> CelType:
        t = {"int": INT, "uint": UINT, "double": DOUBLE, "string": STRING, "bytes": BYTES, "bool": BOOL, "null": NULL}[n.kind]
        self._set(n, False, 1, len(n.value) if n.kind in ("string", "bytes") else None)
        return t

    def lookup_local(self, name: str) -> tuple[CelType, str] | None:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        return None

    def lazily(self, node: Node) -> CelType:
        """Check a sub-expression that is evaluated only on some paths (or whose error is absorbed)."""
        self.lazy_depth += 1
        try:
            return self.check(node)
        finally:
            self.lazy_depth -= 1

    def resolve(self, name: str, root: bool) -> str | None:
        """The declared name `name` refers to (container-relative), or None."""
        if self.decls is None:
            return None
        for prefix in ([""] if root else self.prefixes):
            if prefix + name in self.decls:
                return prefix + name
        return None

    def global_ref(self, n: Node, name: str, t: CelType) -> CelType:
        # Read where it is used, not into a local first: the generated function is then a third shorter
        # to compile, and the hand-written Python it competes with reads the activation the same way.
        n.py = self.globals.setdefault(name, f"act[{name!r}]")  # type: ignore[attr-defined]
        n.gname = name  # type: ignore[attr-defined]
        if self.lazy_depth == 0:
            self.strict_globals.add(name)
        else:
            self._lazy_reads += 1
        self.paths[id(n)] = name
        self.path_nodes[id(n)] = n
        return t

    def c_Invalid(self, n: Invalid) -> CelType:
        self._set(n, True, 1)
        return DYN

    def c_Ident(self, n: Ident) -> CelType:
        self._set(n, False, 1)
        if not n.root:
            local = self.lookup_local(n.name)
            if local is not None:
                n.py = local[1]
                return local[0]
        is_type_name = n.name in TYPE_NAMES or n.name in ("timestamp", "duration")
        if is_type_name and n.name == "dyn":  # `dyn` is a type only inside dyn(...)
            is_type_name = False
        declared = self.resolve(n.name, n.root)
        if self.dynamic and not is_type_name and len(self.prefixes) > 1:
            # container-relative lookup at run time (the activation is the only declaration)
            n.candidates = tuple((p + n.name, ()) for p in ([""] if n.root else self.prefixes))  # type: ignore[attr-defined]
            self._set(n, True, 1)
            self.paths[id(n)] = n.name
            return DYN
        if (self.dynamic and not is_type_name) or declared is not None:
            t = DYN if self.dynamic else self.decls[declared]  # type: ignore[index]
            self.global_ref(n, declared or n.name, t)
            if t.nullable:
                n.can_error = False
            return t
        if is_type_name:
            tn = {"timestamp": "google.protobuf.Timestamp", "duration": "google.protobuf.Duration"}.get(n.name, n.name)
            if tn == "dyn":
                tn = "dyn"
            n.py = self.const(rt.TYPE_VALUES.get(tn) or rt.CelTypeValue(tn))
            return TYPE
        cands = list(self.decls or {}) + [k for s in self.scopes for k in s]
        return self.error(n.offset, f"undeclared reference to '{n.name}'", "undeclared", _suggest(n.name, cands), n.end)

    def _qualified(self, n: Node) -> str | None:
        if isinstance(n, Ident):
            return None if (not n.root and self.lookup_local(n.name)) else n.name
        if isinstance(n, Select) and not n.test_only:
            left = self._qualified(n.operand)
            return None if left is None else f"{left}.{n.field}"
        return None

    def _root(self, n: Node) -> Ident | None:
        while isinstance(n, Select):
            n = n.operand
        return n if isinstance(n, Ident) else None

    def c_Select(self, n: Select) -> CelType:
        q = None if n.test_only else self._qualified(n)
        root = self._root(n) if q is not None else None
        if q is not None and root is not None:
            if q in QUALIFIED_TYPE_NAMES and self.resolve(root.name, root.root) is None:
                self._set(n, False, 1)
                n.py_const = self.const(rt.TYPE_VALUES[q])  # type: ignore[attr-defined]
                return TYPE
            # dotted declaration names, e.g. declarations={"request.model": STRING}
            declared = self.resolve(q, root.root)
            if declared is not None and self.resolve(q.split(".")[0], root.root) is None:
                t = self.global_ref(n, declared, self.decls[declared])  # type: ignore[index]
                n.py_ident = n.py  # type: ignore[attr-defined]
                self._set(n, False, 1)
                return t
            if self.dynamic:
                # `a.b.c` may name a variable `a.b.c`, or field c of a variable `a.b`, ...:
                # the longest name the activation has wins (cel-spec's qualified resolution).
                parts = q.split(".")
                n.candidates = tuple(  # type: ignore[attr-defined]
                    (p + ".".join(parts[:i]), tuple(parts[i:]))
                    for p in ([""] if root.root else self.prefixes) for i in range(len(parts), 0, -1))
                self._set(n, True, 1 + len(parts))
                self.paths[id(n)] = q
                return DYN
        ot = self.check(n.operand)
        if id(n.operand) in self.paths:
            self.paths[id(n)] = self.paths.pop(id(n.operand)) + "." + n.field
            self.path_nodes[id(n)] = n
        err = n.operand.can_error or ot.nullable
        cost = n.operand.cost + 1
        field_end = n.offset + len(n.field)
        if n.test_only:
            self._set(n, err, cost)
            if isinstance(ot, ObjectType):
                if n.field not in ot.fields:
                    return self.error(n.offset, f"type '{ot.name}' has no field '{n.field}'", "no-such-field",
                                      _suggest(n.field, ot.fields), field_end)
                return BOOL
            if ot.kind == "map":
                if not (ot.key.kind in ("string", "dyn")):  # type: ignore[attr-defined]
                    return self.error(n.offset, f"has() on a map with {_tname(ot.key)} keys", "no-overload", end=field_end)  # type: ignore[attr-defined]
                return BOOL
            if ot.kind in ("dyn", "optional_type"):
                n.can_error = True
                return BOOL
            return self.error(n.offset, f"type '{_tname(ot)}' does not support field selection", "no-such-field", end=field_end)
        if isinstance(ot, OptionalType):  # selection through an optional: an optional
            self._set(n, True, cost)
            return OptionalType(ext.selected_type(ot.elem, n.field))
        if isinstance(ot, ObjectType):
            f = ot.fields.get(n.field)
            if f is None:
                self._set(n, True, cost)
                return self.error(n.offset, f"type '{ot.name}' has no field '{n.field}'", "no-such-field",
                                  _suggest(n.field, ot.fields), field_end)
            self._set(n, err or f.optional, cost)
            return f.type
        if ot.kind == "map":
            assert isinstance(ot, MapType)
            self._set(n, True, cost)
            if ot.key.kind not in ("string", "dyn"):
                return self.error(n.offset, f"cannot select field '{n.field}' from a map with {_tname(ot.key)} keys", "no-overload", end=field_end)
            return ot.value
        if ot.kind == "dyn":
            self._set(n, True, cost)
            return DYN
        self._set(n, True, cost)
        return self.error(n.offset, f"type '{_tname(ot)}' does not support field selection", "no-such-field", end=field_end)

    def c_OptSelect(self, n: OptSelect) -> CelType:
        ot = self.check(n.operand)
        self._set(n, True, n.operand.cost + 1)
        inner = ot.elem if isinstance(ot, OptionalType) else ot  # type: ignore[attr-defined]
        if inner.kind not in ("map", "object", "dyn"):
            return self.error(n.offset, f"type '{_tname(ot)}' does not support field selection", "no-such-field",
                              end=n.offset + len(n.field))
        return OptionalType(ext.selected_type(inner, n.field))

    def c_Bind(self, n: Bind) -> CelType:
        it = self.check(n.init)
        n.py_var = self.fresh("_b")  # type: ignore[attr-defined]
        self.scopes.append({n.var: (it, n.py_var)})  # type: ignore[attr-defined]
        try:
            bt = self.check(n.body)
        finally:
            self.scopes.pop()
        self._set(n, n.init.can_error or n.body.can_error, n.init.cost + n.body.cost + 1, n.body.msize)
        return bt

    def c_OptMap(self, n: OptMap) -> CelType:
        ot = self.check(n.target)
        if ot.kind not in ("optional_type", "dyn"):
            self.error(n.offset, f"'{n.macro}' applies to an optional, not {_tname(ot)}", "no-overload",
                       end=n.offset + len(n.macro))
        n.py_var = self.fresh("_o")  # type: ignore[attr-defined]
        self.scopes.append({n.var: (ot.elem if isinstance(ot, OptionalType) else DYN, n.py_var)})  # type: ignore[attr-defined]
        try:
            bt = self.lazily(n.body)
        finally:
            self.scopes.pop()
        self._set(n, True, n.target.cost + n.body.cost + 1)
        if n.macro == "optMap":
            return OptionalType(bt)
        if bt.kind not in ("optional_type", "dyn"):
            self.error(n.body.start, f"the expression of 'optFlatMap' must be an optional, got {_tname(bt)}", "no-overload",
                       end=n.body.end)
        return bt if bt.kind == "optional_type" else OptionalType(DYN)

    def c_Index(self, n: Index) -> CelType:  # pragma: no cover - indexes are Call("_[_]")
        raise AssertionError

    def c_Cond(self, n: Cond) -> CelType:
        ct = self.check(n.cond)
        a = self.lazily(n.then)
        b = self.lazily(n.other)
        if not (ct.kind in ("bool", "dyn")):
            self.error(n.offset, f"the condition of ?: must be bool, got {_tname(ct)}", "no-overload")
        self._set(n, n.cond.can_error or not exact(ct) or n.then.can_error or n.other.can_error,
                  n.cond.cost + max(n.then.cost, n.other.cost) + 1, _maxsize(n.then.msize, n.other.msize))
        return unify(a, b)

    def c_ListLit(self, n: ListLit) -> CelType:
        elem: CelType | None = None
        for i, it in enumerate(n.items):
            t = self.check(it)
            if i in n.optional:  # `?x`: x is an optional; its value (if any) is the element
                if t.kind not in ("optional_type", "dyn"):
                    self.error(it.start, f"an optional element must be an optional, got {_tname(t)}", "no-overload", end=it.end)
                t = t.elem if isinstance(t, OptionalType) else DYN
                it.can_error = True
            elem = t if elem is None else unify(elem, t)
        self._set(n, any(i.can_error for i in n.items), 1 + sum(i.cost for i in n.items), len(n.items))
        return ListType(elem or DYN, len(n.items))

    def c_MapLit(self, n: MapLit) -> CelType:
        kt: CelType | None = None
        vt: CelType | None = None
        seen: dict[Any, int] = {}
        dyn_keys = False
        for idx, (k, v) in enumerate(n.entries):
            a = self.check(k)
            b = self.check(v)
            if idx in n.optional:  # `?key: value`: value is an optional
                if b.kind not in ("optional_type", "dyn"):
                    self.error(v.start, f"an optional entry's value must be an optional, got {_tname(b)}", "no-overload", end=v.end)
                b = b.elem if isinstance(b, OptionalType) else DYN
                dyn_keys = True
            if a.kind not in ("int", "uint", "string", "bool", "dyn"):
                self.error(k.offset, f"unsupported map key type {_tname(a)}", "no-overload", end=k.end)
            if isinstance(k, Lit) and k.kind in ("string", "int", "uint", "bool"):
                key = (k.kind == "bool", k.value)
                if key in seen:
                    self.error(k.offset, f"duplicate map key {k.value!r}", "duplicate-key", end=k.end)
                elif (not key[0], k.value) in seen and k.kind != "string":
                    this, other = (str(k.value).lower(), int(k.value)) if key[0] else (k.value, str(bool(k.value)).lower())
                    self.error(k.offset, f"map keys {other} and {this} cannot be in one map here (bool and numeric "
                               "keys 0/1 collide in the Python mapping)", "duplicate-key", end=k.end)
                seen[key] = 1
            else:
                dyn_keys = True
            kt = a if kt is None else unify(kt, a)
            vt = b if vt is None else unify(vt, b)
        n.dyn_keys = dyn_keys or any(isinstance(k, Lit) and k.kind != "string" for k, _ in n.entries)
        self._set(n, any(k.can_error or v.can_error for k, v in n.entries) or n.dyn_keys,
                  1 + sum(k.cost + v.cost for k, v in n.entries), len(n.entries))
        return MapType(kt or DYN, vt or DYN, len(n.entries))

    def c_ObjLit(self, n: ObjLit) -> CelType:
        for _, _, v in n.fields:
            self.check(v)
        self._set(n, True, 1)
        return self.error(n.offset, f"message construction '{n.type_name}{{...}}' is not supported", "unsupported")

    def c_Comprehension(self, n: Comprehension) -> CelType:
        rtype = self.check(n.range)
        v2t = DYN
        if rtype.kind == "list":
            vt = rtype.elem  # type: ignore[attr-defined]
            if n.var2 is not None:
                vt, v2t = INT, rtype.elem  # type: ignore[attr-defined]
        elif rtype.kind == "map":
            vt = rtype.key  # type: ignore[attr-defined]
            v2t = rtype.value  # type: ignore[attr-defined]
        elif rtype.kind == "dyn":
            vt = DYN
        else:
            vt = DYN
            self.error(n.range.start, f"'{n.macro}' cannot iterate over {_tname(rtype)}", "no-overload", end=n.range.end)
        n.py_var = self.fresh("_c")
        scope = {n.var: (vt, n.py_var)}
        if n.var2 is not None:
            n.py_var2 = self.fresh("_c")  # type: ignore[attr-defined]
            scope[n.var2] = (v2t, n.py_var2)  # type: ignore[attr-defined]
        self.scopes.append(scope)
        try:
            bt = self.lazily(n.body)
            ft = self.lazily(n.filter) if n.filter is not None else None
        finally:
            self.scopes.pop()
        self.uses_iter = True
        if n.macro in ("all", "exists", "exists_one", "filter") and bt.kind not in ("bool", "dyn"):
            self.error(n.body.start, f"the predicate of '{n.macro}' must be bool, got {_tname(bt)}", "no-overload", end=n.body.end)
        if ft is not None and ft.kind not in ("bool", "dyn"):
            self.error(n.filter.start, f"the filter of '{n.macro}' must be bool, got {_tname(ft)}", "no-overload", end=n.filter.end)  # type: ignore[union-attr]
        size = n.range.msize
        iters = size if size is not None else DEFAULT_LIST_SIZE
        body_cost = n.body.cost + (n.filter.cost if n.filter is not None else 0) + 1
        self._set(n, True, n.range.cost + 1 + iters * body_cost, size)
        if n.macro in ("all", "exists", "exists_one"):
            return BOOL
        if n.macro in ("map", "transformList"):
            return ListType(bt, size)
        if n.macro == "transformMap":
            return MapType(vt, bt, size)
        if n.macro == "transformMapEntry":
            if bt.kind not in ("map", "dyn"):
                self.error(n.body.start, f"the expression of 'transformMapEntry' must be a map, got {_tname(bt)}", "no-overload", end=n.body.end)
            return bt if bt.kind == "map" else MapType(DYN, DYN)
        if n.macro == "sortBy":
            if rtype.kind not in ("list", "dyn"):
                self.error(n.range.start, f"'sortBy' sorts a list, not {_tname(rtype)}", "no-overload", end=n.range.end)
            n.cost += iters * max(1, math.ceil(math.log2(max(iters, 2))))
            return rtype if rtype.kind == "list" else ListType(DYN)
        return ListType(vt, size)

    # -- calls -----------------------------------------------------------
    def c_Call(self, n: Call) -> CelType:
        if n.target is not None:  # math.greatest(...), optional.of(...): a namespaced function
            q = self._qualified(n.target)
            root = self._root(n.target)
            if q is not None and f"{q}.{n.function}" in ext.FUNCTIONS and root is not None and \
                    (self.decls is None or self.resolve(root.name, root.root) is None):
                n.function = f"{q}.{n.function}"
                n.offset = n.target.start if n.target.start >= 0 else n.target.offset
                n.target = None
        fn = n.function
        if fn in ("_&&_", "_||_"):
            return self.c_logic(n)
        if fn == "@in":
            return self.c_in(n)
        if n.target is not None:
            self.check(n.target)
        for a in n.args:
            self.check(a)
        args = ([n.target] if n.target is not None else []) + n.args
        base_err = any(a.can_error for a in args)
        base_cost = 1 + sum(a.cost for a in args)
        self._set(n, base_err, base_cost)
        if fn.startswith("_") or fn in ("!_", "-_"):
            return self.c_operator(n, args)
        return self.c_function(n, args)

    def c_logic(self, n: Call) -> CelType:
        a, b = n.args
        ta, tb = self.lazily(a), self.lazily(b)
        for x, t in ((a, ta), (b, tb)):
            if t.kind not in ("bool", "dyn") and not self.dynamic:  # dynamic: checked at run time
                self.error(n.offset, f"no matching overload for '{n.function.strip('_')}' applied to ({_tname(ta)}, {_tname(tb)})", "no-overload", end=n.offset + 2)
                break
        err = a.can_error or b.can_error or any(not exact(t) or t.kind != "bool" for t in (ta, tb))
        self._set(n, err, a.cost + b.cost + 1)
        return BOOL

    def c_in(self, n: Call) -> CelType:
        x, c = n.args
        tx, tc = self.check(x), self.check(c)
        err = x.can_error or c.can_error or not exact(tc)
        size = c.msize if c.msize is not None else DEFAULT_LIST_SIZE
        self._set(n, err, x.cost + c.cost + 1 + (size if tc.kind == "list" else 0))
        if tc.kind == "list":
            et = tc.elem  # type: ignore[attr-defined]
        elif tc.kind == "map":
            et = tc.key  # type: ignore[attr-defined]
        elif tc.kind == "dyn":
            return BOOL
        else:
            return self.error(n.offset, f"no matching overload for 'in' applied to ({_tname(tx)}, {_tname(tc)})", "no-overload", end=n.offset + 2)
        if not (assignable(et, tx) or assignable(tx, et) or (et.kind in NUMERIC and tx.kind in NUMERIC)):
            return self.error(n.offset, f"no matching overload for 'in' applied to ({_tname(tx)}, {_tname(tc)})", "no-overload", end=n.offset + 2)
        return BOOL

    _ARITH = {"_+_": "+", "_-_": "-", "_*_": "*", "_/_": "/", "_%_": "%"}
    _CMP = {"_<_": "<", "_<=_": "<=", "_>_": ">", "_>=_": ">="}

    def c_operator(self, n: Call, args: list[Node]) -> CelType:
        fn = n.function
        types = [a.type for a in args]
        op_sym = {"!_": "!", "-_": "-", "_[_]": "[]", "_[?_]": "[?]", "_==_": "==", "_!=_": "!="}.get(fn) or \
            self._ARITH.get(fn) or self._CMP.get(fn, fn)
        opw = len(op_sym) if op_sym not in ("[]", "[?]") else 1

        def bad() -> CelType:
            sig = ", ".join(_tname(t) for t in types)
            return self.error(n.offset, f"no matching overload for '{op_sym}' applied to ({sig})", "no-overload", end=n.offset + opw)

        anydyn = any(t.kind == "dyn" for t in types)
        nullable = any(t.nullable for t in types)
        if nullable:
            n.can_error = True
        if fn == "!_":
            if types[0].kind not in ("bool", "dyn"):
                return bad()
            n.can_error |= not exact(types[0])
            return BOOL
        if fn == "-_":
            t = types[0]
            if t.kind == "dyn":
                n.can_error = True
                return DYN
            if t.kind == "int":
                n.can_error = True
                return INT
            if t.kind == "double":
                return DOUBLE
            if t.kind == "google.protobuf.Duration":
                n.can_error = True
                return DURATION
            return bad()
        if fn in ("_==_", "_!=_"):
            a, b = args
            n.cost += _str_cost(a, b) if "string" in (types[0].kind, types[1].kind) else 0
            return BOOL
        if fn in self._CMP:
            ta, tb = types
            if anydyn:
                n.can_error = True
                return BOOL
            if ta.kind == tb.kind and ta.kind in ORDERED or (ta.kind in NUMERIC and tb.kind in NUMERIC):
                if ta.kind == "string":
                    n.cost += _str_cost(*args)
                return BOOL
            return bad()
        if fn in ("_[_]", "_[?_]"):
            c, i = args
            tc, ti = types
            n.can_error = True
            if fn == "_[?_]" or isinstance(tc, OptionalType):
                inner = tc.elem if isinstance(tc, OptionalType) else tc  # type: ignore[attr-defined]
                if inner.kind == "list" and ti.kind in ("int", "uint", "double", "dyn"):
                    return OptionalType(inner.elem)  # type: ignore[attr-defined]
                if inner.kind == "map":
                    return OptionalType(inner.value)  # type: ignore[attr-defined]
                if inner.kind == "dyn":
                    return OptionalType(DYN)
                return bad()
            if tc.kind == "list":
                if ti.kind not in ("int", "uint", "dyn"):
                    return bad()
                return tc.elem  # type: ignore[attr-defined]
            if tc.kind == "map":
                if not (assignable(tc.key, ti) or (tc.key.kind in NUMERIC and ti.kind in NUMERIC)):  # type: ignore[attr-defined]
                    return bad()
                return tc.value  # type: ignore[attr-defined]
            if tc.kind == "dyn":
                return DYN
            return bad()
        # arithmetic
        ta, tb = types
        ka, kb = ta.kind, tb.kind
        if anydyn:
            n.can_error = True
            return DYN
        if fn == "_+_":
            if ka == kb and ka in ("int", "uint", "double", "string", "bytes", "list", "google.protobuf.Duration"):
                if ka in ("int", "uint", "google.protobuf.Duration"):
                    n.can_error = True
                if ka in ("string", "bytes", "list"):
                    n.msize = _addsize(args[0].msize, args[1].msize)
                    n.cost += _str_cost(*args) if ka != "list" else 0
                if ka == "list":
                    return ListType(unify(ta.elem, tb.elem), n.msize)  # type: ignore[attr-defined]
                return CelType(ka, n.msize if ka in ("string", "bytes") else None)
            if {ka, kb} == {"google.protobuf.Timestamp", "google.protobuf.Duration"}:
                n.can_error = True
                return TIMESTAMP
            return bad()
        if fn == "_-_":
            if ka == kb and ka in ("int", "uint", "double", "google.protobuf.Duration", "google.protobuf.Timestamp"):
                n.can_error |= ka != "double"
                return DURATION if ka == "google.protobuf.Timestamp" else CelType(ka)
            if ka == "google.protobuf.Timestamp" and kb == "google.protobuf.Duration":
                n.can_error = True
                return TIMESTAMP
            return bad()
        if fn in ("_*_", "_/_"):
            if ka == kb and ka in NUMERIC:
                n.can_error |= ka != "double"
                return CelType(ka)
            return bad()
        if fn == "_%_":
            if ka == kb and ka in ("int", "uint"):
                n.can_error = True
                return CelType(ka)
            return bad()
        return bad()  # pragma: no cover

    def c_function(self, n: Call, args: list[Node]) -> CelType:
        fn = n.function
        is_method = n.target is not None
        types = [a.type for a in args]
        end = n.offset + len(fn)

        def bad() -> CelType:
            sig = ", ".join(_tname(t) for t in types)
            shape = f"{_tname(types[0])}.{fn}({', '.join(_tname(t) for t in types[1:])})" if is_method else f"{fn}({sig})"
            return self.error(n.offset, f"no matching overload for {shape}", "no-overload", end=end)

        anydyn = any(t.kind == "dyn" or t.nullable for t in types)
        if anydyn:
            n.can_error = True
        if fn == "size":
            if len(args) != 1:
                return bad()
            if types[0].kind not in ("string", "bytes", "list", "map", "dyn"):
                return bad()
            return INT
        if fn in STRING_METHODS:
            if fn == "matches" and not is_method and len(args) == 2:
                is_method = True  # matches(s, re) global form
            if not is_method or len(args) != 2 or any(t.kind not in ("string", "dyn") for t in types):
                return bad()
            if fn == "matches":
                pat = args[1]
                if isinstance(pat, Lit) and pat.kind == "string":
                    problem = rt.regex_problem(pat.value)
                    if problem:
                        self.error(pat.offset, problem, "bad-regex", end=pat.end)
                    n.cost += math.ceil(_size(args[0].msize, DEFAULT_STRING_SIZE) * STRING_COST_FACTOR * 1 + len(pat.value) * STRING_COST_FACTOR)
                else:
                    n.can_error = True
                    n.cost += math.ceil(_size(args[0].msize, DEFAULT_STRING_SIZE) * _size(args[1].msize, DEFAULT_STRING_SIZE) * STRING_COST_FACTOR)
            elif fn == "contains":
                n.cost += math.ceil(_size(args[0].msize, DEFAULT_STRING_SIZE) * STRING_COST_FACTOR)
            else:
                n.cost += _str_cost(*args)
            return BOOL
        if fn in TIME_FUNCS:
            if not is_method or len(args) not in (1, 2):
                return bad()
            k = types[0].kind
            if k == "google.protobuf.Duration":
                if fn not in DURATION_FUNCS or len(args) != 1:
                    return bad()
                return INT
            if k not in ("google.protobuf.Timestamp", "dyn"):
                return bad()
            if len(args) == 2:
                if types[1].kind not in ("string", "dyn"):
                    return bad()
                tz = args[1]
                if isinstance(tz, Lit):
                    try:
                        rt.tzinfo(tz.value)
                    except CelEvaluationError as e:
                        self.error(tz.offset, str(e), "bad-timezone", end=tz.end)
                else:
                    n.can_error = True
            return INT
        if fn in CONVERSIONS:
            if is_method or len(args) != 1:
                return bad()
            k = types[0].kind
            allowed = {
                "int": {"int", "uint", "double", "string", "google.protobuf.Timestamp"},
                "uint": {"int", "uint", "double", "string"},
                "double": {"int", "uint", "double", "string"},
                "string": {"int", "uint", "double", "string", "bytes", "bool", "google.protobuf.Timestamp", "google.protobuf.Duration",
                           "net.IP", "net.CIDR"},
                "bool": {"bool", "string"},
                "bytes": {"bytes", "string"},
                "duration": {"string", "google.protobuf.Duration"},
                "timestamp": {"string", "int", "google.protobuf.Timestamp"},
            }.get(fn)
            result = {"int": INT, "uint": UINT, "double": DOUBLE, "string": STRING, "bool": BOOL, "bytes": BYTES,
                      "duration": DURATION, "timestamp": TIMESTAMP, "dyn": DYN, "type": TYPE}[fn]
            if allowed is not None and k != "dyn" and k not in allowed:
                return bad()
            if fn in ("dyn", "type"):
                n.can_error = args[0].can_error or fn == "type" and not exact(types[0])
                return result
            # conversions that can fail
            same = k == result.kind
            lossless = same or (fn == "double" and k in ("int", "uint")) or (fn == "string" and k in ("int", "uint", "bool", "double", "google.protobuf.Timestamp", "google.protobuf.Duration")) \
                or (fn == "bytes" and k == "string") or (fn == "int" and k == "google.protobuf.Timestamp")
            if not lossless or anydyn:
                n.can_error = True
            arg = args[0]
            if fn in ("timestamp", "duration") and isinstance(arg, Lit) and arg.kind == "string":
                try:
                    n.folded = rt.to_timestamp(arg.value) if fn == "timestamp" else rt.to_duration(arg.value)
                    n.can_error = False
                except CelEvaluationError as e:
                    self.error(arg.offset, str(e), "bad-literal", end=arg.end)
            if fn == "string" and k == "string":
                n.msize = arg.msize
            return result
        lib = ext.FUNCTIONS.get(fn)
        if lib is not None:
            result = ext.check_call(lib, is_method, types)
            if result is None:
                return bad()
            n.can_error = n.can_error or lib.can_error
            n.cost += _ext_cost(lib.cost, args)
            return result
        # unknown function
        if self.decls is not None and fn in self.decls and not is_method:
            return self.error(n.offset, f"'{fn}' is a variable, not a function", "undeclared-function", end=end)
        return self.error(n.offset, f"undeclared function '{fn}'", "undeclared-function", _suggest(fn, KNOWN_FUNCTIONS), end)

    # ------------------------------------------------------------ codegen
    def gen(self, n: Node) -> str:
        deferred = getattr(n, "deferred", None)
        if deferred is not None:
            return f"_fail({deferred!r})"
        candidates = getattr(n, "candidates", None)
        if candidates is not None:
            return f"_resolve(act, {candidates!r})"
        return getattr(self, "g_" + type(n).__name__)(n)

    def g_Invalid(self, n: Invalid) -> str:  # pragma: no cover - reported by the parser
        return "_fail('invalid macro')"

    def may_fail(self, n: Node) -> bool:
        """Can evaluating ``n`` raise? In the lazy variant, a variable read can (it may be absent)."""
        return n.can_error or (self.lazy_mode and getattr(n, "lazy_reads", False))

    def ref(self, n: Node) -> str:
        name = getattr(n, "gname", None)
        if self.lazy_mode and name is not None and name not in self.strict_globals:
            return f"_var(act, {name!r})"
        return n.py  # type: ignore[attr-defined,no-any-return]

    def g_Lit(self, n: Lit) -> str:
        v = n.value
        if n.kind == "uint":
            return self.const(rt.CelUint(v))
        if n.kind == "double":
            if v != v or v in (math.inf, -math.inf):
                return self.const(v)
            return repr(v)
        return repr(v)

    def g_Ident(self, n: Ident) -> str:
        return self.ref(n)

    def g_Select(self, n: Select) -> str:
        if hasattr(n, "py_const"):
            return n.py_const  # type: ignore[attr-defined,no-any-return]
        if hasattr(n, "py_ident"):
            return self.ref(n)
        o = self.gen(n.operand)
        ot = n.operand.type
        f = repr(n.field)
        if n.test_only:
            if exact(ot) and ot.kind in ("object", "map"):
                return f"({f} in {o})"
            return f"_has({o}, {f})"
        if exact(ot) and ot.kind in ("object", "map"):
            return f"{o}[{f}]"
        return f"_select({o}, {f})"

    def g_Cond(self, n: Cond) -> str:
        c = self.gen(n.cond)
        if not exact(n.cond.type):
            c = f"_as_bool({c})"
        return f"({self.gen(n.then)} if {c} else {self.gen(n.other)})"

    def g_ListLit(self, n: ListLit) -> str:
        return "[" + ", ".join(f"*_opt_items({self.gen(x)})" if i in n.optional else self.gen(x)
                               for i, x in enumerate(n.items)) + "]"

    def g_OptSelect(self, n: OptSelect) -> str:
        return f"_opt_select({self.gen(n.operand)}, {n.field!r})"

    def g_Bind(self, n: Bind) -> str:
        return f"_bind({self.gen(n.init)}, lambda {n.py_var}: {self.gen(n.body)})"  # type: ignore[attr-defined]

    def g_OptMap(self, n: OptMap) -> str:
        helper = "_opt_map" if n.macro == "optMap" else "_opt_flat_map"
        return f"{helper}({self.gen(n.target)}, lambda {n.py_var}: {self.gen(n.body)})"  # type: ignore[attr-defined]

    def g_MapLit(self, n: MapLit) -> str:
        if n.optional:
            return "_make_map_opt((" + "".join(f"({self.gen(k)}, {self.gen(v)}, {i in n.optional}), "
                                               for i, (k, v) in enumerate(n.entries)) + "))"
        if not n.dyn_keys:  # type: ignore[attr-defined]
            return "{" + ", ".join(f"{self.gen(k)}: {self.gen(v)}" for k, v in n.entries) + "}"
        return "_make_map((" + "".join(f"({self.gen(k)}, {self.gen(v)}), " for k, v in n.entries) + "))"

    def g_ObjLit(self, n: ObjLit) -> str:  # pragma: no cover - rejected by the checker
        return "_fail('unsupported')"

    def g_Comprehension(self, n: Comprehension) -> str:
        r = f"_iter_range(_n, {self.max_iterations}, {self.gen(n.range)})"
        v = n.py_var  # type: ignore[attr-defined]
        if n.var2 is not None:  # two variables: iterate (index, value) or (key, value) pairs
            r = f"_pairs(_n, {self.max_iterations}, {self.gen(n.range)})"
            v = f"{v}, {n.py_var2}"  # type: ignore[attr-defined]
        body = self.gen(n.body)
        safe_bool = not self.may_fail(n.body) and exact(n.body.type)
        if n.macro in ("exists", "all"):
            if safe_bool:
                fn = "any" if n.macro == "exists" else "all"
                return f"{fn}({body} for {v} in {r})"
            helper = "_exists" if n.macro == "exists" else "_all_"
            star = ", True" if n.var2 is not None else ""
            return f"{helper}({r}, lambda {v}: {body}{star})"
        if n.macro == "sortBy":
            return f"_sort_by({self.gen(n.range)}, lambda {v}: {body})"
        if n.macro in ("transformList", "transformMap", "transformMapEntry"):
            flt = ""
            if n.filter is not None:
                f = self.gen(n.filter)
                flt = f" if {f if exact(n.filter.type) else f'_as_bool({f}, {n.macro!r})'}"
            if n.macro == "transformList":
                return f"[{body} for {v} in {r}{flt}]"
            if n.macro == "transformMap":
                return f"{{{n.py_var}: {body} for {v} in {r}{flt}}}"  # type: ignore[attr-defined]
            return f"_merge_entries([{body} for {v} in {r}{flt}])"
        if n.macro == "exists_one":
            if not exact(n.body.type):
                body = f"_as_bool({body}, 'exists_one')"
            return f"(sum(1 for {v} in {r} if {body}) == 1)"
        if n.macro == "filter":
            if not exact(n.body.type):
                body = f"_as_bool({body}, 'filter')"
            return f"[{v} for {v} in {r} if {body}]"
        # map
        if n.filter is not None:
            flt = self.gen(n.filter)
            if not exact(n.filter.type):
                flt = f"_as_bool({flt}, 'map')"
            return f"[{body} for {v} in {r} if {flt}]"
        return f"[{body} for {v} in {r}]"

    def g_Call(self, n: Call) -> str:
        fn = n.function
        if fn in ("_&&_", "_||_"):
            return self.g_logic(n)
        args = ([n.target] if n.target is not None else []) + n.args
        if fn.startswith("_") or fn in ("!_", "-_", "@in"):
            return self.g_operator(n, args)
        return self.g_function(n, args)

    def g_logic(self, n: Call) -> str:
        a, b = n.args
        pa, pb = self.gen(a), self.gen(b)
        py = "and" if n.function == "_&&_" else "or"
        a_ok = not self.may_fail(a) and exact(a.type) and a.type.kind == "bool"
        b_ok = exact(b.type) and b.type.kind == "bool"  # (dynamic mode lets other types through to here)
        if a_ok and b_ok:
            return f"({pa} {py} {pb})"
        if a_ok:
            return f"({pa} {py} _as_bool({pb}, {n.function!r}))"
        helper = "_and_" if py == "and" else "_or_"
        return f"{helper}(lambda: {pa}, lambda: {pb})"

    def g_operator(self, n: Call, args: list[Node]) -> str:
        fn = n.function
        p = [self.gen(a) for a in args]
        t = [a.type for a in args]
        allx = all(exact(x) for x in t)
        if fn == "!_":
            return f"(not {p[0]})" if allx else f"_not_({p[0]})"
        if fn == "-_":
            if not allx:
                return f"_neg({p[0]})"
            k = t[0].kind
            if k == "int":
                return f"_ck(-{p[0]})"
            if k == "google.protobuf.Duration":
                return f"_dur_check(-{p[0]})"
            return f"(-{p[0]})"
        if fn in ("_==_", "_!=_"):
            a, b = args
            neg = fn == "_!=_"
            if t[0].kind == "null_type" or t[1].kind == "null_type":
                i = 1 if t[0].kind == "null_type" else 0
                inner = _strip_dyn(args[i])
                if isinstance(inner, Lit):  # `1 is None` would be a SyntaxWarning: fold it
                    return repr((inner.value is None) != neg)
                return f"({p[i]} is {'not ' if neg else ''}None)"
            if _pyeq_safe(t[0], t[1]):
                return f"({p[0]} {'!=' if neg else '=='} {p[1]})"
            return f"_{'ne' if neg else 'eq'}({p[0]}, {p[1]})"
        if fn in self._CMP:
            if allx:
                if (t[0].kind == "double") != (t[1].kind == "double"):  # int vs double: compared as doubles
                    p = [x if k.kind == "double" else repr(float(a.value)) if isinstance(a, Lit) else f"float({x})"
                         for x, k, a in zip(p, t, args)]
                return f"({p[0]} {self._CMP[fn]} {p[1]})"
            return f"_{ {'_<_': 'lt', '_<=_': 'le', '_>_': 'gt', '_>=_': 'ge'}[fn] }({p[0]}, {p[1]})"
        if fn == "@in":
            tx, tc = t
            if exact(tc) and tc.kind == "map" and exact(tx) and tx.kind == "string":
                return f"({p[0]} in {p[1]})"
            if exact(tc) and tc.kind == "list" and exact(tx) and _pyeq_safe(tx, tc.elem) and tx.kind != "double":  # type: ignore[attr-defined]
                return f"({p[0]} in {p[1]})"
            if exact(tc) and tc.kind == "list":
                return f"_in_list({p[0]}, {p[1]})"
            return f"_in_({p[0]}, {p[1]})"
        if fn == "_[?_]":
            return f"_opt_index({p[0]}, {p[1]})"
        if fn == "_[_]":
            tc, ti = t
            if exact(tc) and tc.kind == "map" and exact(ti) and ti.kind == "string":
                return f"{p[0]}[{p[1]}]"
            if exact(tc) and tc.kind == "list":
                return f"_list_index({p[0]}, {p[1]})"
            return f"_index({p[0]}, {p[1]})"
        # arithmetic
        if not allx:
            return f"_{ {'_+_': 'add', '_-_': 'sub', '_*_': 'mul', '_/_': 'div', '_%_': 'mod'}[fn] }({p[0]}, {p[1]})"
        ka, kb = t[0].kind, t[1].kind
        sym = self._ARITH[fn]
        if ka == "int":
            if fn == "_/_":
                return f"_idiv({p[0]}, {p[1]})"
            if fn == "_%_":
                return f"_imod({p[0]}, {p[1]})"
            return f"_ck({p[0]} {sym} {p[1]})"
        if ka == "uint":
            if fn == "_/_":
                return f"_udiv({p[0]}, {p[1]})"
            if fn == "_%_":
                return f"_umod({p[0]}, {p[1]})"
            return f"_cku({p[0]} {sym} {p[1]})"
        if ka == "double":
            if fn == "_/_":
                return f"_fdiv({p[0]}, {p[1]})"
            return f"({p[0]} {sym} {p[1]})"
        if ka in ("string", "bytes"):
            return f"({p[0]} + {p[1]})"
        if ka == "list":
            return f"[*{p[0]}, *{p[1]}]"
        if ka == "google.protobuf.Timestamp":
            if kb == "google.protobuf.Duration":
                return f"_ts_{'add' if fn == '_+_' else 'sub'}({p[0]}, {p[1]})"
            return f"_ts_diff({p[0]}, {p[1]})"
        if ka == "google.protobuf.Duration":
            if kb == "google.protobuf.Timestamp":
                return f"_ts_add({p[1]}, {p[0]})"
            return f"_dur_{'add' if fn == '_+_' else 'sub'}({p[0]}, {p[1]})"
        return f"_{ {'_+_': 'add', '_-_': 'sub', '_*_': 'mul', '_/_': 'div', '_%_': 'mod'}[fn] }({p[0]}, {p[1]})"  # pragma: no cover

    def g_function(self, n: Call, args: list[Node]) -> str:
        fn = n.function
        t = [a.type for a in args]
        allx = all(exact(x) for x in t)
        if hasattr(n, "folded"):
            return self.const(n.folded)  # type: ignore[attr-defined]
        p = [self.gen(a) for a in args]
        if fn == "size":
            return f"len({p[0]})" if allx else f"_size({p[0]})"
        if fn in STRING_METHODS:
            if fn == "matches":
                pat = args[1]
                if isinstance(pat, Lit) and exact(t[0]):
                    rx = self.const_regex(pat.value)
                    return f"{rx}({p[0]})"
                return f"_matches({p[0]}, {p[1]})"
            if allx:
                if fn == "contains":
                    return f"({p[1]} in {p[0]})"
                return f"{p[0]}.{'startswith' if fn == 'startsWith' else 'endswith'}({p[1]})"
            return f"_{ {'contains': 'contains', 'startsWith': 'starts_with', 'endsWith': 'ends_with'}[fn] }({p[0]}, {p[1]})"
        if fn in TIME_FUNCS:
            if t[0].kind == "google.protobuf.Timestamp" and exact(t[0]):
                tzname = None
                if len(args) == 1:
                    tzname = "_UTC"
                elif isinstance(args[1], Lit):
                    try:
                        tzname = self.const(rt.tzinfo(args[1].value))
                    except CelEvaluationError:  # pragma: no cover - reported by the checker
                        tzname = None
                tmpl = _INLINE_TIME.get(fn)
                if tzname is not None and tmpl is not None:
                    return tmpl.format(f"{p[0]}.astimezone({tzname})")
            return f"_t_{fn}({', '.join(p)})"
        lib = ext.FUNCTIONS.get(fn)
        if lib is not None:
            return f"{self.const(lib.impl)}({', '.join(p)})"
        if fn in ("dyn",):
            return p[0]
        if fn == "type":
            return f"_type_of({p[0]})"
        k = t[0].kind
        if fn == "double" and k in ("int", "uint") and allx:
            return f"float({p[0]})"
        if fn == "string" and k == "int" and allx:
            return f"str({p[0]})"
        if fn == "int" and k == "double" and allx:
            return f"_double_to_int({p[0]})"
        if fn == k and allx and fn in ("int", "uint", "double", "string", "bool", "bytes"):
            return p[0]
        if fn == "duration" and k == "google.protobuf.Duration" and allx:
            return p[0]
        if fn == "timestamp" and k == "google.protobuf.Timestamp" and allx:
            return p[0]
        return f"_to_{fn}({p[0]})"

    def const_regex(self, pattern: str) -> str:
        name = self.fresh("_rx")
        self.consts[name] = rt.make_matcher(pattern)
        return name


_INLINE_TIME = {
    "getFullYear": "{}.year", "getMonth": "({}.month - 1)", "getDayOfMonth": "({}.day - 1)", "getDate": "{}.day",
    "getDayOfWeek": "(({}.weekday() + 1) % 7)", "getHours": "{}.hour", "getMinutes": "{}.minute",
    "getSeconds": "{}.second", "getMilliseconds": "({}.microsecond // 1000)",
    "getDayOfYear": "({}.timetuple().tm_yday - 1)",
}


def _ext_cost(kind: str, args: list[Node]) -> int:
    """Traversal cost of an extension function over its (declared-size) string or list arguments."""
    if kind == "const" or not args:
        return 0
    lists = sum(_size(getattr(a, "msize", None), DEFAULT_LIST_SIZE) for a in args
                if a.type is not None and a.type.kind == "list")
    if kind == "string":  # (list.indexOf and list.reverse share their names with string functions)
        return lists + math.ceil(sum(_size(getattr(a, "msize", None), DEFAULT_STRING_SIZE) for a in args
                                     if a.type is not None and a.type.kind in ("string", "bytes", "dyn")) * STRING_COST_FACTOR)
    n = sum(_size(getattr(a, "msize", None), DEFAULT_LIST_SIZE) for a in args
            if a.type is not None and a.type.kind in ("list", "dyn"))
    if kind == "sort":
        return n * max(1, math.ceil(math.log2(max(n, 2))))
    return n


def _strip_dyn(n: Node) -> Node:
    while isinstance(n, Call) and n.function == "dyn" and n.target is None and len(n.args) == 1:
        n = n.args[0]
    return n


def _pyeq_safe(a: CelType, b: CelType) -> bool:
    """Does Python ``==`` agree with CEL equality for values of these static types?"""
    if a.kind == "dyn" or b.kind == "dyn":
        return False
    if a.kind in NUMERIC and b.kind in NUMERIC:
        return True
    if a.kind != b.kind:
        return False
    return a.kind in ("int", "uint", "double", "string", "bytes", "bool", "google.protobuf.Timestamp",
                      "google.protobuf.Duration", "type")


def _size(s: int | None, default: int) -> int:
    return default if s is None else s


def _maxsize(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else max(a, b)


def _addsize(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


def _str_cost(*nodes: Node) -> int:
    """Cost of traversing the smaller of two strings (bounded by declared sizes)."""
    sizes = [_size(getattr(x, "msize", None), DEFAULT_STRING_SIZE) for x in nodes]
    return math.ceil(min(sizes) * STRING_COST_FACTOR)


__all__ = ["Compiler", "DEFAULT_LIST_SIZE", "DEFAULT_STRING_SIZE", "STRING_COST_FACTOR", "Field", "Nullable", "non_null"]
