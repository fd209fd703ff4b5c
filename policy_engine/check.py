"""`policy-engine lint`: every problem a reviewer should see before a policy ships.

Loading (PE0xx) and compiling (PE1xx) find what makes a policy invalid. The
semantic analyses here (PE2xx) find policies that are valid but do not do what
their author thinks, and the test analyses (PE3xx) find what the embedded tests
leave unchecked. Every finding is a positioned `Diagnostic`.

The rule analyses reason over conditions in disjunctive normal form whose atoms
are comparisons of one field with literals (`<`, `<=`, `>`, `>=`, `==`, `!=`,
`in [...]`, `startsWith`), collected per field into intervals, allowed sets,
excluded values and prefixes. Anything else is an opaque atom, equal only to the
same text. Claims are made only when they hold for every request: a rule is
reported unreachable only when an earlier rule provably matches whenever it does
(and reads at least the fields it reads, so neither can fail to evaluate alone).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from . import cel
from .catalog import Catalog, ModelEntry, load_catalog
from .cel.ast import Call, Cond, Ident, ListLit, Lit, Node, Select, parsed
from .compile import MAX_EXPRESSION_COST, CompiledPolicy, compile_policy
from .errors import Diagnostic, PolicyError, PricingError, did_you_mean
from .load import Document, parse_policy
from .policy import PriceAs

RETIREMENT_WARNING_DAYS: Final = 30
"""PE222 warns this many days before a model's fast mode is retired (`lint --retirement-days`)."""
_RETIRED_HINT: Final = ("decide on `model.fast_available` (and `model.fast_retires_in_days`) instead, and move tests to a "
                        "current model; the engine never sends a retired model fast")
_MODEL_FEATURE_HINT: Final = ("say what the rule needs of the model: `model.fast_available`, `model.family == 'opus'`, "
                              "`model.fast_multiplier <= 2.0`, `has(model.fast_retires_in_days)`; the catalog then keeps "
                              "the policy right when models launch and retire")


__all__ = ["LintResult", "lint_any", "lint_file", "lint_test_file", "lint_paths", "policy_files", "render", "CODES", "GUARDRAILS", "exit_status"]

GUARDRAILS = ("unsupported_model", "unpriced", "batch", "priority_tier", "rate_limited")

CODES: dict[str, tuple[str, str]] = {
    "PE001": ("error", "YAML syntax error, or the file cannot be read"),
    "PE002": ("error", "duplicate mapping key"),
    "PE003": ("error", "file too large, alias bomb or nesting too deep"),
    "PE004": ("error", "file is not valid UTF-8"),
    "PE005": ("error", "file is empty"),
    "PE006": ("warning", "unquoted value that YAML 1.1 and YAML 1.2 readers type differently"),
    "PE010": ("error", "unknown key"),
    "PE011": ("error", "invalid value"),
    "PE012": ("error", "missing required key"),
    "PE020": ("error", "duplicate rule, budget or test name"),
    "PE100": ("error", "CEL syntax error"),
    "PE101": ("error", "unknown identifier, field or function in CEL"),
    "PE102": ("error", "CEL type error"),
    "PE103": ("error", "CEL expression has the wrong result type"),
    "PE104": ("error", "CEL expression cost over the limit"),
    "PE105": ("error", "CEL expression nested deeper than the limit"),
    "PE106": ("error", "CEL expression longer than the limit"),
    "PE201": ("error", "unreachable rule: an earlier rule always matches"),
    "PE202": ("error", "unreachable rule: an earlier rule matches every request this one matches"),
    "PE203": ("error", "rule can never match: its condition is contradictory"),
    "PE210": ("warning", "rule chooses fast but a guardrail always forces standard"),
    "PE220": ("error", "model not in the catalog"),
    "PE221": ("warning", "model has no price in the catalog"),
    "PE222": ("warning", "model's fast mode is retired, or retires soon"),
    "PE223": ("warning", "request.model compared with a literal where a model feature would say the same"),
    "PE224": ("error", "catalog price without its source or as_of"),
    "PE230": ("warning", "budget key can be empty or fail to evaluate"),
    "PE240": ("warning", "variable is never used"),
    "PE250": ("warning", "the policy's choice leaves billed spend unmetered or undercounted"),
    "PE251": ("error", "on_unpriced_model names a model the catalog does not price"),
    "PE290": ("warning", "policy too large for the unreachable-rule analysis: the rules after this one were not checked"),
    "PE301": ("warning", "policy has no tests"),
    "PE302": ("warning", "no test reaches this rule"),
    "PE303": ("error", "test expects a rule, guardrail or budget the policy does not have"),
    "PE304": ("error", "test case input is invalid"),
    "PE305": ("error", "test case fails: the decision is not what it expects"),
    "PE401": ("warning", "suppression comment silences nothing"),
    "PE402": ("error", "suppression comment names no code"),
}
"""Every code `lint` can report: default severity and a one-line summary (SARIF rules, README table)."""


@dataclass
class LintResult:
    file: str
    source: str | None
    diagnostics: list[Diagnostic] = field(default_factory=list)
    compiled: CompiledPolicy | None = None

    @property
    def errors(self) -> int:
        return sum(d.severity == "error" for d in self.diagnostics)

    @property
    def warnings(self) -> int:
        return sum(d.severity == "warning" for d in self.diagnostics)


def is_test_file(path: Path) -> bool:
    return path.name.endswith(("_test.yaml", "_test.yml"))


