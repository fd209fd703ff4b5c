"""A type-checked CEL compiler that turns CEL source into Python functions.

Usage::

    from policy_engine.cel import compile, ObjectType, INT, BOOL
    req = ObjectType("Request", {"input_tokens": INT})
    prog = compile("request.input_tokens > 1000", {"request": req}, expect=BOOL)
    prog.evaluate({"request": {"input_tokens": 5000}})   # True

Pipeline: celpy's lark grammar parses the source (with token positions) into a
small AST (:mod:`.ast`; :mod:`.lalr` is the fast path that drives lark's tables
itself and builds the AST without lark's parse tree); :mod:`.compiler` type-checks it against the
declarations, estimates its cost and generates the Python source of one
function ``_cel(act)``, which is compiled once with :func:`compile`.

``declarations=None`` selects *dynamic mode*: every identifier is ``dyn`` and
every operation is dispatched on the run-time types.

Run-time value mapping (CEL -> Python)::

    int -> int            uint -> CelUint (int subclass)   double -> float
    string -> str         bytes -> bytes                   bool -> bool
    null -> None          list -> list (tuple accepted)    map -> dict (any Mapping accepted)
    timestamp -> tz-aware datetime (UTC results)          duration -> timedelta
        (nanosecond precision: values with sub-microsecond nanoseconds are the subclasses
        runtime.NanoTimestamp / NanoDuration)             type -> CelTypeValue
    object types -> Mapping[str, object]
    optional(T) -> CelOptional      net.IP / net.CIDR -> CelIP / CelCIDR   (extension libraries, :mod:`.ext`)

Cost model (``Program.cost``): every AST node costs 1; string traversals
(``==``/``<``/``+``/``contains``/``startsWith``/``endsWith`` on strings) add
``0.1 x`` the smaller declared max string size, ``matches`` adds ``0.1 x`` size
(times the pattern size when the pattern is not a literal); ``in`` on a list
adds the list's max size; a comprehension costs
``range + max_size x (body + 1)``.  Unknown sizes default to
``DEFAULT_LIST_SIZE = 1000`` elements and ``DEFAULT_STRING_SIZE = 10_000``
characters.  Set sizes with ``ListType(t, max_size=…)``, ``MapType(k, v, max_size=…)``,
``StringType(max_size=…)`` or ``STRING.with_max(…)``.  Extension functions add their
traversal: string functions ``0.1 x`` their strings' sizes, list functions the lists' sizes,
sorting and set functions ``n log n``.
"""

from __future__ import annotations

import builtins
import math
from typing import Any, Callable, Mapping

from . import cache
from . import runtime as _rt
from .ast import MAX_EXPRESSION_CHARS, MAX_NESTING, parse_with_issues
from .cache import PROGRAMS, CacheInfo
from .compiler import DEFAULT_LIST_SIZE, DEFAULT_STRING_SIZE, STRING_COST_FACTOR, Compiler, _HELPER_NAMES, exact
from .errors import CelError, CelEvaluationError, CelIssue, CelSyntaxError, CelTypeError, line_col
from .runtime import CelCIDR, CelIP, CelOptional, CelTypeValue, CelUint
from .types import (
    BOOL, BYTES, DOUBLE, DURATION, DYN, INT, NULL, STRING, TIMESTAMP, TYPE, UINT,
    BytesType, CelType, Field, ListType, MapType, Nullable, ObjectType, OptionalType, StringType, assignable,
)

DEFAULT_MAX_ITERATIONS = 100_000

__all__ = [
    "compile", "Program", "CelType", "INT", "UINT", "DOUBLE", "STRING", "BOOL", "BYTES", "NULL", "DYN",
    "TIMESTAMP", "DURATION", "TYPE", "ListType", "MapType", "ObjectType", "Field", "Nullable", "StringType",
    "BytesType", "CelError", "CelSyntaxError", "CelTypeError", "CelEvaluationError", "CelIssue", "CelUint",
    "CelTypeValue", "CelOptional", "CelIP", "CelCIDR", "OptionalType", "DEFAULT_LIST_SIZE", "DEFAULT_STRING_SIZE",
    "DEFAULT_MAX_ITERATIONS", "STRING_COST_FACTOR", "MAX_EXPRESSION_CHARS", "MAX_NESTING", "cache_info", "CacheInfo",
]


