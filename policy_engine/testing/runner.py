"""Run a policy's embedded `tests:` against the real engine, with the state each case sets up.

Each case gets a fresh engine whose ledger, rate-limit state and conversation
store start from the case's `state`, so cases never leak into each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..catalog import Catalog, load_catalog
from ..compile import CompiledPolicy
from ..decide import ConversationStore, Decision, Engine
from ..cel import CelError
from ..errors import CeilingExceeded, InvalidRequest, PolicyEngineError, PolicyError
from ..features import context_features
from ..load import Document
from ..ledger import Balance, Charge, MemoryLedger, ReserveResult, Scope
from ..policy import TestCase
from ..ratelimit import RateLimitStore

__all__ = ["CaseResult", "run_case", "run_policy_tests", "DEFAULT_TEST_TIME"]

DEFAULT_TEST_TIME = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
_MICRO = 1_000_000


@dataclass
class CaseResult:
    policy: str
    name: str
    passed: bool
    failures: list[str] = field(default_factory=list)
    decision: Decision | None = None
    index: int = 0

    def describe(self) -> str:
        head = f"{'PASS' if self.passed else 'FAIL'} {self.policy}: {self.name}"
        return head if self.passed else head + "".join(f"\n    {line}" for line in self.failures)


class _SeededLedger(MemoryLedger):
    """A ledger in which each budget has already spent what the test case says, whatever its key."""

    def __init__(self, spent: dict[str, int]) -> None:
        super().__init__()
        self._seed = spent

    def _prime(self, scopes: Sequence[Scope]) -> None:
        for scope in scopes:
            if scope.budget in self._seed and scope.id not in self._spent:
                self._spent[scope.id] = self._seed[scope.budget]

    def balances(self, scopes: Sequence[Scope]) -> list[Balance]:
        self._prime(scopes)
        return super().balances(scopes)

    def reserve(self, reservation_id: str, charges: Sequence[Charge], *, ttl_s: float) -> ReserveResult:
        self._prime([s for s, _ in charges])
        return super().reserve(reservation_id, charges, ttl_s=ttl_s)


class _SeededConversations(ConversationStore):
    """The case's conversation state answers for whichever conversation the request is in."""

    def __init__(self, speed: str, prefix_tokens: int, at: float) -> None:
        super().__init__()
        self._seed = (speed, prefix_tokens, at)

    def get(self, key: str, now: float, ttl_s: float) -> tuple[str, int, float] | None:
        if key not in self._entries:
            self._entries[key] = self._seed
        return super().get(key, now, ttl_s)


def _engine_for(compiled: CompiledPolicy, case: TestCase, catalog: Catalog, now: datetime) -> Engine:
    state = case.state
    ledger = _SeededLedger({name: int(b.spent_usd * _MICRO) for name, b in state.budgets.items()})
    ratelimits = RateLimitStore()
    epoch = now.timestamp()
    if state.ratelimit is not None:
        rl = state.ratelimit
        values: dict[str, Any] = {k: getattr(rl, k) for k in (
            "input_tokens_limit", "input_tokens_remaining", "output_tokens_limit", "output_tokens_remaining")}
        if rl.reset_in_s is not None:
            values["reset_at"] = epoch + rl.reset_in_s
        if rl.seconds_since_429 is not None:
            values["last_429_at"] = epoch - rl.seconds_since_429
        ratelimits.update("default", now=epoch, **values)
    conversations: ConversationStore = ConversationStore()
    if state.conversation is not None and state.conversation.last_speed is not None:
        c = state.conversation
        conversations = _SeededConversations(c.last_speed, c.cached_prefix_tokens, epoch - c.age_s)
    return Engine([compiled], catalog, ledger=ledger, ratelimits=ratelimits, conversations=conversations)


