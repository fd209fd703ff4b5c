"""Type checker, syntax errors, positions, references, cost and generated code shape."""

import re

import pytest

from policy_engine.cel import (
    BOOL, DOUBLE, DYN, INT, STRING, CelError, CelEvaluationError, CelSyntaxError, CelTypeError, Field, ListType, MapType,
    ObjectType, StringType, compile,
)


def type_issues(src, decls, **kw):
    with pytest.raises(CelTypeError) as ei:
        compile(src, decls, **kw)
    return ei.value.issues


def one(src, decls, **kw):
    issues = type_issues(src, decls, **kw)
    assert len(issues) == 1, issues
    return issues[0]


def test_unknown_field_with_did_you_mean(decls):
    src = "request.input_tokns > 1000"
    i = one(src, decls)
    assert (i.code, i.offset, i.line, i.column) == ("no-such-field", 8, 1, 9)
    assert src[i.offset:i.end_offset] == "input_tokns"
    assert "input_tokens" in i.hint
    assert "Request" in i.message and "input_tokns" in i.message


def test_undeclared_identifier(decls):
    i = one("reqest.model == 'x'", decls)
    assert (i.code, i.offset, i.column) == ("undeclared", 0, 1)
    assert i.hint == "did you mean 'request'?"


def test_unknown_function(decls):
    i = one("request.model.startswith('claude')", decls)
    assert i.code == "undeclared-function" and i.offset == 14
    assert "startsWith" in i.hint


def test_multiline_positions(decls):
    src = "request.input_tokens > 1000 &&\n  context.interactiv &&\n    request.model + 1 == 'x'"
    issues = type_issues(src, decls)
    assert [(i.code, i.line, i.column) for i in issues] == [("no-such-field", 2, 11), ("no-overload", 3, 19)]
    assert src[issues[0].offset:].startswith("interactiv")
    assert src[issues[1].offset] == "+"
    assert "interactive" in issues[0].hint
    text = str(CelTypeError(issues, src))
    assert "2:11" in text and "3:19" in text and "^" in text


def test_all_errors_reported_in_one_compile(decls):
    src = "requst.model == 1 || context.tenat == 'a' || size(1) > 0 || foo(1) || [1].all(x, x) || 1 + 'a' == 2"
    codes = [i.code for i in type_issues(src, decls)]
    assert codes == ["undeclared", "no-such-field", "no-overload", "undeclared-function", "no-overload", "no-overload"]


@pytest.mark.parametrize("src,code,offset", [
    ("1 + 1.0", "no-overload", 2),
    ("'a' - 'b'", "no-overload", 4),
    ("1 < 'a'", "no-overload", 2),
    ("!'a'", "no-overload", 0),
    ("-'a'", "no-overload", 0),
    ("-(1u)", "no-overload", 0),
    ("1 ? 2 : 3", "no-overload", 2),
    ("1 && true", "no-overload", 2),
    ("[1][ 'a' ]", "no-overload", 3),
    ("{'a': 1}[1]", "no-overload", 8),
    ("(1).f", "no-such-field", 4),
    ("has((1).f)", "no-such-field", 8),
    ("size(true)", "no-overload", 0),
    ("'a'.contains(1)", "no-overload", 4),
    ("int(true)", "no-overload", 0),
    ("(1).getHours()", "no-overload", 4),
    ("'a' in [1]", "no-overload", 4),
    ("1.5 % 2.0", "no-overload", 4),
    ("[1].exists(x, x + 1)", "no-overload", 14),
    ("(1).exists(x, true)", "no-overload", 1),
    ("[1].all(x)", "macro-arity", 4),
    ("[1].map(x, x, x, x)", "macro-arity", 4),
    ("[1].exists(x.y, true)", "macro-var", 11),
    ("has(x)", "has-arg", 4),
    ("{'a': 1, 'a': 2}", "duplicate-key", 9),
    ("Msg{a: 1}", "unsupported", 0),
    ("timestamp('nope')", "bad-literal", 10),
    ("duration('1 hour')", "bad-literal", 9),
])
def test_type_error_kinds_and_offsets(src, code, offset):
    i = one(src, {})  # checked mode without variables
    assert (i.code, i.offset) == (code, offset), i
    if code in ("no-overload", "no-such-field", "undeclared-function"):
        # dynamic mode (no declarations at all) checks types at run time, as cel-go's unchecked
        # evaluation does: the same mistake is an evaluation error, which || and && can absorb
        with pytest.raises(CelEvaluationError):
            compile(src).evaluate({})
        assert compile(f"({src}) || true").evaluate({}) is True
    else:
        one(src, None)  # misused macros, bad literals: compile errors in either mode


def test_has_requires_known_field(decls):
    i = one("has(request.temprature)", decls)
    assert i.code == "no-such-field" and "temperature" in i.hint and i.offset == 12


def test_result_type(decls):
    i = one("request.model", decls, expect=BOOL)
    assert i.code == "result-type" and "string" in i.message and "bool" in i.message
    assert compile("request.model", decls, expect=STRING).result_type == STRING
    # dyn results are accepted and checked at run time
    assert compile("context.labels['x'] == 'y'", decls, expect=BOOL).result_type == BOOL
    assert compile("dyn(request.model)", decls, expect=STRING).result_type == DYN


def test_undeclared_in_declared_mode_but_not_dynamic():
    i = one("x + 1", {"y": INT})
    assert i.code == "undeclared" and "'x'" in i.message
    assert compile("x + 1").evaluate({"x": 1}) == 2