def policy_files(paths: Sequence[str], *, tests: bool = False) -> list[Path]:
    """Files named on the command line, and the YAML files under named directories.

    Directories yield policy files, or `*_test.yaml` files with `tests=True`, leaving out
    hidden files and directories; a file named explicitly is always kept. Raises FileNotFoundError for a missing path.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            # Hidden files and directories (.policy-engine.yaml, .github/, .venv/, ...) are not policies.
            found = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            files.extend(p for p in found if is_test_file(p) == tests)
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(raw)
    return files


# -- the driver -----------------------------------------------------------------------------


def lint_file(path: str | os.PathLike[str], catalog: Catalog | None = None, *, max_cost: int = MAX_EXPRESSION_COST,
              run_tests: bool = True, severities: dict[str, str] | None = None,
              retirement_days: int = RETIREMENT_WARNING_DAYS) -> LintResult:
    """Every finding for one policy file, after its inline suppressions and the `severities` overrides."""
    return _finish(_lint_policy(str(path), catalog, max_cost, run_tests, retirement_days), severities)


def _finish(result: LintResult, severities: dict[str, str] | None) -> LintResult:
    from .suppress import apply
    from .yaml11 import hazards

    if result.source is not None:
        result.diagnostics.extend(
            Diagnostic(result.file, h.line, h.col, "PE006", h.message, h.hint, "warning", end_line=h.line, end_col=h.end_col)
            for h in hazards(result.source))
    result.diagnostics = apply(result.file, result.source, result.diagnostics, severities)
    return result


def _lint_policy(name: str, catalog: Catalog | None, max_cost: int, run_tests: bool, retirement_days: int) -> LintResult:
    try:
        policy, document = parse_policy(name)
    except PolicyError as exc:
        return LintResult(name, exc.sources.get(name), list(exc.diagnostics))
    result = LintResult(name, document.source)
    try:
        compiled = compile_policy(policy, document, max_cost=max_cost)
    except PolicyError as exc:
        result.diagnostics.extend(exc.diagnostics)
        return result
    result.compiled = compiled
    catalog = catalog or load_catalog()
    analysis = _Analysis(compiled, document, catalog, retirement_days)
    result.diagnostics.extend(analysis.rules())
    result.diagnostics.extend(analysis.models())
    result.diagnostics.extend(analysis.budget_keys())
    result.diagnostics.extend(analysis.unused_variables())
    result.diagnostics.extend(analysis.unmetered_choices())
    result.diagnostics.extend(analysis.tests(run_tests))
    result.diagnostics.sort(key=lambda d: (d.line, d.col, d.code))
    return result


def lint_test_file(path: str | os.PathLike[str], catalog: Catalog | None = None, *, run_tests: bool = True,
                   severities: dict[str, str] | None = None, **_: Any) -> LintResult:
    """A `*_test.yaml` file: its schema, that the policy it names exists, and that its cases pass (PE305)."""
    return _finish(_lint_tests(str(path), catalog, run_tests), severities)


def _lint_tests(name: str, catalog: Catalog | None, run_tests: bool) -> LintResult:
    from .compile import compile_file
    from .testing.runner import load_test_file, run_case

    try:
        tests, document, target = load_test_file(name)
    except PolicyError as exc:
        return LintResult(name, exc.sources.get(name), list(exc.diagnostics))
    result = LintResult(name, document.source)
    if not os.path.isfile(target):
        where = ("policy",) if isinstance(document.data, dict) and "policy" in document.data else ()
        line, col = document.locate(where)
        result.diagnostics.append(Diagnostic(name, line, col, "PE001", f"the policy under test, {target}, does not exist",
                                             "name it with `policy:` (relative to this file)"))
        return result
    if not run_tests:
        return result
    try:
        compiled = compile_file(target)
    except PolicyError:
        return result  # the policy's own findings are reported where it is linted
    catalog = catalog or load_catalog()
    for index, case in enumerate(tests.tests):
        outcome = run_case(compiled, case, catalog, index)
        if not outcome.passed:
            result.diagnostics.append(_test_failure(document, name, index, outcome, target))
    return result


def _test_failure(document: Document, file: str, index: int, outcome: Any, target: str | None = None) -> Diagnostic:
    """PE304 for a case whose input cannot be decided, PE305 for one whose decision is not the expected one."""
    invalid = outcome.decision is None
    code = "PE304" if invalid else "PE305"
    line, col = document.locate(("tests", index, "request")) if invalid else document.locate(("tests", index, "expect"), key=True)
    against = f" against {target}" if target else ""
    what = outcome.failures[0] if invalid else "; ".join(outcome.failures[:-1])
    hint = None if invalid else outcome.failures[-1] + "; `policy-engine test` shows the diff"
    return Diagnostic(file, line, col, code, f"test '{outcome.name}' fails{against}: {what}", hint, CODES[code][0])  # type: ignore[arg-type]


def lint_any(path: Path, catalog: Catalog | None = None, **options: Any) -> LintResult:
    return lint_test_file(path, catalog, **options) if is_test_file(path) else lint_file(path, catalog, **options)


def lint_paths(paths: Sequence[str], catalog: Catalog | None = None, **options: Any) -> list[LintResult]:
    catalog = catalog or load_catalog()
    return [lint_any(p, catalog, **options) for p in policy_files(paths)]


def exit_status(results: Iterable[LintResult], strict: bool = False) -> int:
    results = list(results)
    if any(r.errors for r in results) or (strict and any(r.warnings for r in results)):
        return 1
    return 0


# -- conditions as sets of constraints ------------------------------------------------------

_OPS = {"_<_": "<", "_<=_": "<=", "_>_": ">", "_>=_": ">=", "_==_": "==", "_!=_": "!="}
_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
_MAX_CONJUNCTS = 64


def _path(node: Node) -> str | None:
    if isinstance(node, Ident) and not node.root:
        return node.name
    if isinstance(node, Select) and not node.test_only:
        left = _path(node.operand)
        return None if left is None else f"{left}.{node.field}"
    return None


def _literal(node: Node) -> tuple[bool, Any]:
    if isinstance(node, Lit) and node.kind in ("int", "uint", "double", "string", "bool"):
        return True, node.value
    return False, None


def _kind(value: Any) -> str:
    return "bool" if isinstance(value, bool) else "num" if isinstance(value, (int, float)) else "str"


@dataclass
class _Con:
    """What one conjunct says about one field."""

    kind: str | None = None
    lo: Any = None
    lo_open: bool = False
    hi: Any = None
    hi_open: bool = False
    eq: frozenset[Any] | None = None
    ne: frozenset[Any] = frozenset()
    prefixes: tuple[str, ...] = ()
    mixed: bool = False

    def add(self, op: str, value: Any) -> None:
        kind = _kind(value)
        if self.kind is None:
            self.kind = kind
        elif self.kind != kind:
            self.mixed = True
            return
        if op == "==":
            self.eq = frozenset([value]) if self.eq is None else self.eq & {value}
        elif op == "in":
            self.eq = frozenset(value) if self.eq is None else self.eq & frozenset(value)
        elif op == "!=":
            self.ne = self.ne | {value}
        elif op == "prefix":
            self.prefixes = (*self.prefixes, value)
        elif op in (">", ">="):
            if self.lo is None or value > self.lo or (value == self.lo and op == ">"):
                self.lo, self.lo_open = value, op == ">"
        elif op in ("<", "<="):
            if self.hi is None or value < self.hi or (value == self.hi and op == "<"):
                self.hi, self.hi_open = value, op == "<"

    def admits(self, value: Any) -> bool:
        """Whether a value satisfies every constraint here (the eq set aside)."""
        try:
            if self.lo is not None and (value < self.lo or (value == self.lo and self.lo_open)):
                return False
            if self.hi is not None and (value > self.hi or (value == self.hi and self.hi_open)):
                return False
        except TypeError:
            return True
        if value in self.ne:
            return False
        return all(isinstance(value, str) and value.startswith(p) for p in self.prefixes)

    def values(self) -> frozenset[Any] | None:
        """The allowed values when finitely many, else None."""
        if self.kind == "bool" and self.eq is None:
            return frozenset(v for v in (True, False) if self.admits(v))
        return None if self.eq is None else frozenset(v for v in self.eq if self.admits(v))

    def empty(self) -> bool:
        if self.mixed:
            return False
        values = self.values()
        if values is not None:
            return not values
        if self.lo is not None and self.hi is not None:
            if self.lo > self.hi or (self.lo == self.hi and (self.lo_open or self.hi_open or self.lo in self.ne)):
                return True
        for a in self.prefixes:
            if any(not (a.startswith(b) or b.startswith(a)) for b in self.prefixes):
                return True
        return False

    def implies(self, other: _Con) -> bool:
        """Every value allowed here is allowed by `other`."""
        if self.mixed or other.mixed:
            return False
        if self.empty():
            return True
        values = self.values()
        if values is not None:
            return all(other.admits(v) and (other.eq is None or v in other.eq) for v in values)
        if other.eq is not None:
            return False
        if other.lo is not None:
            if self.lo is None or self.lo < other.lo or (self.lo == other.lo and other.lo_open and not self.lo_open):
                return False
        if other.hi is not None:
            if self.hi is None or self.hi > other.hi or (self.hi == other.hi and other.hi_open and not self.hi_open):
                return False
        for v in other.ne:
            if not (v in self.ne or not self.admits(v)) and not self._excludes_by_range(v):
                return False
        return all(any(p.startswith(q) for p in self.prefixes) for q in other.prefixes)

    def _excludes_by_range(self, v: Any) -> bool:
        try:
            return (self.lo is not None and (v < self.lo or (v == self.lo and self.lo_open))) or (
                self.hi is not None and (v > self.hi or (v == self.hi and self.hi_open)))
        except TypeError:
            return False


@dataclass
class _Conj:
    fields: dict[str, _Con] = field(default_factory=dict)
    opaque: frozenset[str] = frozenset()

    def constrain(self, path: str, op: str, value: Any) -> None:
        self.fields.setdefault(path, _Con()).add(op, value)

    def contradictory(self) -> bool:
        return any(c.empty() for c in self.fields.values())

    def implies(self, other: _Conj) -> bool:
        """Every request satisfying self satisfies other, and self reads every field other reads."""
        if not other.opaque <= self.opaque:
            return False
        return all(path in self.fields and self.fields[path].implies(con) for path, con in other.fields.items())


class _Unknown(Exception):
    """A condition outside what the analysis models (too many conjuncts)."""


MAX_IMPLICATION_CHECKS = 300_000
"""Conjunct comparisons the unreachable-rule analysis (PE202) considers in one policy at most.

