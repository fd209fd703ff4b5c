"""The extension libraries (issue 15, part 2): strings, math, lists, sets, encoders, optionals,
network, cel.bind and the two-variable comprehensions: values, run-time errors, type checking
and cost. Every value test runs in both modes: checked ({} declarations) and dynamic (None)."""

import math

import pytest
from celpy_bridge import same

from policy_engine.cel import (
    BOOL, DOUBLE, DYN, INT, STRING, UINT, CelEvaluationError, CelTypeError, CelUint, ListType, MapType, StringType,
    compile,
)
from policy_engine.cel.types import OptionalType

MODES = pytest.mark.parametrize("decls", [{}, None], ids=["checked", "dynamic"])


def ev(src, decls=None, act=None):
    return compile(src, decls).evaluate(act or {})


def ev_err(src, decls=None, act=None):
    with pytest.raises(CelEvaluationError) as ei:
        ev(src, decls, act)
    return str(ei.value)


def type_error(src, decls=None):
    with pytest.raises(CelTypeError) as ei:
        compile(src, {} if decls is None else decls)
    return ei.value.issues[0]


# ------------------------------------------------------------------ strings
@MODES
@pytest.mark.parametrize("src,expected", [
    ("'tacocat'.charAt(3)", "o"), ("'tacocat'.charAt(7)", ""), ("'©αT'.charAt(1)", "α"),
    ("'tacocat'.indexOf('ac')", 1), ("'tacocat'.indexOf('a', 3)", 5), ("'tacocat'.indexOf('none')", -1),
    ("'ta©o©αT'.indexOf('©', 3)", 4), ("'tacocat'.lastIndexOf('at')", 5), ("'tacocat'.lastIndexOf('')", 7),
    ("'tacocat'.lastIndexOf('a', 3)", 1), ("'bananananana'.lastIndexOf('nana', 7)", 6),
    ("'TacoCÆt'.lowerAscii()", "tacocÆt"), ("'tacoCαt'.upperAscii()", "TACOCαT"),
    ("'{0} days {0} hours'.replace('{0}', '2')", "2 days 2 hours"),
    ("'{0} days {0} hours'.replace('{0}', '2', 1)", "2 days {0} hours"),
    ("'a b c'.split(' ')", ["a", "b", "c"]), ("'a b c'.split(' ', 2)", ["a", "b c"]), ("'a b'.split(' ', 0)", []),
    ("'abc'.split('')", ["a", "b", "c"]),
    ("'tacocat'.substring(4)", "cat"), ("'tacocat'.substring(0, 4)", "taco"), ("'ta©o©αT'.substring(2, 6)", "©o©α"),
    ("' \\f\\n\\r\\t\\vtext  '.trim()", "text"), ("'\\u00a0\\u2000text\\u3000'.trim()", "text"),
    ("'\\u200btext'.trim()", "\u200btext"),
    ("['x', 'y'].join()", "xy"), ("['x', 'y'].join('-')", "x-y"), ("[].join('-')", ""),
    ("'Ta©oCαt'.reverse()", "tαCo©aT"), ("strings.quote('a\"b\\n')", '"a\\"b\\n"'),
    ("'%s is %d, %.2f, %x, %X, %o, %b, %e'.format(['x', 3, 1.005, 255, 'hi', 8, 5, 1052.03])",
     "x is 3, 1.00, ff, 6869, 10, 101, 1.052030e+03"),
    ("'%s'.format([[1, 'a', null, 2.5, {'k': true}]])", "[1, a, null, 2.5, {k: true}]"),
    ("'%%%s%%'.format(['t'])", "%t%"), ("'%d'.format([double('NaN')])", "NaN"),
])
def test_strings(src, expected, decls):
    assert same(ev(src, decls), expected)


