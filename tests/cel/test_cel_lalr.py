"""The parser's fast path (policy_engine/cel/lalr.py) builds exactly the AST lark's path builds.

Compared over the expressions of the project's own tests and benchmarks, the packaged policies,
edge cases of positions (parentheses, comments, chains) and, when CEL_CONFORMANCE_DATA names a
folder holding cases.jsonl and cases_ext.jsonl (see the conformance harness's README), every
conformance input.
"""

from __future__ import annotations

import ast as pyast
import json
import os
from pathlib import Path

import lark
import pytest

from policy_engine.cel import CelSyntaxError, ast as cel_ast, lalr
from policy_engine.cel.ast import Node, _Builder

ROOT = Path(__file__).resolve().parents[2]

EDGE_CASES = [
    "(a) + b", "((a)) + (b)", "a + (b)", "(a + b) * c", "(a || b) || c", "a || (b || c)", "((a || b)) || (c) || d",
    "a && b || c && d", "(a && b) && (c || d)", "a ? b : c ? d : e", "(a) ? (b) : (c)", "(a ? b : c) ? d : e",
    "-x + !y", "!!x", "--1", "- -x", "!(a)", "-(1)", "a - -1", "a-1", "1--1",
    "a.b.c", "(a).b", "(a.b).c()", "a.b(c)(", "a[1][2]", "(a)[1]", "a [ 1 ]", "a.?b.?c", "a[?1]", "(a)[?b]",
    "a.`b-c`", "a.?`b.c`", "a.b{c: 1, d: 2}", ".a.b{}", "(a.b){c: (1)}", "a.`b`{c: 1}", "A{}",
    "f()", "f(1, 2)", ".f(1)", "a.f()", "(a).f(1, (2))", "x.exists(y, y > 1)", "x.all(i, v, v > i)", "x.map(y, y, y)",
    "x.exists_one(y, y)", "x.existsOne(y, y)", "x.filter(y, y)", "x.transformList(i, v, v)", "x.transformMap(k, v, k, v)",
    "x.sortBy(y, y)", "opt.optMap(y, y + 1)", "opt.optFlatMap(y, y)", "cel.bind(a, 1, a + 1)", "has(a.b)", "has((a).b)",
    "[1, 2, 3]", "[1, ?2, 3,]", "[]", "[?a]", "{1: 2, ?3: 4,}", "{}", "{'a': [1], 'b': {2: 3}}",
    "1", "1u", "0x1F", "-0x1f", "1.5", "1e3", ".5", "1.", "'s'", '"s"', "'''s'''", 'r"\\n"', "b'\\x00'", "true", "false",
    "null", "'\\u00e9'", "'\\303\\251'",
    "a in b", "a in [1, 2]", "a == b != c", "a < b <= c", "a // comment\n + b", "  a  ", "\ta\n.b\n", "a /* x */",
    "1 + 2 * 3 % 4 / 5 - 6", "a.b > 1 && c.d < 2 || e.f == 3",
    # macro misuse: semantic issues the checker reports
    "x.all(1, y)", "x.exists(y)", "has(a)", "has(a.b, c)", "cel.bind(1, 2, 3)", "x.map(y, y, z, w)", "x.all(v, v, v)",
    "x.transformList(v, 1)", "x.all(a.b, 1)",
    # what the fast path leaves to lark: syntax errors, literal issues, depth
    "a +", "a b", "(", ")", "a.", "1 +* 2", "a ? b", "'unterminated", "#", "a ~ b", "if", "a.if", "x{1: 2}",
    "99999999999999999999", "18446744073709551616u", "'\\q'", "b'\\u00e9'", "f(1,)", "[,]",
    "(" * 70 + "1" + ")" * 70, "[" * 70 + "]" * 70, "-" * 70 + "1", "!" * 70 + "x", "a" + ".b" * 70,
    "a || " * 300 + "b", "a && " * 300 + "b", " + ".join(["1"] * 70), "x.y(z){}", "(a || b){c: 1}",
    "", "  ", "a @", "@ a", "a\x00b", "a \u00e9", "a.b\t\n",  # a character no terminal matches, at either end
]