class Program:
    """A compiled CEL expression. ``evaluate(activation)`` runs the generated function."""

    __slots__ = ("source", "result_type", "cost", "references", "evaluate", "_fn", "_fast_source", "_lazy")

    source: str
    result_type: CelType
    cost: int
    references: frozenset[str]
    evaluate: Callable[[Mapping[str, object]], object]

    def __init__(self, source: str, result_type: CelType, cost: int, references: frozenset[str],
                 python_source: str, fn: Callable[[Mapping[str, object]], object],
                 lazy: _LazyVariant | None = None) -> None:
        self.source = source
        self.result_type = result_type
        self.cost = cost
        self.references = references
        self._fast_source = python_source
        self._lazy = lazy
        self._fn = fn
        # The generated function is the evaluator: no wrapper call per evaluation.
        self.evaluate = fn

    def __call__(self, activation: Mapping[str, object]) -> object:
        return self._fn(activation)

    @property
    def python_source(self) -> str:
        """The generated Python: the function, and its lazy variant when it has one."""
        return self._fast_source + (self._lazy.source if self._lazy is not None else "")

    def __repr__(self) -> str:
        return f"Program({self.source!r}, result_type={self.result_type}, cost={self.cost})"


def _missing(name: str) -> CelEvaluationError:
    return CelEvaluationError(f"no value for variable {name!r} in the activation")


def compile(  # noqa: A001 - public API name
    source: str,
    declarations: Mapping[str, CelType] | None = None,
    *,
    expect: CelType | None = None,
    max_cost: int | None = None,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    container: str = "",
) -> Program:
    """Parse, type-check and compile ``source`` into a :class:`Program`.

    Raises :class:`CelSyntaxError` or :class:`CelTypeError` listing every issue found.
    ``max_iterations`` bounds the comprehension iterations of one evaluation. ``container``
    is cel-spec's namespace for name resolution: in container ``a.b``, ``x`` refers to the
    first of ``a.b.x``, ``a.x``, ``x`` that is declared (``.x`` always means ``x``).

    Programs are cached process-wide by source text, the structure of the declarations and
    the options, container included (see :mod:`.cache`; :func:`cache_info` counts the compilations).
    """
    options = (PROGRAMS.token(expect), max_cost, max_iterations, container)
    build = lambda: _compile(source, declarations, expect, max_cost, max_iterations, container)  # noqa: E731
    return PROGRAMS.get_or_compile(source, declarations, options, lambda: _nesting_backstop(source, build), (CelError,))  # type: ignore[no-any-return]


def cache_info() -> CacheInfo:
    """Hits and misses (= compilations) of the process-wide program cache."""
    return PROGRAMS.info()


def _nesting_backstop(source: str, build: Callable[[], Program]) -> Program:
    try:
        return build()
    except (RecursionError, SyntaxError) as exc:
        # The nesting limit keeps both out of reach; this is the backstop that keeps them
        # diagnostics (a SyntaxError here comes from CPython's parser of the generated code).
        if isinstance(exc, SyntaxError) and "nested" not in str(exc.msg):
            raise
        line, col = line_col(source, 0)
        issue = CelIssue(0, line, col, "expression is nested too deeply to compile", "nesting",
                         "split it into variables (`variables:`)")
        raise CelSyntaxError([issue], source) from None


def _recover(e: Exception, act: Mapping[str, object], names: tuple[str, ...],
             fallback: Callable[[Mapping[str, object]], object] | None) -> object:
    """The exception handler of a generated function: a variable the activation lacks goes to the
    lazy variant (`fallback`) or is reported; any other error becomes a CelEvaluationError."""
    if isinstance(e, CelEvaluationError):
        raise e
    if isinstance(e, KeyError):
        for name in names:
            if name not in act:
                if fallback is not None:
                    return fallback(act)
                raise _missing(name) from None
    raise _rt.translate(e) from None


_NAMESPACE: dict[str, Any] = {"_" + k: v for k, v in _HELPER_NAMES.items()}
_NAMESPACE.update({"_recover": _recover, "_UTC": _rt.UTC, "__builtins__": builtins})
"""What every generated function sees: built once, copied per program (a copy is a fifth of the cost)."""