def run_case(compiled: CompiledPolicy, case: TestCase, catalog: Catalog, index: int = 0) -> CaseResult:
    now = case.now or DEFAULT_TEST_TIME
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    engine = _engine_for(compiled, case, catalog, now)
    result = CaseResult(compiled.name, case.name, True, index=index)
    request = dict(case.request)
    batch = bool(request.pop("batch", False))
    try:
        decision = engine.decide(request, case.context, now=now, batch=batch, input_tokens=case.input_tokens,
                                 platform=case.platform)
        # A case's context is its author's: an invalid one is the case's bug, whatever on_invalid_context does.
        context_features(case.context)
    except CeilingExceeded as exc:
        decision = exc.decision  # type: ignore[attr-defined]
    except InvalidRequest as exc:
        result.passed = False
        result.failures.append(f"the case's request or context is invalid: {exc}")
        return result
    except PolicyEngineError as exc:
        # on_error: raise hands back the rejected decision; anything else is the case's fault too.
        decision = getattr(exc, "decision", None)
        if decision is None:
            result.passed = False
            result.failures.append(f"the decision failed: {exc}")
            return result
    result.decision = decision
    expect = case.expect
    checks: list[tuple[str, Any, Any]] = [
        ("speed", expect.speed, decision.speed if decision.outcome != "rejected" else None),
        ("rule", expect.rule, decision.rule),
        ("outcome", expect.outcome, decision.outcome),
    ]
    if expect.beta is not None:
        checks.append(("beta", expect.beta, _sends_beta(decision)))
    for what, wanted, got in checks:
        if wanted is not None and wanted != got:
            result.failures.append(f"{what}: expected {wanted!r}, got {got!r}")
    if expect.guardrails is not None and sorted(expect.guardrails) != sorted(decision.guardrails):
        result.failures.append(f"guardrails: expected {sorted(expect.guardrails)}, got {sorted(decision.guardrails)}")
    for fragment in expect.reasons:
        if not any(fragment in reason for reason in decision.reasons):
            result.failures.append(f"reasons: none contains {fragment!r}; reasons were {decision.reasons}")
    if result.failures:
        result.passed = False
        result.failures.append(f"decision: {decision.speed} by {decision.rule} ({decision.outcome}); reasons: {decision.reasons}")
    return result


def run_policy_tests(compiled: CompiledPolicy, catalog: Catalog | None = None,
                     extra_cases: Sequence[TestCase] = ()) -> list[CaseResult]:
    """Run every embedded test case of a compiled policy (plus `extra_cases`)."""
    catalog = catalog or load_catalog()
    cases = [*compiled.policy.tests, *extra_cases]
    return [run_case(compiled, case, catalog, index) for index, case in enumerate(cases)]


# -- *_test.yaml files ------------------------------------------------------------------------

from pydantic import BaseModel, ConfigDict, Field  # noqa: E402


class TestFile(BaseModel):
    """A `*_test.yaml` file: test cases kept beside a policy instead of inside it."""

    __test__ = False  # not a pytest class
    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str | None = Field(default=None, description="Policy file under test, relative to this file; "
                               "default: this file's name without `_test`.")
    tests: list[TestCase] = Field(min_length=1, description="Test cases, as in a policy's `tests:`.")


def load_test_file(path: str) -> tuple[TestFile, Document, str]:
    """Parse a test file; returns it, its positions and the path of the policy it tests."""
    import os

    from ..load import read_yaml, validate

    document = read_yaml(path)
    try:
        tests = validate(document, TestFile)
    except PolicyError as exc:
        raise _named_like_a_test(exc, document) from None
    base = os.path.basename(path)
    stem = base[: -len("_test.yaml")] if base.endswith("_test.yaml") else base[: -len("_test.yml")]
    target = tests.policy or f"{stem}.yaml"
    return tests, document, os.path.join(os.path.dirname(path), target)


_POLICY_KEYS = frozenset(("version", "name", "rules", "default", "budgets", "variables", "ceilings"))


def _named_like_a_test(exc: PolicyError, document: Document) -> PolicyError:
    """A policy saved as `*_test.yaml` is read as a test file: say that the name is the cause."""
    data = document.data
    if not (isinstance(data, dict) and _POLICY_KEYS & set(data)):
        return exc
    hint = (f"{document.file} is read as a test file because its name ends in _test.yaml; a policy needs "
            "another name (e.g. without _test), a test file holds only `policy:` and `tests:`")
    import dataclasses

    return PolicyError([dataclasses.replace(d, hint=hint) if d.code == "PE010" else d for d in exc.diagnostics],
                       exc.sources)


