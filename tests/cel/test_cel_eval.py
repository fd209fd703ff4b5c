"""Evaluation semantics: operators, functions, macros, error rules."""

import datetime as dt
import math

import pytest
from celpy_bridge import same  # type-strict equality, shared with the celpy differential tests

from policy_engine.cel import (
    BOOL, DOUBLE, DYN, INT, STRING, UINT, CelEvaluationError, CelTypeError, CelUint, ListType, MapType,
    compile,
)

UTC = dt.timezone.utc


def ev(src, act=None, decls=None, **kw):
    return compile(src, decls, **kw).evaluate(act or {})


def ev_err(src, act=None, decls=None):
    with pytest.raises(CelEvaluationError) as ei:
        ev(src, act, decls)
    return str(ei.value)


@pytest.mark.parametrize("src,expected", [
    ("1 + 2", 3), ("7 - 10", -3), ("6 * 7", 42), ("7 / 2", 3), ("-7 / 2", -3), ("7 / -2", -3),
    ("-7 % 2", -1), ("7 % -2", 1), ("-7 % -2", -1), ("10u / 3u", CelUint(3)), ("10u % 3u", CelUint(1)),
    ("1u + 2u", CelUint(3)), ("3u * 4u", CelUint(12)), ("1.5 + 2.25", 3.75), ("1.0 / 4.0", 0.25),
    ("-(5)", -5), ("--5", 5), ("-2.5", -2.5), ("'ab' + 'cd'", "abcd"), ("b'ab' + b'c'", b"abc"),
    ("[1] + [2, 3]", [1, 2, 3]), ("-9223372036854775808", -(2**63)), ("9223372036854775807 - 1", 2**63 - 2),
    ("0x10 + 1", 17), ("18446744073709551615u", CelUint(2**64 - 1)),
])
def test_arithmetic(src, expected):
    assert same(ev(src), expected)
    assert same(ev(f"dyn({src.split(' ')[0]}) == dyn({src.split(' ')[0]})"), True) if " " in src else True


@pytest.mark.parametrize("src,msg", [
    ("9223372036854775807 + 1", "overflow"), ("-9223372036854775808 - 1", "overflow"),
    ("-(-9223372036854775807 - 1)", "overflow"), ("9223372036854775807 * 2", "overflow"),
    ("(-9223372036854775807 - 1) / -1", "overflow"), ("1 / 0", "division by zero"), ("1 % 0", "modulus by zero"),
    ("0u - 1u", "overflow"), ("18446744073709551615u + 1u", "overflow"), ("1u / 0u", "division by zero"),
    ("1u % 0u", "modulus by zero"),
])
def test_arithmetic_errors(src, msg):
    assert msg in ev_err(src)
    # the dynamic path has the same semantics
    assert msg in ev_err(src.replace("9223372036854775807", "dyn(9223372036854775807)").replace("1 / 0", "dyn(1) / 0"))


def test_double_ieee():
    assert ev("1.0 / 0.0") == math.inf
    assert ev("-1.0 / 0.0") == -math.inf
    assert math.isnan(ev("0.0 / 0.0"))
    assert ev("x / y", {"x": 1.0, "y": 0.0}) == math.inf
    assert ev("1e308 * 10.0") == math.inf


@pytest.mark.parametrize("src,expected", [
    ("1 < 2", True), ("2 <= 2", True), ("3 > 4", False), ("4 >= 5", False), ("'a' < 'b'", True),
    ("b'a' < b'b'", True), ("false < true", True), ("1 < 1.5", True), ("2u > 1", True), ("1.0 <= 1u", True),
    ("duration('1s') < duration('2s')", True),
    ("timestamp('2024-01-01T00:00:00Z') < timestamp('2024-01-02T00:00:00Z')", True),
    ("1 == 1.0", True), ("1u == 1", True), ("1 == '1'", False), ("true == 1", False), ("null == null", True),
    ("[1, 2] == [1, 2]", True), ("[1, 'a'] == [1, 'a']", True), ("{'a': 1} == {'a': 1}", True),
    ("{'a': 1} != {'a': 2}", True), ("[true] == [1]", False), ("1 != 2", True), ("'a' != 'a'", False),
    ("type(1) == int", True), ("type('a') == string", True), ("type(1u) == uint", True), ("type(type(1)) == type", True),
    ("type([]) == list", True), ("type({}) == map", True), ("type(null) == null_type", True), ("type(1) == uint", False),
    ("0.0 / 0.0 == 0.0 / 0.0", False), ("[0.0 / 0.0] == [0.0 / 0.0]", False),
])
def test_comparisons_and_equality(src, expected):
    assert ev(src) is expected