@MODES
@pytest.mark.parametrize("src,msg", [
    ("'tacocat'.charAt(30)", "out of range"), ("'tacocat'.indexOf('a', 30)", "out of range"),
    ("'tacocat'.lastIndexOf('a', -1)", "out of range"), ("'tacocat'.substring(40)", "out of range"),
    ("'tacocat'.substring(4, 3)", "invalid substring range"), ("'%a'.format([1])", "unrecognized formatting clause"),
    ("'%d %d'.format([1])", "index 1 out of range"), ("'%b'.format(['x'])", "binary"),
])
def test_string_errors(src, msg, decls):
    assert msg in ev_err(src, decls)


def test_string_functions_are_type_checked():
    assert type_error("'a'.charAt('x')").code == "no-overload"
    assert type_error("(1).indexOf('a')").code == "no-overload"
    assert type_error("[1, 2].join()").code == "no-overload"  # join needs list(string)
    assert compile("'a'.split(',')", {}).result_type == ListType(STRING)
    assert compile("s.charAt(0)", {"s": STRING}).result_type == STRING
    # dynamic operands are checked at run time
    assert "no matching overload" in ev_err("x.charAt(0)", {"x": DYN}, {"x": 1})


def test_string_functions_are_counted_by_the_cost_estimator():
    def cost(src, n):
        return compile(src, {"s": StringType(max_size=n)}).cost

    for src in ["s.lowerAscii()", "s.indexOf('a')", "s.split(',')", "s.replace('a', 'b')", "s.trim()"]:
        assert cost(src, 10) < cost(src, 1000) < cost(src, 100_000), src
    assert compile("s.lowerAscii()", {"s": STRING}).cost > cost("s.lowerAscii()", 1000)  # unknown size: default


# ------------------------------------------------------------------ math
@MODES
@pytest.mark.parametrize("src,expected", [
    ("math.greatest(1, 2.5, 3u)", CelUint(3)), ("math.greatest([5.4, 10, 3u])", 10), ("math.least(-1, 0.5)", -1),
    ("math.least([1])", 1), ("math.ceil(1.2)", 2.0), ("math.floor(-1.2)", -2.0), ("math.round(-1.5)", -2.0),
    ("math.round(2.5)", 3.0), ("math.trunc(-1.7)", -1.0), ("math.abs(-5)", 5), ("math.abs(-1.5)", 1.5),
    ("math.sign(-3)", -1), ("math.sign(0u)", CelUint(0)), ("math.sign(2.5)", 1.0),
    ("math.isNaN(0.0 / 0.0)", True), ("math.isInf(1.0 / 0.0)", True), ("math.isFinite(1.5)", True),
    ("math.bitAnd(6, 3)", 2), ("math.bitOr(1u, 2u)", CelUint(3)), ("math.bitXor(1, 3)", 2), ("math.bitNot(0)", -1),
    ("math.bitNot(0u)", CelUint(2**64 - 1)), ("math.bitShiftLeft(1, 63)", -(2**63)), ("math.bitShiftLeft(1, 64)", 0),
    ("math.bitShiftRight(-1, 60)", 15), ("math.bitShiftRight(1024u, 3)", CelUint(128)), ("math.sqrt(16)", 4.0),
])
def test_math(src, expected, decls):
    assert same(ev(src, decls), expected)


@MODES
@pytest.mark.parametrize("src,msg", [
    ("math.greatest([])", "no arguments"), ("math.abs(-9223372036854775807 - 1)", "overflow"),
    ("math.bitShiftLeft(1, -1)", "negative offset"), ("math.greatest(dyn('a'))", "no matching overload"),
])
def test_math_errors(src, msg, decls):
    assert msg in ev_err(src, decls)


def test_math_is_type_checked():
    assert type_error("math.greatest('a', 1)").code == "no-overload"
    assert type_error("math.ceil(1)").code == "no-overload"  # doubles only
    assert type_error("math.bitAnd(1, 2u)").code == "no-overload"
    assert compile("math.greatest(1, 2)", {}).result_type == INT
    assert compile("math.greatest(1, 2.0)", {}).result_type == DYN  # the winner's type is known at run time
    assert compile("math.bitOr(1u, 2u)", {}).result_type == UINT
    assert compile("math.isNaN(x)", {"x": DOUBLE}).result_type == BOOL