Earlier rules are indexed by the values of one equality each, so a rule is compared only
with the rules that could cover it, and lint stays linear in the rule count for policies
whose rules test `==`/`in` on some field. Rules without any equality are compared with
each other; past this budget the rest is skipped, and PE290 says from which rule on."""


class _Earlier:
    """The live rules so far, indexed to find the first one that covers a new rule."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.always: str | None = None  # the first rule with a condition that always holds
        self.by_value: dict[tuple[str, Any], list[tuple[int, _Conj]]] = {}
        self.unanchored: list[tuple[int, _Conj]] = []
        self.checks = 0
        self.over_budget = False

    def add(self, name: str, conjuncts: list[_Conj]) -> None:
        position = len(self.names)
        self.names.append(name)
        for e in conjuncts:
            if not e.fields and not e.opaque and self.always is None:
                self.always = name
            # `c implies e` needs c's values of e's equality field inside e's set: one of them finds e.
            anchor = next((p for p, con in e.fields.items() if con.eq is not None and not con.mixed), None)
            if anchor is None:
                self.unanchored.append((position, e))
                continue
            for value in e.fields[anchor].eq or ():
                self.by_value.setdefault((anchor, value), []).append((position, e))

    def covering(self, conjuncts: list[_Conj]) -> str | None:
        """The first earlier rule some conjunct of which every one of `conjuncts` implies."""
        common: set[int] | None = None
        for c in conjuncts:
            candidates = list(self.unanchored)
            for path, con in c.fields.items():
                values = con.values()
                if values:
                    candidates.extend(self.by_value.get((path, next(iter(values))), ()))
            self.checks += len(candidates)
            if self.checks > MAX_IMPLICATION_CHECKS:
                self.over_budget = True
                return None
            here: set[int] = set()
            for position, e in candidates:
                if position not in here and (common is None or position in common) and c.implies(e):
                    here.add(position)
            common = here if common is None else common & here
            if not common:
                return None
        return self.names[min(common)] if common else None