@pytest.mark.parametrize("src", ["1 < 'a'", "true < 1", "[1] < [2]", "null < 1"])
def test_comparison_type_errors(src):
    with pytest.raises(CelTypeError):
        compile(src, {})  # checked mode
    assert "no matching overload" in ev_err(src)  # dynamic mode: an evaluation error
    left, right = src.split(" < ")
    assert "no matching overload" in ev_err(f"dyn({left}) < dyn({right})")


@pytest.mark.parametrize("src,expected", [
    ("1 in [1, 2]", True), ("3 in [1, 2]", False), ("'a' in {'a': 1}", True), ("'b' in {'a': 1}", False),
    ("1 in [1.0]", True), ("dyn(true) in [1]", False), ("1 in {1: 'x'}", True), ("dyn(1) in {true: 'x'}", False),
    ("'a' in ['a', 1]", True), ("2u in [1, 2]", True),
])
def test_in(src, expected):
    assert ev(src) is expected


def test_in_dynamic_bool_int():
    assert ev("x in y", {"x": True, "y": [1]}) is False
    assert ev("x in y", {"x": 1, "y": {True: 1}}) is False
    assert ev("x in y", {"x": True, "y": {True: 1}}) is True


def test_index_and_select():
    assert ev("[1, 2, 3][1]") == 2
    assert ev("{'a': {'b': 5}}.a.b") == 5
    assert ev("{'a': 1}['a']") == 1
    assert ev("{1: 'x'}[1u]") == "x"
    assert ev("{1: 'x'}[1.0]") == "x"
    assert "out of range" in ev_err("[1, 2][2]")
    assert "out of range" in ev_err("[1, 2][-1]")
    assert "no such key" in ev_err("{'a': 1}['b']")
    assert "no such key" in ev_err("{'a': 1}.b")
    assert "no such key" in ev_err("x.missing", {"x": {}})
    assert "no such key" in ev_err("m[true]", {"m": {1: "one"}})
    assert ev("m[1]", {"m": {1: "one"}}) == "one"
    assert "does not support field selection" in ev_err("x.f", {"x": 1})


def test_has():
    assert ev("has(x.a)", {"x": {"a": 1}}) is True
    assert ev("has(x.b)", {"x": {"a": 1}}) is False
    assert ev("has({'a': 1}.a)") is True
    assert ev("has(x.a.b)", {"x": {"a": {"b": None}}}) is True
    assert "no such key" in ev_err("has(x.a.b)", {"x": {}})


def test_ternary_evaluates_only_chosen_branch():
    assert ev("true ? 1 : 1 / 0") == 1
    assert ev("false ? 1 / 0 : 2") == 2
    assert ev("x ? 'a' : 1", {"x": True}) == "a"
    assert "no matching overload" in ev_err("x ? 1 : 2", {"x": 1})


# ----------------------------------------------------------- && / || truth table
T, F, E = "true", "false", "(1 / 0 == 1)"
NB = "dyn(1)"  # a non-bool operand: an error when it is actually used

AND_TABLE = {
    (T, T): True, (T, F): False, (T, E): "err", (F, T): False, (F, F): False, (F, E): False,
    (E, T): "err", (E, F): False, (E, E): "err",
}
OR_TABLE = {
    (T, T): True, (T, F): True, (T, E): True, (F, T): True, (F, F): False, (F, E): "err",
    (E, T): True, (E, F): "err", (E, E): "err",
}