def test_a_declared_variable_shadows_a_library_namespace():
    decls = {"math": MapType(STRING, INT)}
    assert compile("math.least", decls).evaluate({"math": {"least": 7}}) == 7
    assert type_error("math.least(1, 2)", decls).code == "undeclared-function"


# ------------------------------------------------------------------ lists and sets
@MODES
@pytest.mark.parametrize("src,expected", [
    ("[1, 2, 3, 4].slice(1, 3)", [2, 3]), ("[1, 2].slice(2, 2)", []), ("[1, [2, [3]]].flatten()", [1, 2, [3]]),
    ("[1, [2, [3]]].flatten(2)", [1, 2, 3]), ("[3, 1, 2].sort()", [1, 2, 3]), ("['b', 'a'].sort()", ["a", "b"]),
    ("[{'n': 2}, {'n': 1}].sortBy(e, e.n)", [{"n": 1}, {"n": 2}]), ("['bb', 'a', 'ccc'].sortBy(s, -size(s))", ["ccc", "bb", "a"]),
    ("[1, 2, 1, 2.0, 3u].distinct()", [1, 2, CelUint(3)]), ("[1, 2, 3].reverse()", [3, 2, 1]), ("lists.range(3)", [0, 1, 2]),
    ("[1, 2].first().value()", 1), ("[1, 2].last().value()", 2), ("[].first().hasValue()", False),
    ("[1, 2, 1].indexOf(1)", 0), ("[1, 2, 1].lastIndexOf(1)", 2), ("[1, 2].indexOf(3)", -1), ("[1, 2, 2].isSorted()", True),
    ("[2, 1].isSorted()", False), ("[1, 2, 3].sum()", 6), ("[1.5, 2.5].sum()", 4.0), ("[].sum()", 0),
    ("[duration('1s'), duration('2s')].sum() == duration('3s')", True), ("[3, 1, 2].min()", 1), ("['a', 'c'].max()", "c"),
    ("sets.contains([1, 2, 3], [3, 1])", True), ("sets.contains([1, 2], [4])", False), ("sets.contains([1], [])", True),
    ("sets.equivalent([1, 2, 2], [2, 1])", True), ("sets.equivalent([1], [1, 2])", False),
    ("sets.intersects([1, 2], [2.0, 5])", True), ("sets.intersects([1], [])", False),
])
def test_lists_and_sets(src, expected, decls):
    assert same(ev(src, decls), expected)


@MODES
@pytest.mark.parametrize("src,msg", [
    ("[1, 2].slice(1, 3)", "list is length 2"), ("[1, 2].slice(2, 1)", "start index"), ("[1, 'a'].sort()", "same type"),
    ("[[1], [2]].sort()", "comparable"), ("[1].flatten(-1)", "non-negative"), ("[].min()", "empty"),
    ("[9223372036854775807, 1].sum()", "overflow"), ("['a'].sum()", "no matching overload"),
])
def test_list_errors(src, msg, decls):
    assert msg in ev_err(src, decls)


def test_lists_are_type_checked_and_costed():
    assert str(compile("[3, 1].sort()", {}).result_type) == "list(int)"
    assert str(compile("[[1], [2]].flatten()", {}).result_type) == "list(int)"
    assert compile("[1].first()", {}).result_type == OptionalType(INT)
    assert type_error("'abc'.sort()").code == "no-overload"
    assert type_error("sets.contains([1], 1)").code == "no-overload"

    def cost(src, n):
        return compile(src, {"xs": ListType(INT, max_size=n)}).cost

    for src in ["xs.sort()", "xs.distinct()", "xs.slice(0, 1)", "sets.contains(xs, [1])", "xs.sortBy(x, -x)",
                "xs.indexOf(1)", "xs.sum()", "xs.max()", "xs.isSorted()"]:
        assert cost(src, 10) < cost(src, 1000), src


