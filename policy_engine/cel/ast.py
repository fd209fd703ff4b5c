"""A small CEL AST built from celpy's lark parse tree, with exact source offsets.

`_Builder` makes the nodes from lark's tree; `lalr.py` is the fast path that makes the same
nodes with the same builder, straight from lark's LALR tables, and leaves lark's path (below)
every source that does not parse cleanly."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import lark
from lark import Lark, Token, Tree
from lark.exceptions import LexError, UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from .cache import PARSES
from .errors import CelIssue, CelSyntaxError, line_col

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1

MAX_EXPRESSION_CHARS = 100_000
"""Longest CEL source compiled (cel-go's default code point limit): parse time and memory stay bounded."""
MAX_NESTING = 64
"""Deepest nesting of sub-expressions (calls, operators, selections, indexes, literals, macros).
A chain of `||` or `&&` counts once, however long, and parentheses alone add nothing."""

# Rules of cel-python's grammar that, with one child, only pass it through (a parenthesised
# expression is ten of them): inlined (`?rule`), so the builder never recurses through them.
_PASS_THROUGH = frozenset({"expr", "conditionalor", "conditionaland", "relation", "addition", "multiplication",
                           "unary", "member", "primary", "paren_expr"})


@dataclass(eq=False)
class Node:
    offset: int
    end: int
    # filled by the checker
    type: Any = field(default=None, init=False, repr=False)
    can_error: bool = field(default=True, init=False, repr=False)
    start: int = field(default=-1, init=False, repr=False)  # first character of the sub-expression


@dataclass(eq=False)
class Lit(Node):
    value: Any
    kind: str  # int uint double string bytes bool null


@dataclass(eq=False)
class Ident(Node):
    name: str
    root: bool = False  # written with a leading dot: `.name`


@dataclass(eq=False)
class Select(Node):
    operand: Node
    field: str
    test_only: bool = False  # has()


@dataclass(eq=False)
class OptSelect(Node):
    """``operand.?field``: an optional of the field, none when it is absent (optional syntax)."""

    operand: Node
    field: str


@dataclass(eq=False)
class Index(Node):
    operand: Node
    index: Node


@dataclass(eq=False)
class Call(Node):
    """Function, method or operator call. Operators use names like ``_+_``, ``!_``, ``_[_]``."""

    function: str
    args: list[Node]
    target: Node | None = None


@dataclass(eq=False)
class Cond(Node):
    cond: Node
    then: Node
    other: Node


@dataclass(eq=False)
class ListLit(Node):
    items: list[Node]
    optional: frozenset[int] = frozenset()  # indexes of `?elem` items (included only when present)


@dataclass(eq=False)
class MapLit(Node):
    entries: list[tuple[Node, Node]]
    optional: frozenset[int] = frozenset()  # indexes of `?key: value` entries


@dataclass(eq=False)
class ObjLit(Node):
    type_name: str
    fields: list[tuple[str, int, Node]]


@dataclass(eq=False)
class Comprehension(Node):
    """A macro: all, exists, exists_one, map, filter."""

    macro: str
    range: Node
    var: str
    var_offset: int
    body: Node  # predicate (or transform for map)
    filter: Node | None = None  # 3-arg map's filter
    var2: str | None = None  # two-variable forms: `var` is the index/key, `var2` the value
    var2_offset: int = -1


@dataclass(eq=False)
class Bind(Node):
    """``cel.bind(var, init, body)``: ``body`` with ``var`` bound to the value of ``init``."""

    var: str
    var_offset: int
    init: Node
    body: Node


@dataclass(eq=False)
class OptMap(Node):
    """``opt.optMap(var, expr)`` / ``opt.optFlatMap(var, expr)``."""

    macro: str
    target: Node
    var: str
    var_offset: int
    body: Node


@dataclass(eq=False)
class Invalid(Node):
    """Stands for a misused macro (already reported): typed ``dyn`` so no second error follows."""


# macro name -> accepted argument counts; the two-variable forms (cel-go's ext.TwoVarComprehensions)
# take one more.
MACROS = {"all": (2, 3), "exists": (2, 3), "exists_one": (2,), "existsOne": (2, 3), "map": (2, 3), "filter": (2,),
          "transformList": (3, 4), "transformMap": (3, 4), "transformMapEntry": (3, 4),
          "optMap": (2,), "optFlatMap": (2,), "sortBy": (2,)}
_TWO_VAR_ONLY = {"transformList", "transformMap", "transformMapEntry"}

_PARSER: Lark | None = None


def _ambiguous_literals(t: Token) -> Token:
    """true/false lex as IDENT; retype them as BOOL_LIT keeping the token position."""
    if t.value in ("true", "false"):
        return Token.new_borrow_pos("BOOL_LIT", t.value, t)
    return t


# cel-python's grammar predates parts of the current cel-spec syntax. We extend its text before
# building the parser (rule names stay cel-python's; new rules are ours): backtick-quoted field
# names (m.`content-type`), optional selection and indexing (a.?b, a[?i]), optional list
# elements and map entries ([?x], {?k: v}) and trailing commas in list and map literals.
_GRAMMAR_EDITS = (
    ("member         : member_dot | member_dot_arg | member_index | member_object | primary",
     "member         : member_dot | member_dot_arg | member_index | member_object | primary\n"
     "               | member_dot_opt | member_index_opt"),
    ('member_dot     : member "." IDENT',
     'member_dot     : member "." (IDENT | QUOTED_IDENT)\n'
     'member_dot_opt : member "." "?" (IDENT | QUOTED_IDENT)\n'
     'member_index_opt : member "[" "?" expr "]"'),
    ('list_lit       : "[" [exprlist] "]"',
     'list_lit       : "[" [listinits] "]"\n'
     'listinits      : (expr | opt_elem) ("," (expr | opt_elem))* [","]\n'
     'opt_elem       : "?" expr'),
    ('mapinits       : expr ":" expr ("," expr ":" expr)*',
     'mapinits       : (map_entry | opt_entry) ("," (map_entry | opt_entry))* [","]\n'
     'map_entry      : expr ":" expr\n'
     'opt_entry      : "?" expr ":" expr'),
    ('IDENT          : /[_a-zA-Z][_a-zA-Z0-9]*/',
     'IDENT          : /[_a-zA-Z][_a-zA-Z0-9]*/\n\n'
     'QUOTED_IDENT   : /`[_a-zA-Z0-9.\\/ -]+`/'),
)


def _extend_grammar(grammar: str) -> str:
    for old, new in _GRAMMAR_EDITS:
        if old not in grammar:  # pragma: no cover - a cel-python upgrade changed its grammar
            raise RuntimeError(f"cel-python's grammar changed; cannot extend the rule {old.split(':')[0].strip()!r}")
        grammar = grammar.replace(old, new, 1)
    return grammar


def _field_name(tok: Token) -> str:
    text = str(tok)
    return text[1:-1] if tok.type == "QUOTED_IDENT" else text


def _inline_pass_through(grammar: str) -> str:
    """Mark the pass-through rules `?rule` (lark's "inline when it has one child").

    Parsing `a.b > 1` otherwise builds a tree through every precedence level for each operand,
    some 36 trees for a typical policy expression, and the builder would recurse through
    each level: ten Python frames for every pair of parentheses."""
    for name in _PASS_THROUGH:
        grammar, found = re.subn(rf"^{name}(\s*):", rf"?{name}\1:", grammar, count=1, flags=re.M)
        if not found:  # pragma: no cover - a cel-python upgrade renamed a rule
            raise RuntimeError(f"cel-python's grammar changed: no rule {name!r} to inline")
    return grammar


def _parser() -> Lark:
    global _PARSER
    if _PARSER is None:
        import celpy.celparser as cp

        grammar = _inline_pass_through(_extend_grammar((Path(cp.__file__).parent / "cel.lark").read_text()))
        _PARSER = Lark(
            grammar,
            parser="lalr",
            start="expr",
            g_regex_flags=re.M,
            lexer_callbacks={"IDENT": _ambiguous_literals},
            propagate_positions=True,
            maybe_placeholders=False,
            priority="invert",
            # The basic lexer tokenises a third faster than lark's default contextual one, which
            # also let the keywords `in` and `null` through as identifiers (`a.in`, `4 % in`).
            lexer="basic",
        )
    return _PARSER


class _TooDeep(Exception):
    """Raised out of the builder's recursion once the nesting limit is crossed."""


class _Builder:
    def __init__(self, source: str) -> None:
        self.src = source
        self.depth = 0
        self.issues: list[CelIssue] = []
        self.semantic: list[CelIssue] = []  # macro misuse: reported with the type errors

    # -- helpers ---------------------------------------------------------
    def issue(self, offset: int, message: str, code: str = "syntax", hint: str | None = None, end: int | None = None) -> None:
        line, col = line_col(self.src, offset)
        issue = CelIssue(offset, line, col, message, code, hint, end)
        (self.issues if code in ("syntax", "nesting", "size") else self.semantic).append(issue)

    def find_op(self, start: int, op: str) -> int:
        """Offset of operator ``op`` at/after ``start``, skipping whitespace and comments."""
        s = self.src
        i = start
        n = len(s)
        while i < n:
            if s.startswith(op, i):
                return i
            if s[i] in " \t\r\n\f":
                i += 1
            elif s.startswith("//", i):
                j = s.find("\n", i)
                i = n if j < 0 else j + 1
            else:
                i += 1
        return start

    def build(self, t: Tree | Token) -> Node:
        if isinstance(t, Token):  # pragma: no cover - grammar never hands bare tokens here
            raise AssertionError(t)
        self.depth += 1
        if self.depth > MAX_NESTING:
            start = t.meta.start_pos
            self.issue(start, f"expression is nested more than {MAX_NESTING} levels deep", "nesting",
                       "split it into variables (`variables:`), or use `in [...]` or a map for long case analyses",
                       end=t.meta.end_pos)
            raise _TooDeep
        node = getattr(self, "t_" + t.data)(t)
        self.depth -= 1
        if node.start < 0:
            node.start = t.meta.start_pos
        return node

    @staticmethod
    def sp(t: Tree) -> tuple[int, int]:
        return t.meta.start_pos, t.meta.end_pos

    # -- rules -----------------------------------------------------------
    def t_expr(self, t: Tree) -> Node:
        if len(t.children) == 1:
            return self.build(t.children[0])
        c, a, b = (self.build(x) for x in t.children)
        q = self.find_op(t.children[0].meta.end_pos, "?")
        return Cond(q, t.meta.end_pos, c, a, b)

    def _binary_chain(self, t: Tree, op: str, fn: str) -> Node:
        """`a || b || c ...` (or `&&`): one level of nesting however long, built as a balanced tree.

        The parse tree is left-deep, one level per operator. The two operators are associative
        in CEL, errors included (true || error is true, either way round), so a balanced tree
        means the same, and it keeps the checker's recursion and the generated Python's
        parentheses at log2 of the chain's length.
        """
        if len(t.children) == 1:
            return self.build(t.children[0])
        rule = t.data
        rights: list[Tree] = []
        while t.data == rule and len(t.children) == 2:  # walk the left spine, not recurse
            rights.append(t.children[1])
            t = t.children[0]
        trees = [t, *reversed(rights)]
        operands = [self.build(x) for x in trees]
        ends = [x.meta.end_pos for x in trees]
        return self._balanced(operands, ends, 0, len(operands), op, fn)

    def _balanced(self, operands: list[Node], ends: list[int], lo: int, hi: int, op: str, fn: str) -> Node:
        if hi - lo == 1:
            return operands[lo]
        mid = (lo + hi + 1) // 2  # the left half is the larger: two operands split 1 + 1, three 2 + 1
        a = self._balanced(operands, ends, lo, mid, op, fn)
        b = self._balanced(operands, ends, mid, hi, op, fn)
        node = Call(self.find_op(ends[mid - 1], op), ends[hi - 1], fn, [a, b])
        node.start = a.start
        return node

    def t_conditionalor(self, t: Tree) -> Node:
        return self._binary_chain(t, "||", "_||_")

    def t_conditionaland(self, t: Tree) -> Node:
        return self._binary_chain(t, "&&", "_&&_")

    _REL = {
        "relation_lt": ("<", "_<_"), "relation_le": ("<=", "_<=_"), "relation_gt": (">", "_>_"),
        "relation_ge": (">=", "_>=_"), "relation_eq": ("==", "_==_"), "relation_ne": ("!=", "_!=_"),
        "relation_in": ("in", "@in"), "addition_add": ("+", "_+_"), "addition_sub": ("-", "_-_"),
        "multiplication_mul": ("*", "_*_"), "multiplication_div": ("/", "_/_"), "multiplication_mod": ("%", "_%_"),
    }

    def _binop(self, t: Tree) -> Node:
        if len(t.children) == 1:
            return self.build(t.children[0])
        optree, right = t.children
        op, fn = self._REL[optree.data]
        left = optree.children[0]
        a = self.build(left)
        b = self.build(right)
        off = optree.meta.end_pos - len(op)
        return Call(off, t.meta.end_pos, fn, [a, b])

    t_relation = t_addition = t_multiplication = _binop

    def t_unary(self, t: Tree) -> Node:
        if len(t.children) == 1:
            return self.build(t.children[0])
        op, operand = t.children
        inner = self.build(operand)
        fn = "!_" if op.data == "unary_not" else "-_"
        return Call(op.meta.start_pos, t.meta.end_pos, fn, [inner])

    def t_member(self, t: Tree) -> Node:
        return self.build(t.children[0])

    def t_primary(self, t: Tree) -> Node:
        return self.build(t.children[0])

    def t_paren_expr(self, t: Tree) -> Node:
        return self.build(t.children[0])

    def _args(self, children: list[Any]) -> list[Node]:
        for c in children:
            if isinstance(c, Tree) and c.data == "exprlist":
                return [self.build(x) for x in c.children]
        return []

    def t_member_dot(self, t: Tree) -> Node:
        operand, name = t.children
        return Select(name.start_pos, t.meta.end_pos, self.build(operand), _field_name(name))

    def t_member_dot_opt(self, t: Tree) -> Node:
        operand, name = t.children
        return OptSelect(name.start_pos, t.meta.end_pos, self.build(operand), _field_name(name))

    def t_member_index_opt(self, t: Tree) -> Node:
        operand, index = t.children
        off = self.find_op(operand.meta.end_pos, "[")
        return Call(off, t.meta.end_pos, "_[?_]", [self.build(operand), self.build(index)])

    def t_member_dot_arg(self, t: Tree) -> Node:
        operand, name = t.children[0], t.children[1]
        target = self.build(operand)
        return self.method_call(str(name), name.start_pos, t.meta.end_pos, target, self._args(t.children[2:]))

    def method_call(self, fn: str, off: int, end: int, target: Node, args: list[Node]) -> Node:
        """`target.fn(args)`: a method call, or one of the macros written as one (`cel.bind`, `exists`, ...)."""
        if fn == "bind" and isinstance(target, Ident) and target.name == "cel" and not target.root:
            return self._bind(off, end, args)
        if fn in MACROS:
            return self._macro(fn, off, end, target, args)
        return Call(off, end, fn, args, target)

    def _var(self, fn: str, var: Node) -> Ident | None:
        if not isinstance(var, Ident) or var.root:
            self.issue(var.start, f"the variable of '{fn}' must be a simple identifier", "macro-var", end=var.end)
            return None
        return var

    def _bind(self, off: int, end: int, args: list[Node]) -> Node:
        if len(args) != 3:
            self.issue(off, f"macro 'cel.bind' takes 3 arguments, got {len(args)}", "macro-arity", end=end)
            return Invalid(off, end)
        var = self._var("cel.bind", args[0])
        if var is None:
            return Invalid(off, end)
        return Bind(off, end, var.name, var.offset, args[1], args[2])

    def _macro(self, fn: str, off: int, end: int, target: Node, args: list[Node]) -> Node:
        if len(args) not in MACROS[fn]:
            want = " or ".join(str(n) for n in MACROS[fn])
            self.issue(off, f"macro '{fn}' takes {want} arguments, got {len(args)}", "macro-arity", end=end)
            return Invalid(off, end)
        var = self._var(fn, args[0])
        if var is None:
            return Invalid(off, end)
        if fn in ("optMap", "optFlatMap"):
            return OptMap(off, end, fn, target, var.name, var.offset, args[1])
        if fn == "existsOne":
            fn = "exists_one"
        two = fn in _TWO_VAR_ONLY or (fn in ("all", "exists", "exists_one") and len(args) == 3)
        if fn == "map" and len(args) == 3:
            return Comprehension(off, end, fn, target, var.name, var.offset, args[2], args[1])
        if not two:
            return Comprehension(off, end, fn, target, var.name, var.offset, args[1])
        var2 = self._var(fn, args[1])
        if var2 is None:
            return Invalid(off, end)
        if var2.name == var.name:
            self.issue(var2.start, f"the two variables of '{fn}' must differ", "macro-var", end=var2.end)
            return Invalid(off, end)
        body, flt = (args[3], args[2]) if len(args) == 4 else (args[2], None)
        return Comprehension(off, end, fn, target, var.name, var.offset, body, flt, var2.name, var2.offset)

    def t_member_index(self, t: Tree) -> Node:
        operand, index = t.children
        off = self.find_op(operand.meta.end_pos, "[")
        return Call(off, t.meta.end_pos, "_[_]", [self.build(operand), self.build(index)])

    def t_member_object(self, t: Tree) -> Node:
        operand = t.children[0]
        name = _qualified(operand)
        fields: list[tuple[str, int, Node]] = []
        for c in t.children[1:]:
            if isinstance(c, Tree) and c.data == "fieldinits":
                kids = c.children
                for i in range(0, len(kids), 2):
                    fields.append((_field_name(kids[i]), kids[i].start_pos, self.build(kids[i + 1])))
        return ObjLit(operand.meta.start_pos, t.meta.end_pos, name or "?", fields)

    def t_dot_ident_arg(self, t: Tree) -> Node:
        name = t.children[0]
        args = self._args(t.children[1:])
        return Call(name.start_pos, t.meta.end_pos, str(name), args)

    def t_dot_ident(self, t: Tree) -> Node:
        name = t.children[0]
        return Ident(name.start_pos, name.end_pos, str(name), root=True)

    def t_ident_arg(self, t: Tree) -> Node:
        name = t.children[0]
        return self.function_call(str(name), name.start_pos, t.meta.end_pos, self._args(t.children[1:]))

    def function_call(self, fn: str, off: int, end: int, args: list[Node]) -> Node:
        """`fn(args)`: a function call, or the macro `has(x.f)`."""
        if fn == "has":
            if len(args) != 1:
                self.issue(off, f"macro 'has' takes 1 argument, got {len(args)}", "macro-arity", end=end)
                return Invalid(off, end)
            arg = args[0]
            if not isinstance(arg, Select):
                self.issue(arg.offset, "has() requires a field selection argument, e.g. has(x.field)", "has-arg", end=arg.end)
                return Invalid(off, end)
            return Select(arg.offset, end, arg.operand, arg.field, test_only=True)
        return Call(off, end, fn, args)

    def t_ident(self, t: Tree) -> Node:
        name = t.children[0]
        return Ident(name.start_pos, name.end_pos, str(name))

    def t_list_lit(self, t: Tree) -> Node:
        s, e = self.sp(t)
        items: list[Node] = []
        optional: set[int] = set()
        for c in t.children:
            if isinstance(c, Tree) and c.data == "listinits":
                for x in c.children:
                    if x.data == "opt_elem":
                        optional.add(len(items))
                        x = x.children[0]
                    items.append(self.build(x))
        return ListLit(s, e, items, frozenset(optional))

    def t_map_lit(self, t: Tree) -> Node:
        s, e = self.sp(t)
        entries: list[tuple[Node, Node]] = []
        optional: set[int] = set()
        for c in t.children:
            if isinstance(c, Tree) and c.data == "mapinits":
                for x in c.children:
                    if x.data == "opt_entry":
                        optional.add(len(entries))
                    k, v = x.children
                    entries.append((self.build(k), self.build(v)))
        return MapLit(s, e, entries, frozenset(optional))

    def t_literal(self, t: Tree) -> Node:
        tok: Token = t.children[0]
        return self.literal(tok.type, str(tok), tok.start_pos, tok.end_pos)

    def literal(self, typ: str, text: str, s: int, e: int) -> Lit:
        """The literal token `text` of terminal `typ` at [s, e); a bad one is an issue (and a null)."""
        try:
            if typ == "INT_LIT":
                v = _parse_int(text)
                if not INT64_MIN <= v <= INT64_MAX:
                    self.issue(s, f"int literal out of range: {text}", end=e)
                    v = 0
                return Lit(s, e, v, "int")
            if typ == "UINT_LIT":
                body = text[:-1]
                v = _parse_int(body)
                if body.startswith("-") or v > UINT64_MAX:
                    self.issue(s, f"uint literal out of range: {text}", end=e)
                    v = 0
                return Lit(s, e, v, "uint")
            if typ == "FLOAT_LIT":
                return Lit(s, e, float(text), "double")
            if typ == "BOOL_LIT":
                return Lit(s, e, text == "true", "bool")
            if typ == "NULL_LIT":
                return Lit(s, e, None, "null")
            if typ in ("STRING_LIT", "MLSTRING_LIT"):
                return Lit(s, e, _parse_string(text, False), "string")
            if typ == "BYTES_LIT":
                return Lit(s, e, _parse_string(text[1:], True), "bytes")
        except ValueError as ex:
            self.issue(s, f"invalid literal {text}: {ex}", end=e)
            return Lit(s, e, None, "null")
        raise AssertionError(typ)  # pragma: no cover


def _qualified(t: Tree) -> str | None:
    """`a.b.c` written as a message type name in `a.b.c{...}`."""
    if isinstance(t, Token):
        return str(t)
    if t.data in ("member", "primary"):
        return _qualified(t.children[0])
    if t.data in ("ident", "dot_ident"):
        return str(t.children[0])
    if t.data == "member_dot":
        left = _qualified(t.children[0])
        return None if left is None else f"{left}.{t.children[1]}"
    return None


def _parse_int(text: str) -> int:
    neg = text.startswith("-")
    body = text[1:] if neg else text
    v = int(body[2:], 16) if body[:2].lower() == "0x" else int(body, 10)
    return -v if neg else v


_SIMPLE_ESC = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
               '"': '"', "'": "'", "\\": "\\", "`": "`", "?": "?"}