def _parsed(source: str) -> Node | None:
    """The shared AST of `source` (the analyses only read it), None when it does not parse."""
    try:
        return parsed(source)[0]
    except (cel.CelError, RecursionError):
        return None


def _dnf(node: Node, source: str) -> list[_Conj]:
    """The condition as OR of ANDs of atoms."""
    if isinstance(node, Call) and node.function == "_||_":
        result = _dnf(node.args[0], source) + _dnf(node.args[1], source)
    elif isinstance(node, Call) and node.function == "_&&_":
        left, right = _dnf(node.args[0], source), _dnf(node.args[1], source)
        if len(left) * len(right) > _MAX_CONJUNCTS:
            raise _Unknown
        result = [_merge(a, b) for a in left for b in right]
    else:
        result = [_atom(node, source)]
    if len(result) > _MAX_CONJUNCTS:
        raise _Unknown
    return result


def _merge(a: _Conj, b: _Conj) -> _Conj:
    merged = _Conj({}, a.opaque | b.opaque)
    for conj in (a, b):
        for path, con in conj.fields.items():
            target = merged.fields.setdefault(path, _Con())
            _absorb(target, con)
    return merged


def _absorb(target: _Con, con: _Con) -> None:
    if con.mixed or (target.kind is not None and con.kind is not None and target.kind != con.kind):
        target.mixed = True
        return
    target.kind = target.kind or con.kind
    if con.eq is not None:
        target.eq = con.eq if target.eq is None else target.eq & con.eq
    target.ne |= con.ne
    target.prefixes += con.prefixes
    if con.lo is not None:
        target.add(">" if con.lo_open else ">=", con.lo)
    if con.hi is not None:
        target.add("<" if con.hi_open else "<=", con.hi)


def _atom(node: Node, source: str) -> _Conj:
    conj = _Conj()
    if isinstance(node, Lit) and node.kind == "bool":
        if node.value is False:
            conj.constrain("<false>", "in", ())
        return conj
    path = _path(node)
    if path is not None:
        conj.constrain(path, "==", True)
        return conj
    if isinstance(node, Call):
        if node.function == "!_":
            inner = _path(node.args[0])
            if inner is not None:
                conj.constrain(inner, "==", False)
                return conj
        op = _OPS.get(node.function)
        if op is not None and len(node.args) == 2:
            left, right = node.args
            lp, rp = _path(left), _path(right)
            (lok, lv), (rok, rv) = _literal(left), _literal(right)
            if lp is not None and rok:
                conj.constrain(lp, op, rv)
                return conj
            if rp is not None and lok:
                conj.constrain(rp, _FLIP[op], lv)
                return conj
        if node.function == "@in" and len(node.args) == 2 and isinstance(node.args[1], ListLit):
            lp = _path(node.args[0])
            items = [_literal(i) for i in node.args[1].items]
            if lp is not None and all(ok for ok, _ in items) and len({_kind(v) for _, v in items}) <= 1:
                conj.constrain(lp, "in", tuple(v for _, v in items))
                return conj
        if node.function == "startsWith" and node.target is not None and len(node.args) == 1:
            tp = _path(node.target)
            ok, value = _literal(node.args[0])
            if tp is not None and ok and isinstance(value, str):
                conj.constrain(tp, "prefix", value)
                return conj
    conj.opaque = frozenset([re.sub(r"\s+", "", source[max(node.start, 0):node.end])])
    return conj


# -- the analyses ---------------------------------------------------------------------------