def _compile(
    source: str,
    declarations: Mapping[str, CelType] | None,
    expect: CelType | None,
    max_cost: int | None,
    max_iterations: int,
    container: str = "",
) -> Program:
    node, semantic = parse_with_issues(source)
    comp = Compiler(source, declarations, max_iterations, container)
    comp.issues.extend(semantic)
    result = comp.check(node)
    start = len(source) - len(source.lstrip())
    check_result: str | None = None
    if expect is not None and expect.kind != "dyn":
        if result.kind == "dyn":
            check_result = expect.kind
        elif not assignable(expect, result) and not (result.kind == expect.kind):
            comp.error(start, f"expression has type {_tn(result)}, expected {_tn(expect)}", "result-type", end=len(source.rstrip()))
        elif result.nullable and not expect.nullable:
            check_result = expect.kind
    cost = math.ceil(getattr(node, "cost", 1))
    if max_cost is not None and cost > max_cost:
        comp.error(start, f"estimated cost {cost} exceeds the limit {max_cost}", "cost",
                   "declare max_size on lists, maps and strings to tighten the estimate", end=len(source.rstrip()))
    if comp.issues:
        issues = sorted(comp.issues, key=lambda i: i.offset)
        raise CelTypeError(issues, source)
    refs = frozenset(comp.paths.values())
    lazy = sorted(set(comp.globals) - comp.strict_globals)
    namespace = _NAMESPACE.copy()
    fast = "\n".join(_function("_cel", comp, node, check_result, comp.globals, "_cel_lazy" if lazy else None,
                               namespace)) + "\n"
    namespace.update(comp.consts)
    filename = f"<cel: {source[:60]!r}>"
    variant = _LazyVariant(comp, node, check_result, namespace, filename) if lazy else None
    if variant is not None:
        namespace["_cel_lazy"] = variant
    exec(builtins.compile(fast, filename, "exec"), namespace)  # noqa: S102 - generated from a checked AST only
    return Program(source, result, cost, refs, fast, namespace["_cel"], variant)


class _LazyVariant:
    """The lazy variant of a generated function (variables read only where they are used), for
    an activation that lacks a variable. Activations usually bind every declared name, so most
    programs never need it: its source is generated and compiled the first time it is called
    (or `python_source` is read), from the checked AST kept for that."""

    def __init__(self, comp: Compiler, node: Any, check_result: str | None, namespace: dict[str, Any],
                 filename: str) -> None:
        self._pending: tuple[Compiler, Any, str | None] | None = (comp, node, check_result)
        self.namespace = namespace
        self.filename = filename
        self._source = ""

    @property
    def source(self) -> str:
        with cache.GENERATING:  # (looked up at each use: a forked child gets a fresh one)
            if self._pending is not None:
                comp, node, check_result = self._pending
                comp.lazy_mode = True
                eager = {k: v for k, v in comp.globals.items() if k in comp.strict_globals}
                self._source = "\n".join(_function("_cel_lazy", comp, node, check_result, eager, None,
                                                   self.namespace)) + "\n"
                self.namespace.update(comp.consts)
                self._pending = None  # the compiler and its AST are no longer needed
            return self._source

    def __call__(self, act: Mapping[str, object]) -> object:
        code = builtins.compile(self.source, self.filename, "exec")
        exec(code, self.namespace)  # noqa: S102 - replaces this stub in the namespace
        return self.namespace["_cel_lazy"](act)


def _function(name: str, comp: Compiler, node: Any, check_result: str | None,
              eager: Mapping[str, str], fallback: str | None, namespace: dict[str, Any]) -> list[str]:
    """The lines of one generated function: read the `eager` variables, evaluate the body.

    Its exception handler, `_recover` with the function's variables and fallback bound, goes
    into `namespace`: the handler's line is the shorter (a tenth of CPython's compile, before)."""
    body = comp.gen(node)
    if check_result is not None:
        body = f"_check_result({body}, {check_result!r})"
    # One try statement for the variable reads and the body: CPython compiles each handler of
    # an exception table, and a second try costs a quarter of the compile. `_recover` tells a
    # missing variable (some name is absent from the activation) from an error of the body.
    lines = [f"def {name}(act):", "    try:"]
    names = tuple(sorted(eager))
    if comp.uses_iter:
        lines.append("        _n = [0]")
    lines.append(f"        return {body}")
    lines.append("    except Exception as e:")
    lines.append(f"        return _recover{name}(e, act)")
    namespace["_recover" + name] = _handler(namespace, names, fallback)
    return lines


def _handler(namespace: dict[str, Any], names: tuple[str, ...],
             fallback: str | None) -> Callable[[Exception, Mapping[str, object]], object]:
    if fallback is None:
        return lambda e, act: _recover(e, act, names, None)
    # looked up when an error happens: the lazy variant's stub replaces itself in the namespace
    return lambda e, act: _recover(e, act, names, namespace[fallback])


def _tn(t: CelType) -> str:
    return {"google.protobuf.Timestamp": "timestamp", "google.protobuf.Duration": "duration"}.get(t.kind, str(t))