def _parse_string(text: str, is_bytes: bool) -> Any:
    raw = text[:1] in "rR"
    if raw:
        text = text[1:]
    q = 3 if text[:3] in ('"""', "'''") else 1
    body = text[q:-q]
    if raw or "\\" not in body:  # (most literals: nothing to unescape)
        return body.encode("utf-8") if is_bytes else body
    out: list[Any] = []  # str pieces, or ints (raw bytes) for bytes literals
    i, n = 0, len(body)
    while i < n:
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        if i + 1 >= n:
            raise ValueError("dangling backslash")
        e = body[i + 1]
        if e in _SIMPLE_ESC:
            out.append(_SIMPLE_ESC[e])
            i += 2
        elif e in "xX":
            h = body[i + 2 : i + 4]
            if len(h) != 2 or not all(c in "0123456789abcdefABCDEF" for c in h):
                raise ValueError("bad \\x escape")
            out.append(int(h, 16) if is_bytes else chr(int(h, 16)))
            i += 4
        elif e in "uU":
            width = 4 if e == "u" else 8
            if is_bytes:
                raise ValueError("\\u escapes are not allowed in bytes literals")
            h = body[i + 2 : i + 2 + width]
            if len(h) != width or not all(c in "0123456789abcdefABCDEF" for c in h):
                raise ValueError(f"bad \\{e} escape")
            cp = int(h, 16)
            if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
                raise ValueError("invalid code point")
            out.append(chr(cp))
            i += 2 + width
        elif e in "0123":
            o = body[i + 1 : i + 4]
            if len(o) != 3 or not all(c in "01234567" for c in o):
                raise ValueError("bad octal escape")
            out.append(int(o, 8) if is_bytes else chr(int(o, 8)))
            i += 4
        else:
            raise ValueError(f"unknown escape \\{e}")
    if is_bytes:
        buf = bytearray()
        for p in out:
            if isinstance(p, int):
                buf.append(p)
            else:
                buf.extend(p.encode("utf-8"))
        return bytes(buf)
    return "".join(out)