class _Analysis:
    def __init__(self, compiled: CompiledPolicy, document: Document, catalog: Catalog,
                 retirement_days: int = RETIREMENT_WARNING_DAYS, today: float | None = None) -> None:
        self.retirement_days = retirement_days
        self.today = time.time() if today is None else today
        self.compiled = compiled
        self.policy = compiled.policy
        self.document = document
        self.catalog = catalog
        self.file = document.file

    def at(self, path: tuple[Any, ...], offset: int | None, code: str, message: str, hint: str | None = None,
           *, end: int | None = None, key: bool = False) -> Diagnostic:
        severity = CODES[code][0]
        if offset is None:
            line, col = self.document.locate(path, key=key)
            return Diagnostic(self.file, line, col, code, message, hint, severity)  # type: ignore[arg-type]
        line, col = self.document.locate_in_scalar(path, offset)
        end_col = None
        if end is not None and end > offset + 1:
            end_line, last = self.document.locate_in_scalar(path, end - 1)
            end_col = last + 1 if end_line == line else None
        return Diagnostic(self.file, line, col, code, message, hint, severity,  # type: ignore[arg-type]
                          end_line=line if end_col else None, end_col=end_col)

    # rules ------------------------------------------------------------------------------

    def _conditions(self) -> list[tuple[int, str, list[_Conj] | None]]:
        result = []
        for index, rule in enumerate(self.policy.rules):
            node = _parsed(rule.when)
            try:
                result.append((index, rule.name, None if node is None else _dnf(node, rule.when)))
            except (_Unknown, RecursionError):
                result.append((index, rule.name, None))
        return result

    def rules(self) -> Iterator[Diagnostic]:
        conditions = self._conditions()
        earlier = _Earlier()
        for index, name, dnf in conditions:
            path = ("rules", index, "when")
            if dnf is None:
                continue
            alive = [c for c in dnf if not c.contradictory()]
            if not alive:
                yield self.at(path, None, "PE203", f"rule '{name}' can never match: its condition is contradictory",
                              "check the comparison operators and bounds")
                continue
            if earlier.always is not None:
                yield self.at(("rules", index, "name"), None, "PE201",
                              f"rule '{name}' is unreachable: rule '{earlier.always}' before it always matches",
                              "move this rule above it, or narrow the earlier rule's condition")
            elif not earlier.over_budget:
                cover = earlier.covering(alive)
                if cover is not None:
                    yield self.at(("rules", index, "name"), None, "PE202",
                                  f"rule '{name}' is unreachable: every request it matches is matched first by rule '{cover}'",
                                  "reorder the rules so the narrower one comes first, or remove this one")
                elif earlier.over_budget:
                    yield self.at(("rules", index, "name"), None, "PE290",
                                  f"unreachable-rule analysis stopped at rule '{name}' ({index + 1} of "
                                  f"{len(self.policy.rules)}): over its budget of {MAX_IMPLICATION_CHECKS:,} condition "
                                  "comparisons; this rule and the ones after it were not checked for PE202",
                                  "split the policy, or give rules an equality (==, in) on a common field such as "
                                  "context.tenant, which the analysis indexes")
            earlier.add(name, alive)
            rule = self.policy.rules[index]
            if rule.speed == "fast":
                blocked = [self._guardrail(c) for c in alive]
                if all(blocked):
                    why = blocked[0]
                    yield self.at(("rules", index, "speed"), None, "PE210",
                                  f"rule '{name}' chooses fast, but guardrail {why} always forces standard for the requests it matches",
                                  "fast mode needs a model that supports it, no Batch API and no Priority Tier")

    def _guardrail(self, conj: _Conj) -> str | None:
        batch = conj.fields.get("request.batch")
        if batch is not None and batch.values() == frozenset([True]):
            return "'batch'"
        tier = conj.fields.get("request.service_tier")
        if tier is not None and tier.values() == frozenset(["priority"]):
            return "'priority_tier'"
        model = conj.fields.get("request.model")
        if model is None or model.mixed:
            return None
        names = model.values()
        if names is None and model.prefixes:
            names = frozenset(n for n in self._model_names() if model.admits(n))
            if not names:
                return None
        if names and all(not self._fast_supported(n) for n in names):
            return "'unsupported_model'"
        return None

    def _model_names(self) -> list[str]:
        return [n for p in self.catalog.providers.values() for n in p.names()]

    def _fast_supported(self, name: str) -> bool:
        entry = self.catalog.find(name)
        return entry is not None and entry.fast.supported

    # models -----------------------------------------------------------------------------

    def _expressions(self) -> Iterator[tuple[tuple[Any, ...], str]]:
        for index, rule in enumerate(self.policy.rules):
            yield ("rules", index, "when"), rule.when
        for name, source in self.policy.variables.items():
            yield ("variables", name), source
        for index, budget in enumerate(self.policy.budgets):
            yield ("budgets", index, "key"), budget.key

    def models(self) -> Iterator[Diagnostic]:
        known = self._model_names()
        seen: set[tuple[tuple[Any, ...], int]] = set()
        for path, source in self._expressions():
            root = _parsed(source)
            if root is None:
                continue
            for lit, prefix in _model_literals(root):
                if (path, lit.offset) in seen:
                    continue
                seen.add((path, lit.offset))
                name = lit.value
                yield self.at(path, lit.offset, "PE223", f"the policy names a model ('{name}') where the catalog could "
                              "decide", _MODEL_FEATURE_HINT, end=lit.end)
                if prefix:
                    if not any(n.startswith(name) for n in known):
                        yield self.at(path, lit.offset, "PE220", f"no model in the catalog starts with '{name}'",
                                      did_you_mean(name, known), end=lit.end)
                    continue
                entry = self.catalog.find(name)
                if entry is None:
                    hint = did_you_mean(name, known) or "add the model to your catalog file (policy-engine lint --catalog FILE)"
                    yield self.at(path, lit.offset, "PE220", f"model '{name}' is not in the catalog", hint, end=lit.end)
                    continue
                missing = []
                if entry.standard is None:
                    missing.append("standard")
                if entry.fast.supported and entry.fast.pricing is None:
                    missing.append("fast")
                if missing:
                    yield self.at(path, lit.offset, "PE221",
                                  f"model '{name}' has no {' or '.join(missing)} price in the catalog: its cost cannot be "
                                  "estimated, so ceilings and budgets cannot bound it",
                                  "give it a price in your catalog file", end=lit.end)
                retiring = self._retiring(entry)
                if retiring is not None:
                    yield self.at(path, lit.offset, "PE222", f"model '{name}': {retiring}", _RETIRED_HINT, end=lit.end)
        for index, case in enumerate(self.policy.tests):
            name = case.request.get("model")
            # A test that pins its own `now` tests that moment on purpose (a retirement date, say).
            if not isinstance(name, str) or case.now is not None:
                continue
            entry = self.catalog.find(name, platform=case.platform)
            retiring = self._retiring(entry) if entry is not None else None
            if retiring is not None:
                yield self.at(("tests", index, "request", "model"), None, "PE222",
                              f"test '{case.name}' uses model '{name}': {retiring}", _RETIRED_HINT)

    def _retiring(self, entry: ModelEntry) -> str | None:
        """Why `entry`'s fast mode is gone or going within `retirement_days`, naming the date and source; else None."""
        fast = entry.fast
        if not fast.supported or fast.retired_on is None:
            return None
        days = (fast.window()[1] - self.today) / 86400.0
        if days > self.retirement_days:
            return None
        source = fast.retirement_source or fast.source or "the catalog"
        if days <= 0:
            return f"fast mode was retired on {fast.retired_on} ({source})"
        then = "fast requests will return an error" if fast.after_retirement == "error" else "fast requests will run at standard"
        return f"fast mode retires on {fast.retired_on}, in {math.ceil(days)} days: {then} ({source})"

    # budgets ----------------------------------------------------------------------------

    def budget_keys(self) -> Iterator[Diagnostic]:
        for index, budget in enumerate(self.policy.budgets):
            problems: list[tuple[Node, str]] = []
            root = _parsed(budget.key)
            if root is None:
                continue
            try:
                _key_risks(root, frozenset(), problems)
            except RecursionError:
                continue
            for node, why in problems[:1]:
                yield self.at(("budgets", index, "key"), max(node.start, 0), "PE230",
                              f"budget '{budget.name}' key {why}",
                              "give every request a non-empty key, e.g. has(context.tenant) ? context.tenant : 'untagged'",
                              end=node.end)

    # the money guarantee -----------------------------------------------------------------

    def unmetered_choices(self) -> Iterator[Diagnostic]:
        policy = self.policy
        if policy.on_invalid_context == "allow_unmetered":
            yield self.at(("on_invalid_context",), None, "PE250",
                          "on_invalid_context: allow_unmetered sends a request with an invalid context without "
                          "reserving or settling it: its spend is counted by no budget",
                          "use `standard` (sent and metered with the valid part of the context) or `reject`")
        unpriced = policy.on_unpriced_model
        if unpriced == "allow_unmetered":
            yield self.at(("on_unpriced_model",), None, "PE250",
                          "on_unpriced_model: allow_unmetered settles requests to unpriced models at $0: a budget "
                          "that counts all spend is bypassed",
                          "use `conservative`, `reject`, `{price_as: <model>}` or `{rate: {...}}`")
        elif isinstance(unpriced, PriceAs):
            entry = self.catalog.find(unpriced.price_as)
            priced = entry is not None
            if entry is not None:
                try:
                    entry.rate_table("standard")
                except PricingError:
                    priced = False
            if not priced:
                yield self.at(("on_unpriced_model", "price_as"), None, "PE251",
                              f"on_unpriced_model: price_as '{unpriced.price_as}' is not a priced model of the catalog",
                              "name a model the catalog prices at standard speed")
        if policy.on_incomplete_stream == "observed":
            yield self.at(("on_incomplete_stream",), None, "PE250",
                          "on_incomplete_stream: observed settles a stream cut short (and a timed-out attempt) at "
                          "what the client read, less than the server may bill",
                          "remove it to settle such requests at their worst case (`worst_case`)")

    # variables --------------------------------------------------------------------------

    def unused_variables(self) -> Iterator[Diagnostic]:
        used: set[str] = set()
        programs: list[cel.Program] = [p for _, p in self.compiled.variables]
        for rule in self.compiled.rules:
            programs.append(rule.when)
            if rule.reason_expr is not None:
                programs.append(rule.reason_expr)
        programs.extend(b.key for b in self.compiled.budgets)
        if self.compiled.stickiness_key is not None:
            programs.append(self.compiled.stickiness_key)
        for program in programs:
            for ref in program.references:
                parts = ref.split(".")
                if parts[0] == "vars" and len(parts) > 1:
                    used.add(parts[1])
        for name in self.policy.variables:
            if name not in used:
                yield self.at(("variables", name), None, "PE240", f"variable '{name}' is never used",
                              "remove it, or use it as vars." + name, key=True)

    # tests ------------------------------------------------------------------------------

    def tests(self, run: bool) -> Iterator[Diagnostic]:
        policy = self.policy
        if not policy.tests:
            yield self.at(("name",), None, "PE301", f"policy '{policy.name}' has no tests",
                          "add a `tests:` section; `policy-engine test` runs it", key=True)
            return
        rules = [r.name for r in policy.rules]
        budgets = [b.name for b in policy.budgets]
        impossible: set[int] = set()  # cases PE303 already reports: their failure says nothing new
        for index, case in enumerate(policy.tests):
            wanted = case.expect.rule
            if wanted is not None and wanted not in (*rules, "default", "sticky"):
                impossible.add(index)
                yield self.at(("tests", index, "expect", "rule"), None, "PE303",
                              f"test '{case.name}' expects rule '{wanted}', which the policy does not have",
                              did_you_mean(wanted, [*rules, "default", "sticky"]))
            for g_index, name in enumerate(case.expect.guardrails or ()):
                if name not in GUARDRAILS:
                    impossible.add(index)
                    yield self.at(("tests", index, "expect", "guardrails", g_index), None, "PE303",
                                  f"test '{case.name}' expects guardrail '{name}', which does not exist",
                                  did_you_mean(name, GUARDRAILS) or "guardrails: " + ", ".join(GUARDRAILS))
            for name in case.state.budgets:
                if name not in budgets:
                    yield self.at(("tests", index, "state", "budgets", name), None, "PE303",
                                  f"test '{case.name}' sets the state of budget '{name}', which the policy does not have",
                                  did_you_mean(name, budgets), key=True)
        if not run:
            return
        from .testing.runner import run_policy_tests

        results = run_policy_tests(self.compiled, self.catalog)
        reached = {r.decision.rule for r in results if r.decision is not None}
        for result in results:
            if not result.passed and (result.index not in impossible or result.decision is None):
                yield _test_failure(self.document, self.file, result.index, result)
        for index, rule in enumerate(policy.rules):
            if rule.name not in reached:
                yield self.at(("rules", index, "name"), None, "PE302", f"no test reaches rule '{rule.name}'",
                              "add a test case this rule decides")