# -- tracing: which rules a case evaluated, on which activation ------------------------------

class _Probe:
    """Stands in for a compiled program: evaluates it and notes the activation and the result."""

    __slots__ = ("program", "log", "index")

    def __init__(self, program: Any, log: list[tuple[int, Any, Any]], index: int) -> None:
        self.program, self.log, self.index = program, log, index

    def evaluate(self, activation: Any) -> Any:
        try:
            value = self.program.evaluate(activation)
        except CelError as exc:
            self.log.append((self.index, activation, exc))
            raise
        self.log.append((self.index, activation, value))
        return value

    def __getattr__(self, name: str) -> Any:
        return getattr(self.program, name)


KEY_PROBE = -1
"""Index the trace gives budget and stickiness keys (they see the activation before any rule)."""


def traced(compiled: CompiledPolicy) -> tuple[CompiledPolicy, list[tuple[int, Any, Any]]]:
    """The same policy with every rule (and key) probed, and the trace list the probes fill.

    The engine evaluates the probes exactly where it would evaluate the programs, so
    a trace shows the real decision: which rules ran, what each returned, and the
    activation (request, context, budgets, ...) they saw.
    """
    import dataclasses

    log: list[tuple[int, Any, Any]] = []
    rules = tuple(dataclasses.replace(r, when=_Probe(r.when, log, r.index)) for r in compiled.rules)
    budgets = tuple(dataclasses.replace(b, key=_Probe(b.key, log, KEY_PROBE)) for b in compiled.budgets)
    sticky = _Probe(compiled.stickiness_key, log, KEY_PROBE) if compiled.stickiness_key is not None else None
    return dataclasses.replace(compiled, rules=rules, budgets=budgets, stickiness_key=sticky), log


@dataclass
class Trace:
    """What one case's decision evaluated."""

    activation: Any | None
    rules: dict[int, Any]
    """Rule index -> its result (True/False) or the CelError it raised, for the rules that ran."""


def run_traced(compiled: CompiledPolicy, case: TestCase, catalog: Catalog, index: int = 0) -> tuple[CaseResult, Trace]:
    probed, log = traced(compiled)
    result = run_case(probed, case, catalog, index)
    result.policy = compiled.name
    activation = log[0][1] if log else None
    return result, Trace(activation, {i: value for i, _, value in log if i != KEY_PROBE})


def _sends_beta(decision: Decision) -> bool:
    """The request goes out fast with the fast-mode beta header (not on a fast model id)."""
    return decision.speed == "fast" and decision.fast_beta is not None and decision.fast_model is None


def expectation_diff(result: CaseResult, case: TestCase) -> list[str]:
    """The expectation against the decision, field by field: `-` expected, `+` got, ` ` agreed."""
    decision = result.decision
    if decision is None:
        return list(result.failures)
    got = {"speed": decision.speed if decision.outcome != "rejected" else None, "rule": decision.rule,
           "outcome": decision.outcome, "guardrails": sorted(decision.guardrails), "beta": _sends_beta(decision)}
    lines = []
    for key in ("speed", "rule", "outcome", "guardrails", "beta"):
        wanted = getattr(case.expect, key)
        if wanted is None:
            continue
        if key == "guardrails":
            wanted = sorted(wanted)
        if wanted == got[key]:
            lines.append(f"  {key}: {wanted}")
        else:
            lines += [f"- {key}: {wanted}", f"+ {key}: {got[key]}"]
    for fragment in case.expect.reasons:
        if any(fragment in reason for reason in decision.reasons):
            lines.append(f"  reasons: ...{fragment}...")
        else:
            lines.append(f"- reasons: ...{fragment}...")
    if any(line.startswith("-") for line in lines):
        lines += [f"+ reasons: {reason}" for reason in decision.reasons]
    return lines


# -- coverage ---------------------------------------------------------------------------------