def parse(source: str) -> Node:
    """Parse CEL source into the AST; raises :class:`CelSyntaxError` with every issue found."""
    node, semantic = parse_with_issues(source)
    if semantic:
        from .errors import CelTypeError

        raise CelTypeError(semantic, source)
    return node


def parse_with_issues(source: str) -> tuple[Node, list[CelIssue]]:
    """Parse; syntax problems raise, macro misuse is returned for the checker to report.

    The AST is the caller's own (the checker annotates it): a copy of the cached parse.
    """
    node, semantic = parsed(source)
    return _copy(node), list(semantic)


def parsed(source: str) -> tuple[Node, tuple[CelIssue, ...]]:
    """The parse of `source`, cached process-wide and shared: read it, never annotate it.

    `lint` reads the ASTs the compiler parsed a moment before, and a source compiled against
    other declarations is not parsed again: lark's parse is most of what compiling costs.
    """
    found = PARSES.get(source)
    if found is None:
        node, semantic = _parse(source)
        found = (node, tuple(semantic))
        PARSES.put(source, found, len(source))
    return found  # type: ignore[no-any-return]


def _child_fields(cls: type) -> tuple[str, ...]:
    """The fields of a node class that hold nodes (alone, or in lists and tuples)."""
    return tuple(f.name for f in fields(cls) if "Node" in str(f.type))


