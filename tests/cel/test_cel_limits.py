"""Limits that hold for any CEL input: flat chains of any length compile, nesting and size have
documented limits reported as issues at a position, and repeated compiles hit the program cache."""

from __future__ import annotations

import itertools
import os
import re
import threading
import time

import pytest

from policy_engine import cel
from policy_engine.cel import MAX_EXPRESSION_CHARS, MAX_NESTING, CelSyntaxError

DECLS = {"x": cel.INT, "b": cel.BOOL, "l": cel.ListType(cel.INT), "m": cel.MapType(cel.STRING, cel.DYN),
         "s": cel.STRING}


def _paren_depth(python: str) -> int:
    depth = deepest = 0
    for ch in python:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth -= 1
    return deepest


@pytest.mark.parametrize("terms", [2, 3, 200, 201, 499, 500, 5000])
@pytest.mark.parametrize("op", ["||", "&&"])
def test_flat_chains_of_any_length_compile_flat(terms: int, op: str) -> None:
    # An allowlist: was "too many nested parentheses" from 201 terms, "nested too deeply" from 500.
    cmp = "==" if op == "||" else "!="
    src = f" {op} ".join(f'x {cmp} {i}' for i in range(terms))
    program = cel.compile(src, DECLS, expect=cel.BOOL)
    assert program.evaluate({"x": terms - 1}) is (op == "||")
    assert program.evaluate({"x": terms}) is (op == "&&")
    assert program.evaluate({"x": 0}) is (op == "||")
    assert _paren_depth(program.python_source) <= 2 * terms.bit_length() + 6
    assert program.cost == cel.compile(src, DECLS).cost  # cost is the sum over the chain: 3 per term + 1 per operator
    assert program.cost == 3 * terms + (terms - 1)


def _cel_or(values: tuple[object, ...]) -> object:
    if True in values:
        return True
    return "error" if "error" in values else False


def _cel_and(values: tuple[object, ...]) -> object:
    if False in values:
        return False
    return "error" if "error" in values else True


@pytest.mark.parametrize("op", ["||", "&&"])
@pytest.mark.parametrize("mode", ["checked", "dynamic"])
def test_long_chains_keep_cels_error_absorption(op: str, mode: str) -> None:
    """A balanced chain means what the left-deep one meant: true || error is true, on either side."""
    text = {True: "b", False: "!b", "error": "1 / x == 1"}  # x = 0: division by zero
    decls = DECLS if mode == "checked" else None
    expected_of = _cel_or if op == "||" else _cel_and
    for values in itertools.product([True, False, "error"], repeat=5):
        src = f" {op} ".join(text[v] for v in values)
        program = cel.compile(src, decls)
        expected = expected_of(values)
        if expected == "error":
            with pytest.raises(cel.CelEvaluationError, match="division by zero"):
                program.evaluate({"b": True, "x": 0})
        else:
            assert program.evaluate({"b": True, "x": 0}) is expected, src


def test_a_type_error_deep_in_a_chain_points_at_the_operand() -> None:
    src = " || ".join(["b"] * 300 + ["x"] + ["b"] * 300)
    with pytest.raises(cel.CelTypeError) as info:
        cel.compile(src, DECLS)
    [issue] = info.value.issues
    assert issue.code == "no-overload" and "'||' applied to (" in issue.message
    assert src[issue.offset:issue.offset + 2] == "||" and abs(issue.offset - src.index("x")) <= 4


NESTED = {  # each builds an expression of n nested levels that compiles at the limit
    "negation": lambda n: "-(" * (n - 1) + "x" + ")" * (n - 1),
    "not": lambda n: "!" * (n - 1) + "b",
    "calls": lambda n: "int(" * (n - 1) + "x" + ")" * (n - 1),
    "ternaries": lambda n: "b ? 1 : " * (n - 1) + "2",
    "selections": lambda n: "m" + ".a" * (n - 1),
    "indexes": lambda n: "m" + "['a']" * (n - 1),
    "lists": lambda n: "[" * (n - 1) + "1" + "]" * (n - 1),
    "maps": lambda n: "{'a': " * (n - 1) + "1" + "}" * (n - 1),
    "additions": lambda n: " + ".join(["x"] * n),
    "macros": lambda n: "l.exists_one(v, " * (n - 1) + "b" + ")" * (n - 1),
    "macro ranges": lambda n: "l" + ".map(v, v)" * (n - 2) + ".exists_one(v, b)",
    "dyn ternaries": lambda n: "(dyn(b) ? " * (n - 2) + "1" + " : 1)" * (n - 2),
}


@pytest.mark.parametrize("kind", sorted(NESTED))
@pytest.mark.parametrize("mode", ["checked", "dynamic"])
def test_nesting_up_to_the_limit_compiles_and_one_more_level_is_an_issue(kind: str, mode: str) -> None:
    decls = DECLS if mode == "checked" else None
    build = NESTED[kind]
    cel.compile(build(MAX_NESTING), decls)  # neither the checker's recursion nor CPython's parser gives way
    too_deep = build(MAX_NESTING + 2)
    with pytest.raises(CelSyntaxError) as info:
        cel.compile(too_deep, decls)
    [issue] = info.value.issues
    assert issue.code == "nesting" and issue.message == f"expression is nested more than {MAX_NESTING} levels deep"
    assert 0 <= issue.offset < len(too_deep) and issue.hint