@dataclass
class CoverageItem:
    rule: str
    what: str
    """`matched`, `not matched`, or `<operand> is true|false`."""
    line: int
    col: int
    covered: bool = False
    hits: int = 0
    """How many test cases produced this outcome."""

    def hit(self) -> None:
        self.covered = True
        self.hits += 1


class _Branch:
    """An && / || tree over the operands of one rule's condition, each compiled on its own."""

    def __init__(self, op: str, children: list[Any]) -> None:
        self.op, self.children = op, children


class Coverage:
    """Which rule outcomes and which && / || operand outcomes the test cases exercised."""

    def __init__(self, compiled: CompiledPolicy) -> None:
        self.compiled = compiled
        self.items: list[CoverageItem] = []
        self._rule_items: dict[int, tuple[CoverageItem, CoverageItem]] = {}
        self._trees: dict[int, Any] = {}
        document = compiled.document
        for rule in compiled.rules:
            line, col = document.locate(("rules", rule.index, "name"))
            pair = (CoverageItem(rule.name, "matched", line, col), CoverageItem(rule.name, "not matched", line, col))
            self._rule_items[rule.index] = pair
            self.items.extend(pair)
            tree = self._tree(rule)
            if isinstance(tree, _Branch):
                self._trees[rule.index] = tree

    def _tree(self, rule: Any) -> Any:
        from .. import cel
        from ..cel.ast import Call, parse_with_issues
        from ..features import declarations

        source = rule.when.source
        variable_types = {name: program.result_type for name, program in self.compiled.variables}
        decls = declarations([b.spec.name for b in self.compiled.budgets], variable_types)

        def build(node: Any) -> Any:
            if isinstance(node, Call) and node.function in ("_&&_", "_||_"):
                children = []
                for arg in node.args:
                    child = build(arg)
                    if isinstance(child, _Branch) and child.op == node.function:
                        children.extend(child.children)
                    else:
                        children.append(child)
                return _Branch(node.function, children)
            text = source[max(node.start, 0):node.end]
            try:
                program = cel.compile(text, decls, expect=cel.BOOL)
            except cel.CelError:
                return None  # e.g. a comprehension variable: the operand is not an expression of its own
            line, col = self.compiled.document.locate_in_scalar(("rules", rule.index, "when"), max(node.start, 0))
            shown = " ".join(text.split())
            pair = (CoverageItem(rule.name, f"`{shown}` is true", line, col),
                    CoverageItem(rule.name, f"`{shown}` is false", line, col))
            self.items.extend(pair)
            return (program, pair)

        try:
            root, _ = parse_with_issues(source)
        except cel.CelError:
            return None
        if not (isinstance(root, Call) and root.function in ("_&&_", "_||_")):
            return None  # a single condition: matched / not matched already covers it
        return build(root)

    def record(self, trace: Trace) -> None:
        for index, value in trace.rules.items():
            pair = self._rule_items.get(index)
            if pair is None or isinstance(value, Exception):
                continue
            pair[0 if value else 1].hit()
            tree = self._trees.get(index)
            if tree is not None and trace.activation is not None:
                _evaluate(tree, trace.activation)

    @property
    def covered(self) -> int:
        return sum(item.covered for item in self.items)

    @property
    def percent(self) -> float:
        return 100.0 * self.covered / len(self.items) if self.items else 100.0

    def missing(self) -> list[CoverageItem]:
        return [item for item in self.items if not item.covered]


def _evaluate(node: Any, activation: Any) -> bool | None:
    """Evaluate like CEL's short-circuit, left to right, noting each operand's outcome (None: error)."""
    if node is None:
        return None
    if isinstance(node, _Branch):
        stop = node.op == "_||_"  # || stops at the first true, && at the first false
        failed = False
        for child in node.children:
            value = _evaluate(child, activation)
            if value is None:
                failed = True
            elif value is stop:
                return stop
        return None if failed else not stop
    program, pair = node
    try:
        value = program.evaluate(activation)
    except CelError:
        return None
    pair[0 if value else 1].hit()
    return bool(value)