def _model_literals(node: Node) -> Iterator[tuple[Lit, bool]]:
    """String literals compared with request.model, and startsWith prefixes (True) on it."""
    for sub in _walk(node):
        if not isinstance(sub, Call):
            continue
        if sub.function in ("_==_", "_!=_") and len(sub.args) == 2:
            a, b = sub.args
            if _path(a) == "request.model" and isinstance(b, Lit) and b.kind == "string":
                yield b, False
            elif _path(b) == "request.model" and isinstance(a, Lit) and a.kind == "string":
                yield a, False
        elif sub.function == "@in" and len(sub.args) == 2 and _path(sub.args[0]) == "request.model" \
                and isinstance(sub.args[1], ListLit):
            for item in sub.args[1].items:
                if isinstance(item, Lit) and item.kind == "string":
                    yield item, False
        elif sub.function == "startsWith" and sub.target is not None and _path(sub.target) == "request.model" \
                and sub.args and isinstance(sub.args[0], Lit) and sub.args[0].kind == "string":
            yield sub.args[0], True


def _walk(node: Node) -> Iterator[Node]:
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        for value in vars(current).values():
            if isinstance(value, Node):
                stack.append(value)
            elif isinstance(value, list):
                for item in value:
                    if isinstance(item, Node):
                        stack.append(item)
                    elif isinstance(item, tuple):
                        stack.extend(x for x in item if isinstance(x, Node))