def test_dotted_declarations():
    prog = compile("request.model.startsWith('c') && vars.is_long", {"request.model": STRING, "vars.is_long": BOOL})
    assert prog.evaluate({"request.model": "claude", "vars.is_long": True}) is True
    assert prog.references == {"request.model", "vars.is_long"}


def test_references(decls):
    prog = compile(
        "request.model == 'x' || context.labels['a'] == 'b' || has(request.temperature)"
        " || [1].exists(request, request == 1) || now.getHours() > 1 || request.betas.exists(b, b == context.tenant)",
        decls,
    )
    assert prog.references == {"request.model", "context.labels", "request.temperature", "now",
                                "request.betas", "context.tenant"}
    assert compile("vars.is_long", {"vars": ObjectType("Vars", {"is_long": BOOL})}).references == {"vars.is_long"}


@pytest.mark.parametrize("src,line,col", [
    ("1 +", 1, 4),
    ("request.model ==\n  'x' &&", 2, 9),
    ("(1 + 2", 1, 7),
    ("a b", 1, 3),
    ("1 + # 2", 1, 5),
    ("'unterminated", 1, 1),
    ("\n\n   )", 3, 4),
])
def test_syntax_errors(src, line, col):
    with pytest.raises(CelSyntaxError) as ei:
        compile(src, None)
    i = ei.value.issues[0]
    assert (i.code, i.line, i.column) == ("syntax", line, col), i
    assert isinstance(ei.value, CelError)
    assert "^" in str(ei.value)


def test_literal_syntax_errors():
    with pytest.raises(CelSyntaxError) as ei:
        compile("9223372036854775808 + 18446744073709551616u + '\\q'")
    assert [(i.code, i.offset) for i in ei.value.issues] == [("syntax", 0), ("syntax", 22), ("syntax", 46)]


def test_string_literal_escapes():
    assert compile(r"'\x41\101\u00e9\U0001F600\n\t\\\'\"'").evaluate({}) == "AA\u00e9\U0001F600\n\t\\'\""
    assert compile(r"r'\n'").evaluate({}) == "\\n"
    assert compile("'''a\nb'''").evaluate({}) == "a\nb"
    assert compile(r"b'\xff\377é'").evaluate({}) == b"\xff\xff\xc3\xa9"


# ------------------------------------------------------------------ generated code
def _body(prog):
    """The expression the (fast) generated function returns."""
    return prog.python_source.split("\n        return ", 1)[1].splitlines()[0]


def test_static_int_comparison_is_wrapper_free(decls):
    prog = compile("request.input_tokens > 1000 && context.interactive", decls)
    body = _body(prog)
    assert body == "((act['request']['input_tokens'] > 1000) and act['context']['interactive'])"
    assert prog.evaluate({"request": {"input_tokens": 2000}, "context": {"interactive": True}}) is True


def test_fast_paths_have_no_helpers(decls):
    for src in ["request.model.startsWith('claude-opus')", "'fast-mode' in request.betas",
                "request.stream ? request.max_tokens < 100 : !request.has_tools",
                "context.tenant == 'acme' || context.latency_slo_ms <= 500",
                "size(request.betas) == 0", "request.model.matches('^claude')"]:
        body = _body(compile(src, decls))
        # only the precompiled literal-regex matcher (_rxN) may appear as a call
        calls = set(re.findall(r"(?<![\w'])_(?!rx\d)\w+\(", body))
        assert not calls, (src, body)


def test_error_prone_operands_use_absorbing_helper(decls):
    src = "request.temperature > 0.5 || request.stream"
    assert "_or_(" in compile(src, decls).python_source
    assert "_ck(" in compile("request.max_tokens + 1 > 2", decls).python_source


# ------------------------------------------------------------------ cost
def test_comprehension_cost_scales_with_declared_size():
    def cost(n):
        return compile("xs.exists(x, x == 'vip')", {"xs": ListType(StringType(max_size=8), max_size=n)}).cost

    assert cost(10) < cost(100) < cost(1000)
    assert cost(100) - cost(10) == 9 * (cost(20) - cost(10))  # linear in max_size
    unknown = compile("xs.exists(x, x == 'vip')", {"xs": ListType(STRING)}).cost
    assert unknown > cost(100)
    nested = compile("xs.all(a, xs.all(b, a == b))", {"xs": ListType(INT, max_size=10)}).cost
    assert 100 <= nested <= 1000


def test_string_cost_uses_declared_max_size():
    small = compile("s.contains('x')", {"s": StringType(max_size=100)}).cost
    big = compile("s.contains('x')", {"s": STRING.with_max(100_000)}).cost
    assert small < 20 < 1000 < big


def test_max_cost_is_enforced():
    decls = {"xs": ListType(INT, max_size=1000)}
    i = one("xs.all(a, xs.all(b, a != b))", decls, max_cost=10_000)
    assert i.code == "cost" and "exceeds" in i.message
    assert compile("xs.all(a, a > 0)", decls, max_cost=10_000).cost <= 10_000


def test_object_field_types():
    obj = ObjectType("O", {"a": Field(INT, description="an int"), "m": MapType(STRING, ListType(DOUBLE))})
    prog = compile("o.m['k'][0] * 2.0", {"o": obj}, expect=DOUBLE)
    assert prog.result_type == DOUBLE
    assert prog.evaluate({"o": {"a": 1, "m": {"k": [1.5]}}}) == 3.0