# ------------------------------------------------------------------ encoders
@MODES
def test_base64(decls):
    assert ev("base64.encode(b'hello')", decls) == "aGVsbG8="
    assert ev("base64.decode('aGVsbG8=')", decls) == b"hello"
    assert ev("base64.decode('aGVsbG8')", decls) == b"hello"  # padding optional
    assert "invalid base64" in ev_err("base64.decode('a*b')", decls)
    assert type_error("base64.encode('text')").code == "no-overload"


# ------------------------------------------------------------------ optionals
@MODES
@pytest.mark.parametrize("src,expected", [
    ("optional.of(1).hasValue()", True), ("optional.none().hasValue()", False), ("optional.of(null).hasValue()", True),
    ("optional.ofNonZeroValue('').hasValue()", False), ("optional.ofNonZeroValue([1]).value()", [1]),
    ("optional.none().orValue(42)", 42), ("optional.of(1).orValue(42)", 1), ("optional.none().or(optional.of(2)).value()", 2),
    ("optional.of(42).optMap(y, y + 1).value()", 43), ("optional.none().optMap(y, y + 1).hasValue()", False),
    ("{'k': {'s': 'v'}}.?k.optFlatMap(m, m.?s).value()", "v"), ("{}.?k.optFlatMap(m, m.?s).hasValue()", False),
    ("{'a': 1}.?a.value()", 1), ("{'a': 1}.?b.hasValue()", False), ("{'a': 1}.?b.c.hasValue()", False),
    ("[1, 2][?1].value()", 2), ("[1, 2][?5].hasValue()", False), ("{1: 'x'}[?1].value()", "x"),
    ("optional.of({'c': {'i': 'v'}}).c.i.value()", "v"), ("optional.of({'c': {}}).c['i'].orValue('d')", "d"),
    ("[?optional.of(1), ?optional.none(), 3]", [1, 3]), ("{?'a': optional.of(1), ?'b': optional.none()}", {"a": 1}),
    ("has({'x': {'y': 1}}.?x.y)", True), ("has({}.?x.y)", False),
    ("optional.of(1) == optional.of(1)", True), ("optional.none() != optional.of(1)", True),
    ("type(optional.none()) == optional_type", True),
])
def test_optionals(src, expected, decls):
    assert same(ev(src, decls), expected)


@MODES
def test_optional_errors(decls):
    assert "optional.none() dereference" in ev_err("optional.none().value()", decls)
    assert ev_err("{'a': dyn(null)}.?a.b.hasValue()", decls)  # null has no fields


def test_optionals_are_type_checked():
    assert compile("optional.of(1)", {}).result_type == OptionalType(INT)
    assert compile("optional.of(1).value() + 1", {}).result_type == INT
    assert compile("m.?k", {"m": MapType(STRING, DOUBLE)}).result_type == OptionalType(DOUBLE)
    assert compile("m[?'k'].orValue(0.0)", {"m": MapType(STRING, DOUBLE)}).result_type == DOUBLE
    assert type_error("optional.of(1).value() + 'a'").code == "no-overload"
    assert type_error("(1).?x").code == "no-such-field"
    assert type_error("[?1]").code == "no-overload"  # an optional element must be an optional
    assert type_error("(1).optMap(x, x)").code == "no-overload"