@pytest.mark.parametrize("op,table", [("&&", AND_TABLE), ("||", OR_TABLE)])
@pytest.mark.parametrize("mode", ["literal", "dyn", "declared"])
def test_logic_truth_table(op, table, mode):
    for (a, b), want in table.items():
        if mode == "literal":
            src, decls, act = f"{a} {op} {b}", None, {}
        else:
            vals = {T: True, F: False}

            def term(x, name):
                return (name, vals[x]) if x in vals else (x, None)

            (sa, va), (sb, vb) = term(a, "a"), term(b, "b")
            src = f"{sa} {op} {sb}"
            act = {k: v for k, v in (("a", va), ("b", vb)) if v is not None}
            decls = None if mode == "dyn" else {"a": BOOL, "b": BOOL}
        prog = compile(src, decls)
        if want == "err":
            with pytest.raises(CelEvaluationError, match="division by zero"):
                prog.evaluate(act)
        else:
            assert prog.evaluate(act) is want, (src, act)


@pytest.mark.parametrize("src,expected", [
    (f"false && {NB}", False), (f"{NB} && false", False), (f"true || {NB}", True), (f"{NB} || true", True),
    (f"true && {NB}", "err"), (f"{NB} && true", "err"), (f"false || {NB}", "err"), (f"{NB} || false", "err"),
    (f"!{NB}", "err"),
])
def test_logic_non_bool_operands(src, expected):
    if expected == "err":
        assert "no matching overload" in ev_err(src)
    else:
        assert ev(src) is expected


def test_logic_non_bool_is_type_error_when_known():
    with pytest.raises(CelTypeError):
        compile("1 && true", {})
    with pytest.raises(CelTypeError):
        compile("!1", {})
    # dynamic mode: a non-bool operand is an error only if the other side does not decide
    assert ev("false && 32") is False and ev("true || 'horses'") is True and ev("'horses' || true") is True
    assert "no matching overload" in ev_err("'less filling' && 'tastes great'")


# ----------------------------------------------------------- macros
@pytest.mark.parametrize("src,expected", [
    ("[1, 2, 3].all(x, x > 0)", True), ("[1, 2, 3].all(x, x > 1)", False), ("[].all(x, x > 1)", True),
    ("[1, 2, 3].exists(x, x > 2)", True), ("[1, 2, 3].exists(x, x > 3)", False),
    ("[1, 2, 3].exists_one(x, x > 2)", True), ("[1, 2, 3].exists_one(x, x > 1)", False),
    ("[1, 2, 3].map(x, x * 2)", [2, 4, 6]), ("[1, 2, 3].map(x, x > 1, x * 10)", [20, 30]),
    ("[1, 2, 3].filter(x, x != 2)", [1, 3]), ("{'a': 1, 'b': 2}.map(k, k + k)", ["aa", "bb"]),
    ("{'a': 1, 'b': 2}.exists(k, k == 'b')", True), ("{'a': 1, 'b': 2}.all(k, k.size() == 1)", True),
    ("[[1, 2], [3]].exists(l, l.exists(x, x == 3))", True),
    ("[1, 2].exists(x, [3, 4].exists(x, x == 4))", True),  # inner x shadows outer x
])
def test_macros(src, expected):
    assert same(ev(src), expected)


@pytest.mark.parametrize("src,expected", [
    ("[0, 1].exists(x, 1 / x == 1)", True),    # error absorbed by a later true
    ("[1, 0].exists(x, 1 / x == 1)", True),
    ("[0, 2].exists(x, 1 / x == 1)", "err"),
    ("[0, 2].all(x, 1 / x == 1)", False),      # false wins over the error
    ("[2, 0].all(x, 1 / x == 1)", False),
    ("[0, 1].all(x, 1 / x == 1)", "err"),
    ("[0, 1].exists_one(x, 1 / x == 1)", "err"),
    ("[0, 1].map(x, 1 / x)", "err"),
    ("[0, 1].filter(x, 1 / x == 1)", "err"),
])
def test_macro_error_semantics(src, expected):
    if expected == "err":
        assert "division by zero" in ev_err(src)
    else:
        assert ev(src) is expected


def test_macro_variable_scope_is_local(decls):
    with pytest.raises(CelTypeError) as ei:
        compile("[1].exists(x, x > 0) && x > 0", {"y": INT})
    assert [i.code for i in ei.value.issues] == ["undeclared"]
    # a macro variable shadows a declared name of another type
    assert compile("[1, 2].exists(y, y == 2)", {"y": STRING}).evaluate({"y": "s"}) is True


