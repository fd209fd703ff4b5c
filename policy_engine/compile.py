"""Stage 3, compile: a validated policy -> type-checked CEL programs, ready to decide.

Every CEL problem is reported at the file:line:col of the offending character
inside the YAML scalar, and all problems of all expressions come out in one
`PolicyError`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from . import cel
from .errors import Diagnostic, PolicyError
from .features import declarations
from .load import Document, parse_policy
from .policy import Budget, ExprText, Policy

__all__ = ["CompiledPolicy", "CompiledRule", "CompiledBudget", "compile_policy", "compile_file", "MAX_EXPRESSION_COST", "LazyVars"]

MAX_EXPRESSION_COST: Final = 100_000
"""Static cost bound over which an expression is refused (see `Program.cost`)."""

MICRO_PER_USD: Final = 1_000_000

_CEL_CODES = {
    "syntax": "PE100",
    "undeclared": "PE101",
    "no-such-field": "PE101",
    "unknown-function": "PE101",
    "result-type": "PE103",
    "cost": "PE104",
    "nesting": "PE105",
    "size": "PE106",
}
"""CEL issue kinds -> stable policy codes; every other type error is PE102."""


@dataclass(frozen=True, slots=True)
class CompiledRule:
    index: int
    name: str
    speed: str
    when: cel.Program
    reason_text: str | None
    reason_expr: cel.Program | None


@dataclass(frozen=True, slots=True)
class CompiledBudget:
    spec: Budget
    key: cel.Program
    limit_micro: int


@dataclass(frozen=True)
class CompiledPolicy:
    policy: Policy
    document: Document
    version: str
    """sha256 of the file's text, first 12 hex digits: decisions say which policy made them."""
    variables: tuple[tuple[str, cel.Program], ...]
    rules: tuple[CompiledRule, ...]
    budgets: tuple[CompiledBudget, ...]
    stickiness_key: cel.Program | None
    per_request_micro: int | None

    @property
    def name(self) -> str:
        return self.policy.name


class LazyVars(dict):  # type: ignore[type-arg]
    """`vars` in an activation: each variable is evaluated on first use, at most once per decision.

    Values live in the dict itself, so every read after the first is a plain C-level dict
    hit; only misses come here. A variable that failed is kept aside and its error raised
    again on every later read, without evaluating it again.
    """

    __slots__ = ("_programs", "_activation", "_failed")

    def __init__(self, programs: Mapping[str, cel.Program], activation: Mapping[str, Any]) -> None:
        # No super().__init__(): dict.__new__ already made an empty dict.
        self._programs = programs
        self._activation = activation
        self._failed: dict[str, cel.CelError] | None = None

    def __missing__(self, name: str) -> Any:
        failed = self._failed
        if failed is not None and name in failed:
            raise failed[name]  # a failed variable fails every rule that reads it
        program = self._programs[name]  # KeyError for an unknown name: the type checker rules it out
        try:
            value = program.evaluate(self._activation)
        except cel.CelError as exc:
            if failed is None:
                failed = self._failed = {}
            failed[name] = exc
            raise
        self[name] = value
        return value


def compile_file(path: str, *, text: str | bytes | None = None, max_cost: int = MAX_EXPRESSION_COST) -> CompiledPolicy:
    """load -> validate -> compile one policy file."""
    policy, document = parse_policy(path, text=text)
    return compile_policy(policy, document, max_cost=max_cost)


def compile_policy(policy: Policy, document: Document, *, max_cost: int = MAX_EXPRESSION_COST) -> CompiledPolicy:
    problems: list[Diagnostic] = []

    def build(path: tuple[Any, ...], source: str, decls: Mapping[str, cel.CelType], expect: cel.CelType | None) -> cel.Program | None:
        try:
            return cel.compile(source, decls, expect=expect, max_cost=max_cost)
        except cel.CelError as exc:
            problems.extend(_diagnostics(document, path, exc))
            return None

    budget_names = [b.name for b in policy.budgets]
    variable_types: dict[str, cel.CelType] = {}
    variables: list[tuple[str, cel.Program]] = []
    for name, source in policy.variables.items():
        # A variable sees the ones declared before it, as in Kubernetes' ValidatingAdmissionPolicy.
        program = build(("variables", name), source, declarations(budget_names, variable_types), None)
        variable_types[name] = program.result_type if program else cel.DYN
        if program:
            variables.append((name, program))

    decls = declarations(budget_names, variable_types)
    rules: list[CompiledRule] = []
    for index, rule in enumerate(policy.rules):
        when = build(("rules", index, "when"), rule.when, decls, cel.BOOL)
        reason_expr = None
        if isinstance(rule.reason, ExprText):
            reason_expr = build(("rules", index, "reason", "expr"), rule.reason.expr, decls, cel.STRING)
        if when is not None:
            text = rule.reason if isinstance(rule.reason, str) else None
            rules.append(CompiledRule(index, rule.name, rule.speed, when, text, reason_expr))

    # Budget and stickiness keys are computed before any budget is known: they may not read budgets.
    key_decls = {k: v for k, v in declarations((), variable_types).items() if k not in ("budget", "budgets")}
    budgets: list[CompiledBudget] = []
    for index, budget in enumerate(policy.budgets):
        key = build(("budgets", index, "key"), budget.key, key_decls, cel.STRING)
        if key is not None:
            budgets.append(CompiledBudget(budget, key, _micro(budget.limit_usd)))

    sticky = None
    if policy.stickiness is not None:
        sticky = build(("stickiness", "key"), policy.stickiness.key, key_decls, cel.STRING)

    if problems:
        raise PolicyError(problems, {document.file: document.source})
    per_request = policy.ceilings.per_request_usd
    return CompiledPolicy(
        policy=policy,
        document=document,
        version=hashlib.sha256(document.source.encode("utf-8")).hexdigest()[:12],
        variables=tuple(variables),
        rules=tuple(rules),
        budgets=tuple(budgets),
        stickiness_key=sticky,
        per_request_micro=None if per_request is None else _micro(per_request),
    )


def _micro(usd: Any) -> int:
    return int(usd * MICRO_PER_USD)  # the model allows at most 6 decimals: exact


def _diagnostics(document: Document, path: tuple[Any, ...], exc: cel.CelError) -> Iterator[Diagnostic]:
    for issue in getattr(exc, "issues", None) or []:
        line, col = document.locate_in_scalar(path, issue.offset)
        end_col = None
        if issue.end_offset is not None and issue.end_offset > issue.offset:
            end_line, end = document.locate_in_scalar(path, issue.end_offset - 1)
            end_col = end + 1 if end_line == line else None
        yield Diagnostic(
            document.file, line, col, _CEL_CODES.get(issue.code, "PE102"), issue.message, issue.hint,
            end_line=line if end_col else None, end_col=end_col,
        )