_OPTIONAL_CONTEXT = ("context.tenant", "context.user", "context.conversation_id", "context.latency_slo_ms")


def _key_risks(node: Node, guarded: frozenset[str], out: list[tuple[Node, str]]) -> None:
    """Where a key expression can produce '' or fail (an absent optional field, a missing label)."""
    if isinstance(node, Lit):
        if node.kind == "string" and node.value == "":
            out.append((node, "can be the empty string ''"))
        return
    if isinstance(node, Cond):
        test = None
        if isinstance(node.cond, Select) and node.cond.test_only:
            inner = _path(node.cond.operand)
            test = f"{inner}.{node.cond.field}" if inner else None
        _key_risks(node.then, guarded | ({test} if test else set()), out)
        _key_risks(node.other, guarded, out)
        return
    path = _path(node)
    if path is not None:
        if path in _OPTIONAL_CONTEXT and path not in guarded:
            out.append((node, f"fails when {path} is absent, so every such request shares one '<key-error>' bucket"))
        elif path.startswith("context.labels.") and path not in guarded:
            out.append((node, f"fails when the label is absent ({path}), so every such request shares one '<key-error>' bucket"))
        return
    if isinstance(node, Call):
        if node.function == "_[_]" and _path(node.args[0]) == "context.labels":
            out.append((node, "fails when the label is absent, so every such request shares one '<key-error>' bucket"))
            return
        if node.function == "_+_":
            parts: list[tuple[Node, str]] = []
            for arg in node.args:
                _key_risks(arg, guarded, parts)
            failing = [p for p in parts if "fails" in p[1]]
            if failing:
                out.append(failing[0])
            elif len(parts) == len(node.args):
                out.append((node, "can be the empty string ''"))
            return
        for arg in node.args:
            sub: list[tuple[Node, str]] = []
            _key_risks(arg, guarded, sub)
            out.extend(p for p in sub if "fails" in p[1])