_CHILD_FIELDS: dict[type, tuple[str, ...]] = {cls: _child_fields(cls) for cls in (Lit, Ident, Select, OptSelect, Index, Call, Cond, ListLit, MapLit,
                                                     ObjLit, Comprehension, Bind, OptMap, Invalid)}


def _copy(value: Any) -> Any:
    """A deep copy of an AST (its nodes, and the lists and tuples that hold them).

    Only the fields that hold nodes are descended into (a fifth of the copy's time, before)."""
    if isinstance(value, Node):
        cls = type(value)
        node = object.__new__(cls)
        attrs = value.__dict__.copy()
        for name in _CHILD_FIELDS[cls]:
            attrs[name] = _copy(attrs[name])
        node.__dict__ = attrs
        return node
    if type(value) is list:
        return [_copy(v) for v in value]
    if type(value) is tuple:
        return tuple(_copy(v) for v in value)
    return value


def _parse(source: str, fast: bool = True) -> tuple[Node, list[CelIssue]]:
    """Parse: the fast path (`lalr.py`) when it takes the source and `fast`, else lark."""
    b = _Builder(source)
    if len(source) > MAX_EXPRESSION_CHARS:
        b.issue(0, f"expression is {len(source):,} characters long, over the limit of {MAX_EXPRESSION_CHARS:,}", "size",
                "move long lists of values out of the expression, or split it into variables", end=len(source))
        raise CelSyntaxError(b.issues, source)
    from .lalr import fast_parser  # (a module that imports this one)

    fast_path = fast_parser() if fast else None
    node = None if fast_path is None else fast_path.parse(b)
    if node is not None:
        return node, b.semantic
    # lark's parse: what the fast path declines (every syntax error, too) and the reference it is tested against
    try:
        tree = _parser().parse(source)
    except UnexpectedInput as ex:
        off = getattr(ex, "pos_in_stream", None)
        if off is None or off < 0:
            off = len(source)
        if isinstance(ex, UnexpectedToken) and ex.token is not None and ex.token.type == "$END":
            off = len(source)
        tok = getattr(ex, "token", None)
        if isinstance(ex, UnexpectedEOF) or off >= len(source):
            msg = "unexpected end of expression"
        elif isinstance(ex, UnexpectedCharacters):
            msg = f"unexpected character {source[off]!r}"
        else:
            msg = f"unexpected token {str(tok)!r}" if tok is not None else "syntax error"
            if tok is not None and tok.type == "RESERVED":
                msg = f"reserved word {str(tok)!r} cannot be used here"
        b.issue(off, msg)
        raise CelSyntaxError(b.issues, source) from None
    except LexError as ex:  # pragma: no cover - defensive
        b.issue(0, str(ex).splitlines()[0])
        raise CelSyntaxError(b.issues, source) from None
    try:
        node = b.build(tree)
    except _TooDeep:
        raise CelSyntaxError(b.issues, source) from None
    if b.issues:
        raise CelSyntaxError(b.issues, source)
    return node, b.semantic