def test_iteration_limit():
    prog = compile("xs.all(a, xs.all(b, a + b >= 0))", {"xs": ListType(INT)}, max_iterations=1000)
    assert prog.evaluate({"xs": list(range(30))}) is True  # 30 + 30*30 = 930
    with pytest.raises(CelEvaluationError, match="iteration limit"):
        prog.evaluate({"xs": list(range(40))})
    # the budget is per evaluation
    assert prog.evaluate({"xs": list(range(30))}) is True


# ----------------------------------------------------------- functions
@pytest.mark.parametrize("src,expected", [
    ("size('héllo')", 5), ("'héllo'.size()", 5), ("size(b'ab')", 2), ("size([1, 2])", 2), ("size({'a': 1})", 1),
    ("'hello'.contains('ell')", True), ("'hello'.startsWith('he')", True), ("'hello'.endsWith('lo')", True),
    ("'hello'.endsWith('he')", False), ("'hello'.matches('l+')", True), ("'hello'.matches('^l')", False),
    ("matches('abc', 'b')", True), ("'abc'.matches('^[a-c]+$')", True),
    ("int('42')", 42), ("int('-42')", -42), ("int(3.9)", 3), ("int(-3.9)", -3), ("int(5u)", 5),
    ("uint(5)", CelUint(5)), ("uint('7')", CelUint(7)), ("uint(2.5)", CelUint(2)), ("double(3)", 3.0),
    ("double('2.5')", 2.5), ("double(4u)", 4.0), ("string(12)", "12"), ("string(1.5)", "1.5"),
    ("string(true)", "true"), ("string(b'hi')", "hi"), ("string(3u)", "3"), ("bool('true')", True),
    ("bool('false')", False), ("bytes('hi')", b"hi"), ("dyn(3)", 3),
    ("string(duration('90m'))", "5400s"), ("string(timestamp('2024-01-01T10:00:00+02:00'))", "2024-01-01T08:00:00Z"),
    ("int(timestamp('1970-01-01T00:01:00Z'))", 60), ("timestamp(60) == timestamp('1970-01-01T00:01:00Z')", True),
])
def test_functions(src, expected):
    assert same(ev(src), expected)


@pytest.mark.parametrize("src,msg", [
    ("int('x')", "cannot convert"), ("int(1e19)", "overflow"), ("uint(-1)", "overflow"), ("double('x')", "cannot convert"),
    ("bool('maybe')", "cannot convert"), ("string(b'\\xff')", "UTF-8"), ("int(x)", "overflow"),
    ("duration(x)", "invalid duration"), ("timestamp(x)", "invalid timestamp"), ("x.matches(x + '(a')", "invalid"),
])
def test_function_errors(src, msg):
    act = {"x": {"int(x)": 2.0**70, "duration(x)": "5 parsecs", "timestamp(x)": "yesterday"}.get(src, "abc")}
    assert msg in ev_err(src, act)


@pytest.mark.parametrize("value,expected", [
    (3.9, 3), (-3.9, -3), (0.0, 0), (-(2.0**63), "overflow"), (-(2.0**63) + 1024, -(2**63) + 1024),
    (2.0**63 - 1024, 2**63 - 1024),
    (2.0**63, "overflow"), (math.inf, "overflow"), (-math.inf, "overflow"), (math.nan, "overflow"),
])
def test_int_of_a_declared_double_matches_the_dynamic_conversion(value, expected):
    # A double known statically takes a shortcut; a dyn value goes through the general conversion.
    for decls in ({"x": DOUBLE}, {"x": DYN}):
        if isinstance(expected, str):
            assert expected in ev_err("int(x)", {"x": value}, decls)
        else:
            assert same(ev("int(x)", {"x": value}, decls), expected)


@pytest.mark.parametrize("value", [0, 7, -3, 2**63 - 1, -(2**63)])
def test_string_of_a_declared_int_matches_the_dynamic_conversion(value):
    assert ev("string(x)", {"x": value}, {"x": INT}) == ev("string(x)", {"x": value}, {"x": DYN}) == str(value)