# -- output formats -------------------------------------------------------------------------


def render(results: Sequence[LintResult], fmt: str, *, root: str | os.PathLike[str] | None = None) -> str:
    """The findings as text, json, sarif or github annotations. `root` is the repository root SARIF
    URIs are relative to (default: the working directory)."""
    if fmt == "sarif":
        return _sarif(results, root)
    return {"text": _text, "json": _json, "github": _github}[fmt](results)


def _all(results: Sequence[LintResult]) -> Iterator[tuple[LintResult, Diagnostic]]:
    for result in results:
        for diagnostic in result.diagnostics:
            yield result, diagnostic


def plural(count: int, noun: str) -> str:
    """`1 rule`, `2 rules`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _summary(results: Sequence[LintResult]) -> dict[str, int]:
    return {"files": len(results), "errors": sum(r.errors for r in results), "warnings": sum(r.warnings for r in results)}


def _text(results: Sequence[LintResult]) -> str:
    out = [d.format(r.source) for r, d in _all(results)]
    s = _summary(results)
    out.append(f"{plural(s['files'], 'file')} checked: {plural(s['errors'], 'error')}, {plural(s['warnings'], 'warning')}")
    return "\n".join(out) + "\n"


def _json(results: Sequence[LintResult]) -> str:
    data = {"diagnostics": [d.to_dict() for _, d in _all(results)], "summary": _summary(results),
            "files": [{"file": r.file, "errors": r.errors, "warnings": r.warnings} for r in results]}
    return json.dumps(data, indent=2) + "\n"


_SARIF_LEVEL = {"error": "error", "warning": "warning", "info": "note"}


def _uri(path: str) -> str:
    return Path(path).as_posix().removeprefix("./")


SRCROOT = "%SRCROOT%"


def _artifact(path: str, root: Path) -> dict[str, str]:
    """An RFC 3986 artifactLocation: relative to %SRCROOT% inside the repository, else a file:// URI."""
    from urllib.parse import quote

    absolute = Path(os.path.realpath(path))
    try:
        relative = absolute.relative_to(root)
    except ValueError:
        return {"uri": absolute.as_uri()}
    return {"uri": quote(relative.as_posix(), safe="/"), "uriBaseId": SRCROOT}


def _rule(code: str) -> dict[str, Any]:
    from .diagnostic_help import HELP, help_uri

    severity, summary = CODES[code]
    full, fix = HELP.get(code, (summary + ".", "See the README's diagnostic codes."))  # a test requires every entry
    return {"id": code, "name": code, "shortDescription": {"text": summary}, "fullDescription": {"text": full},
            "help": {"text": f"{full} {fix}", "markdown": f"**{code}: {summary}**\n\n{full}\n\n{fix}"},
            "helpUri": help_uri(code), "defaultConfiguration": {"level": _SARIF_LEVEL[severity]}}


def _sarif(results: Sequence[LintResult], root: str | os.PathLike[str] | None = None) -> str:
    from . import __version__
    from .diagnostic_help import readme_uri

    base = Path(os.path.realpath(root or os.getcwd()))
    used = sorted(set(CODES) | {d.code for _, d in _all(results)})
    rules = [_rule(code) if code in CODES else {"id": code, "name": code, "shortDescription": {"text": code}}
             for code in used]
    index = {code: i for i, code in enumerate(used)}
    sarif_results = []
    for _, d in _all(results):
        region: dict[str, int] = {"startLine": d.line, "startColumn": d.col}
        if d.end_col is not None:
            region["endLine"] = d.end_line or d.line
            region["endColumn"] = d.end_col
        message = d.message + (f" ({d.hint})" if d.hint else "")
        sarif_results.append({
            "ruleId": d.code, "ruleIndex": index[d.code], "level": _SARIF_LEVEL[d.severity],
            "message": {"text": message},
            "locations": [{"physicalLocation": {"artifactLocation": _artifact(d.file, base), "region": region}}],
        })
    log = {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{"tool": {"driver": {"name": "policy-engine", "version": __version__, "rules": rules,
                                      "informationUri": readme_uri()}},
                  "originalUriBaseIds": {SRCROOT: {"uri": base.as_uri() + "/"}},
                  "results": sarif_results}],
    }
    return json.dumps(log, indent=2) + "\n"


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _github(results: Sequence[LintResult]) -> str:
    out = []
    for _, d in _all(results):
        level = {"error": "error", "warning": "warning"}.get(d.severity, "notice")
        props = f"file={_escape_property(_uri(d.file))},line={d.line},col={d.col}"
        if d.end_col is not None:
            props += f",endLine={d.end_line or d.line},endColumn={d.end_col}"
        props += f",title={_escape_property(d.code)}"
        message = d.message + (f" (hint: {d.hint})" if d.hint else "")
        out.append(f"::{level} {props}::{_escape_data(message)}")
    s = _summary(results)
    out.append(f"policy-engine lint: {plural(s['files'], 'file')}, {plural(s['errors'], 'error')}, {plural(s['warnings'], 'warning')}")
    return "\n".join(out) + "\n"