def test_hostile_nesting_is_rejected_in_bounded_time() -> None:
    for src in ["-(" * 30_000 + "1" + ")" * 30_000, "!" * 90_000 + "b", "[" * 45_000 + "]" * 45_000,
                "b ? 1 : " * 12_000 + "2", "m" + ".a" * 45_000]:
        with pytest.raises(CelSyntaxError) as info:
            cel.compile(src, DECLS)
        assert [i.code for i in info.value.issues] == ["nesting"]


def test_parentheses_alone_nest_nothing() -> None:
    assert cel.compile("(" * 5000 + "x" + ")" * 5000 + " > 1", DECLS).evaluate({"x": 2}) is True


def test_expression_size_limit() -> None:
    at_limit = "x == 1 || " * ((MAX_EXPRESSION_CHARS - 6) // 10) + "x == 2"
    assert len(at_limit) <= MAX_EXPRESSION_CHARS
    assert cel.compile(at_limit, DECLS).evaluate({"x": 2}) is True
    over = " " * (MAX_EXPRESSION_CHARS - len("x == 2") + 1) + "x == 2"
    with pytest.raises(CelSyntaxError) as info:
        cel.compile(over, DECLS)
    [issue] = info.value.issues
    assert issue.code == "size" and (issue.line, issue.column) == (1, 1)
    assert issue.message == f"expression is {MAX_EXPRESSION_CHARS + 1:,} characters long, over the limit of {MAX_EXPRESSION_CHARS:,}"
    assert len(str(info.value)) < 2_000  # the message does not echo 100 KB of source


# -- the program cache ---------------------------------------------------------------------------


def test_the_same_source_and_declarations_compile_once() -> None:
    src = "x > 41 && s.startsWith('a') /* unique to this test */".replace("/* unique to this test */", "")
    src = src + " && x != 1234567"
    before = cel.cache_info()
    first = cel.compile(src, DECLS, expect=cel.BOOL)
    again = cel.compile(src, dict(DECLS), expect=cel.BOOL)  # another dict, same structure
    after = cel.cache_info()
    assert again is first and after.misses == before.misses + 1 and after.hits == before.hits + 1


def test_the_cache_tells_declarations_apart_by_structure() -> None:
    # ObjectType compares by name only: two `vars` with different fields must not share a program.
    v1 = cel.ObjectType("policy_engine.Vars", {"a": cel.INT})
    v2 = cel.ObjectType("policy_engine.Vars", {"a": cel.STRING})
    src = "vars.a == vars.a && 987654 > 0"
    assert cel.compile(src, {"vars": v1}).evaluate({"vars": {"a": 1}}) is True
    assert cel.compile(src, {"vars": v2}).references == frozenset({"vars.a"})
    with pytest.raises(cel.CelTypeError):
        cel.compile("vars.a + 1 > 0 && 987654 > 0", {"vars": v2})
    assert cel.compile("vars.a + 1 > 0 && 987654 > 0", {"vars": v1}).evaluate({"vars": {"a": 1}}) is True
    # ... nor the expected result type, nor the cost limit
    assert cel.compile("vars.a", {"vars": v1}, expect=cel.INT).result_type == cel.INT
    with pytest.raises(cel.CelTypeError):
        cel.compile("vars.a", {"vars": v1}, expect=cel.STRING)
    with pytest.raises(cel.CelTypeError, match="exceeds the limit"):
        cel.compile("vars.a", {"vars": v1}, expect=cel.INT, max_cost=1)


def test_failures_are_cached_and_raised_afresh() -> None:
    src = "x + 'not an int' == 7654321"
    errors = []
    before = cel.cache_info()
    for _ in range(3):
        with pytest.raises(cel.CelTypeError) as info:
            cel.compile(src, DECLS)
        errors.append(info.value)
    assert cel.cache_info().misses == before.misses + 1
    assert errors[0] is not errors[1] and str(errors[0]) == str(errors[2])
    assert re.search(r"no matching overload for '\+'", str(errors[2]))


@pytest.mark.parametrize("src", ["a.in", "x.null", "4 % in", "in"])
def test_keywords_are_not_identifiers(src: str) -> None:
    with pytest.raises(CelSyntaxError, match="unexpected token"):
        cel.compile(src, None)


def test_a_fork_while_another_thread_holds_the_cache_lock_does_not_deadlock_the_child() -> None:
    from policy_engine.cel import cache

    if not hasattr(os, "fork"):
        pytest.skip("needs fork")
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with cache.PARSES.lock, cache.PROGRAMS._entries.lock:
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(10)
    pid = os.fork()
    if pid == 0:  # the child: compile something new, then report by exit status
        try:
            ok = cel.compile("x > 918273645", DECLS).evaluate({"x": 918273646}) is True
        finally:
            os._exit(0 if ok else 1)
    release.set()
    thread.join()
    started = time.monotonic()
    while time.monotonic() - started < 30:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child deadlocked on the compile cache's lock")