def dump(value):
    """A node as nested tuples: its class and every attribute (offsets, `start` too)."""
    if isinstance(value, Node):
        return (type(value).__name__, *((k, dump(v)) for k, v in sorted(vars(value).items())))
    if isinstance(value, (list, tuple)):
        return tuple(dump(v) for v in value)
    if isinstance(value, frozenset):
        return tuple(sorted(value))
    return value


def outcome(source: str, fast: bool):
    try:
        node, semantic = cel_ast._parse(source, fast=fast)
    except CelSyntaxError as e:
        return ("error", tuple(e.issues))
    return ("ok", dump(node), tuple(semantic))


def _strings_of(path: Path) -> list[str]:
    tree = pyast.parse(path.read_text())
    return [n.value for n in pyast.walk(tree) if isinstance(n, pyast.Constant) and isinstance(n.value, str)
            and 0 < len(n.value) < 2000]


def project_expressions() -> list[str]:
    """Every string constant of the CEL tests and the benchmarks: most are CEL, the rest test the errors."""
    found: set[str] = set()
    for path in [*sorted((ROOT / "tests" / "cel").glob("test_*.py")), ROOT / "benchmarks" / "bench_cel.py",
                 ROOT / "tests" / "test_limits.py"]:
        if path.exists() and path.name != "test_cel_lalr.py":
            found.update(_strings_of(path))
    return sorted(found)


def packaged_expressions() -> list[str]:
    from policy_engine.load import parse_policy

    return [e for path in sorted((ROOT / "policies").glob("*.yaml")) for e in parse_policy(str(path))[0].expressions()]


def conformance_expressions() -> list[str]:
    folder = os.environ.get("CEL_CONFORMANCE_DATA")
    if not folder:
        return []
    found: list[str] = []
    for name in ("cases.jsonl", "cases_ext.jsonl"):
        for line in (Path(folder) / name).read_text().splitlines():
            if line.strip():
                found.append(json.loads(line)["expr"])
    return found


needs_tested_lark = pytest.mark.skipif(lark.__version__ not in lalr.TESTED_LARK_VERSIONS,
                                       reason=f"lark {lark.__version__}: the fast path is off")


def _same(sources: list[str]) -> tuple[int, int]:
    """Assert both paths agree on every source; count the sources the fast path took itself."""
    taken = valid = 0
    for source in sources:
        want = outcome(source, fast=False)
        assert outcome(source, fast=True) == want, source
        if want[0] == "ok":
            valid += 1
            taken += lalr.fast_parser().parse(_Builder(source)) is not None  # type: ignore[union-attr]
    return taken, valid


@needs_tested_lark
def test_edge_cases_parse_the_same() -> None:
    _same(EDGE_CASES)


@needs_tested_lark
def test_the_project_expressions_parse_the_same() -> None:
    sources = project_expressions() + packaged_expressions()
    taken, valid = _same(sources)
    assert valid > 500  # (most of the test strings are CEL)
    assert taken == valid  # no valid expression of the project goes the slow way


@needs_tested_lark
@pytest.mark.skipif(not os.environ.get("CEL_CONFORMANCE_DATA"), reason="CEL_CONFORMANCE_DATA is not set")
def test_every_conformance_input_parses_the_same() -> None:
    sources = conformance_expressions()
    taken, valid = _same(sources)
    assert len(sources) > 1500 and taken > 0.99 * valid


def test_the_fast_path_is_off_for_an_untested_lark(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lalr, "_TRIED", False)
    monkeypatch.setattr(lalr, "_FAST", None)
    monkeypatch.setattr(lalr.lark, "__version__", "0.0.untested")
    assert lalr.fast_parser() is None
    node, _ = cel_ast._parse("a.b > 1")  # lark's path
    assert dump(node) == outcome("a.b > 1", fast=False)[1]