# ------------------------------------------------------------------ network (Kubernetes)
@MODES
@pytest.mark.parametrize("src,expected", [
    ("string(ip('192.168.0.1'))", "192.168.0.1"), ("isIP('1.2.3.4')", True), ("isIP('1.2.3')", False),
    ("ip.isCanonical('2001:DB8::68')", False), ("ip('2001:db8::68').family()", 6), ("ip('127.0.0.1').isLoopback()", True),
    ("ip('192.168.0.1').isGlobalUnicast()", True), ("ip('255.255.255.255').isGlobalUnicast()", False),
    ("ip('::ffff:c0a8:1') == ip('192.168.0.1')", True), ("cidr('10.0.0.0/8').containsIP('10.1.2.3')", True),
    ("cidr('10.0.0.0/8').containsIP(ip('::1'))", False), ("cidr('10.0.0.0/8').containsCIDR('10.1.0.0/16')", True),
    ("cidr('192.168.0.1/24').masked() == cidr('192.168.0.0/24')", True), ("cidr('10.0.0.0/8').prefixLength()", 8),
    ("type(cidr('10.0.0.0/8')) == net.CIDR", True), ("type(ip('::1')) == net.IP", True), ("isCIDR('10.0.0.0/33')", False),
])
def test_network(src, expected, decls):
    assert same(ev(src, decls), expected)


def test_network_errors():
    assert "zone" in ev_err("ip('fe80::1%en0')")
    assert "IPv4-mapped" in ev_err("ip('::ffff:192.168.0.1')")
    assert "parse error" in ev_err("cidr('10.0.0.0/')")
    assert type_error("isIP(cidr('10.0.0.0/8'))").code == "no-overload"


# ------------------------------------------------------------------ cel.bind, two-variable comprehensions
@MODES
@pytest.mark.parametrize("src,expected", [
    ("cel.bind(x, 'ab', x + x)", "abab"), ("cel.bind(a, 1, cel.bind(b, 2, a + b))", 3),
    ("cel.bind(xs, [1, 2], [2, 3].exists(e, e in xs))", True),
    ("[10, 20].all(i, v, v == (i + 1) * 10)", True), ("{'a': 1, 'b': 2}.exists(k, v, k == 'b' && v == 2)", True),
    ("[5, 7, 8].existsOne(i, v, v % 5 == i)", True), ("[1, 2].existsOne(x, x > 0)", False),
    ("[2, 4].transformList(i, v, v * 10 + i)", [20, 41]), ("[2, 4, 6].transformList(i, v, i != 1, v)", [2, 6]),
    ("{'a': 1}.transformMap(k, v, v + 1)", {"a": 2}), ("{'a': 1, 'b': 2}.transformMap(k, v, v > 1, k + 'x')", {"b": "bx"}),
    ("{'a': 1}.transformMapEntry(k, v, {v: k})", {1: "a"}), ("[5, 6].transformMap(i, v, v * 2)", {0: 10, 1: 12}),
])
def test_bind_and_two_variable_comprehensions(src, expected, decls):
    assert same(ev(src, decls), expected)


def test_bind_and_comprehensions_are_checked():
    assert compile("cel.bind(x, 1, x + 1)", {}).result_type == INT
    assert str(compile("{'a': 1}.transformMap(k, v, v > 0)", {}).result_type) == "map(string, bool)"
    assert str(compile("[1].transformList(i, v, i)", {}).result_type) == "list(int)"
    assert type_error("cel.bind(x, 1, x + 'a')").code == "no-overload"
    assert type_error("cel.bind(x.y, 1, 2)").code == "macro-var"
    assert type_error("[1].all(i, i, true)").code == "macro-var"  # the two variables must differ
    assert type_error("{'a': 1}.transformMapEntry(k, v, 1)").code == "no-overload"
    assert "divide" in ev_err("{'a': 0}.transformMap(k, v, 4 / v)") or "division" in ev_err("{'a': 0}.transformMap(k, v, 4 / v)")
    assert "duplicate map key" in ev_err("{'a': 1, 'b': 1}.transformMapEntry(k, v, {v: k})")
    assert compile("xs.all(i, v, v > i)", {"xs": ListType(INT, max_size=10)}).cost < \
        compile("xs.all(i, v, v > i)", {"xs": ListType(INT, max_size=100)}).cost
    assert math.isfinite(compile("cel.bind(x, [1, 2], x.map(e, e))", {}).cost)