def test_matches_rejects_non_re2_patterns():
    with pytest.raises(CelTypeError) as ei:
        compile(r"'aa'.matches('(a)\\1')")
    assert ei.value.issues[0].code == "bad-regex"
    assert "regular expression" in ev_err("s.matches(p)", {"s": "aa", "p": "(a)\\1"})


def test_literal_regex_is_compiled_once():
    prog = compile("s.matches('^claude-(opus|sonnet)')", {"s": STRING})
    assert "_rx" in prog.python_source and "_matches" not in prog.python_source
    assert prog.evaluate({"s": "claude-opus-4"}) is True


# ----------------------------------------------------------- time
def test_timestamp_and_duration_arithmetic():
    t = ev("timestamp('2024-01-01T00:00:00Z')")
    assert t == dt.datetime(2024, 1, 1, tzinfo=UTC) and t.tzinfo is not None
    assert ev("duration('1h30m')") == dt.timedelta(hours=1, minutes=30)
    assert ev("duration('-1.5s')") == dt.timedelta(seconds=-1.5)
    assert ev("duration('1ms') + duration('1us') + duration('1000ns')") == dt.timedelta(microseconds=1002)
    assert ev("timestamp('2024-01-01T00:00:00Z') + duration('24h')") == dt.datetime(2024, 1, 2, tzinfo=UTC)
    assert ev("duration('1h') + timestamp('2024-01-01T00:00:00Z')") == dt.datetime(2024, 1, 1, 1, tzinfo=UTC)
    assert ev("timestamp('2024-01-01T00:00:00Z') - duration('1s')") == dt.datetime(2023, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert ev("timestamp('2024-01-02T00:00:00Z') - timestamp('2024-01-01T00:00:00Z')") == dt.timedelta(days=1)
    assert ev("duration('1h') - duration('30m')") == dt.timedelta(minutes=30)
    assert ev("-duration('1h')") == dt.timedelta(hours=-1)
    assert "out of range" in ev_err("timestamp('9999-12-31T23:59:59Z') + duration('1s')")


@pytest.mark.parametrize("fn,expected", [
    ("getFullYear()", 2024), ("getMonth()", 2), ("getDayOfYear()", 74), ("getDayOfMonth()", 14), ("getDate()", 15),
    ("getDayOfWeek()", 5), ("getHours()", 14), ("getMinutes()", 30), ("getSeconds()", 5), ("getMilliseconds()", 250),
    ("getHours('America/New_York')", 10), ("getHours('+05:30')", 20), ("getMinutes('+05:30')", 0),
    ("getHours('-08:00')", 6), ("getDayOfWeek('Asia/Tokyo')", 5), ("getDate('Pacific/Kiritimati')", 16),
])
def test_timestamp_accessors(act, fn, expected):
    assert ev(f"now.{fn}", act, {"now": compile.__globals__["TIMESTAMP"]}) == expected
    assert ev(f"now.{fn}", act) == expected  # dynamic


def test_duration_accessors():
    assert ev("duration('3h25m').getHours()") == 3
    assert ev("duration('3h25m').getMinutes()") == 205
    assert ev("duration('-90s').getMinutes()") == -1
    assert ev("duration('1.5s').getMilliseconds()") == 500


def test_bad_timezone():
    with pytest.raises(CelTypeError) as ei:
        compile("now.getHours('Mars/Olympus')", {"now": compile.__globals__["TIMESTAMP"]})
    assert ei.value.issues[0].code == "bad-timezone"
    assert "unknown time zone" in ev_err("now.getHours(tz)", {"now": dt.datetime.now(UTC), "tz": "Nope/Nope"})


# ----------------------------------------------------------- typed programs on declared schemas
def test_declared_fields(decls, act):
    assert ev("request.input_tokens > 1000 && context.interactive", act, decls) is True
    assert ev("request.model.startsWith('claude-opus')", act, decls) is True
    assert ev("'fast-mode' in request.betas", act, decls) is True
    assert ev("context.labels.exists(k, k == 'tier' && context.labels[k] == 'vip')", act, decls) is True
    assert ev("has(request.temperature) ? request.temperature : 1.0", act, decls) == 1.0
    assert ev("request.service_tier == null", act, decls) is True
    assert "no such key" in ev_err("request.temperature > 0.5", act, decls)
    act["request"]["temperature"] = 0.7
    assert ev("request.temperature > 0.5", act, decls) is True


def test_missing_variable_is_evaluation_error(decls):
    prog = compile("request.max_tokens > 1", decls)
    with pytest.raises(CelEvaluationError, match="no value for variable 'request'"):
        prog.evaluate({})


def test_expect_dyn_result_checked_at_runtime():
    prog = compile("x", None, expect=BOOL)
    assert prog.evaluate({"x": True}) is True
    with pytest.raises(CelEvaluationError, match="expected bool"):
        prog.evaluate({"x": "yes"})
    prog = compile("m['k']", {"m": MapType(STRING, DYN)}, expect=STRING)
    assert prog.evaluate({"m": {"k": "v"}}) == "v"
    with pytest.raises(CelEvaluationError):
        prog.evaluate({"m": {"k": 1}})


def test_uint_is_distinct_runtime_type():
    assert type(ev("1u + 2u")) is CelUint
    assert ev("x + 1u", {"x": CelUint(1)}, {"x": UINT}) == 2
    with pytest.raises(CelTypeError):
        compile("1u + 1", {})
    assert "no matching overload" in ev_err("dyn(1u) + 1")
    assert "no matching overload" in ev_err("1u + 1")
    assert repr(CelUint(3)) == "3u"


def test_tuples_and_mappings_accepted(decls):
    import types

    assert ev("x + [3]", {"x": (1, 2)}) == [1, 2, 3]
    assert ev("x == [1, 2]", {"x": (1, 2)}) is True
    assert ev("x['a']", {"x": types.MappingProxyType({"a": 1})}) == 1
    assert ev("size(x)", {"x": (1, 2)}, {"x": ListType(INT)}) == 2


def test_map_literal_errors():
    assert "duplicate map key" in ev_err("{x: 1, y: 2}", {"x": "a", "y": "a"})
    with pytest.raises(CelTypeError) as ei:
        compile("{'a': 1, 'a': 2}")
    assert ei.value.issues[0].code == "duplicate-key"


def test_regex_fallback_without_re2(monkeypatch):
    from policy_engine.cel import runtime as rt

    monkeypatch.setattr(rt, "_re2", None)
    rt.compile_regex.cache_clear()
    rt.make_matcher.cache_clear()
    try:
        for pattern in [r"(a)\1", r"(?=a)", r"(?!a)", r"(?<=a)b", r"(?<!a)b", r"(?P<x>a)(?P=x)", r"(?>a)", r"a*+"]:
            assert "RE2 does not support" in rt.regex_problem(pattern), pattern
            with pytest.raises(CelTypeError):
                compile(f"'a'.matches({pattern!r})")
        assert ev("'claude-opus'.matches('^claude-(opus|sonnet)$')") is True
        assert ev("s.matches(p)", {"s": "abc", "p": "b+"}) is True
        assert "RE2 does not support" in ev_err("s.matches(p)", {"s": "aa", "p": "(a)\\1"})
    finally:
        rt.compile_regex.cache_clear()
        rt.make_matcher.cache_clear()


def test_duration_negation_and_range():
    # durations hold what an int64 count of nanoseconds holds (about +/-292 years), as in cel-go
    assert ev("-duration('90m')") == dt.timedelta(minutes=-90)
    assert "out of range" in ev_err("duration(x)", {"x": "2562048h"})
    assert "out of range" in ev_err("duration('2562047h') + duration('1h')")
    assert ev("duration(x) > duration('0s')", {"x": "2562047h"}) is True
    assert "out of range" in ev_err("timestamp('9999-12-31T23:59:59Z') - timestamp('0001-01-01T00:00:00Z')")
    assert ev("timestamp('2262-01-01T00:00:00Z') - timestamp('1970-01-01T00:00:00Z') > duration('0s')") is True


def test_deep_nesting_is_a_clean_error():
    src = "-(" * 3000 + "1" + ")" * 3000  # parentheses alone nest nothing; 3000 negations do
    with pytest.raises(compile.__globals__["CelSyntaxError"], match="nested more than"):
        compile(src)
