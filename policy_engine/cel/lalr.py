"""The fast path of the CEL parser: lark's own LALR tables, driven by a loop of ours that builds
the AST in its reductions.

lark's parse (its lexer's tokens, its parser's loop, a `Tree` for every rule with positions
propagated through it) and the conversion of that tree into our AST were most of what a cold
compile cost. This module reuses what lark computed once, the grammar's terminals and LALR
tables, and in each reduction makes what the tree builder of `ast.py` would have made of that
rule's tree: the same nodes with the same offsets, made by the same `_Builder` methods.

It is a fast path, never the only one. It declines (`parse` returns None) on anything but a
clean parse: a character no terminal matches, a token the table has no action for, a literal
with an issue, nesting over the limit, or a lark version it was not tested with. `ast.py` then
parses with lark as before, so every syntax error keeps lark's message and position.
tests/cel/test_cel_lalr.py checks that both paths build identical ASTs.

What each stack value stands for is the lark tree (or token) at that place, with the tree's
positions: `s, e` its own span (`meta.start_pos, end_pos`), `cs, ce` its container's, which
includes the parentheses around a rule lark inlined (`?paren_expr`).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import lark
from lark.lexer import CallChain, PatternStr, UnlessCallback

from .ast import (
    MAX_NESTING, Call, Cond, Ident, ListLit, MapLit, Node, ObjLit, OptSelect, Select, _Builder, _parser,
)

TESTED_LARK_VERSIONS = frozenset({"1.3.1"})
"""lark versions whose parser internals (parse table, lexer terminals and callbacks) this reads."""


class _Decline(Exception):
    """Leave this source to lark: it will report (or accept) it exactly as before."""


class _Val:
    """A token or a reduced rule on the parser's stack (see the module docstring)."""

    __slots__ = ("kind", "node", "extra", "qual", "h", "s", "e", "cs", "ce")

    def __init__(self, kind: str, node: Node | None, extra: Any, h: int, s: int, e: int) -> None:
        self.kind = kind  # a terminal's name, or what the value holds: node chain op list entry opt
        self.node = node
        self.extra = extra  # a token's text; a chain's, op's, list's or entry's parts
        self.qual: str | None = None  # `a.b.c` when the value is a qualified name (for `a.b.c{...}`)
        self.h = h  # the builder's recursion depth below this tree (its nesting)
        self.s = self.cs = s  # the container is the tree itself until lark inlines it into parentheses
        self.e = self.ce = e


_OPS = {  # the operator rules' trees: rule -> (operator, function)
    "relation_lt": ("<", "_<_"), "relation_le": ("<=", "_<=_"), "relation_gt": (">", "_>_"),
    "relation_ge": (">=", "_>=_"), "relation_eq": ("==", "_==_"), "relation_ne": ("!=", "_!=_"),
    "relation_in": ("in", "@in"), "addition_add": ("+", "_+_"), "addition_sub": ("-", "_-_"),
    "multiplication_mul": ("*", "_*_"), "multiplication_div": ("/", "_/_"), "multiplication_mod": ("%", "_%_"),
    "unary_not": ("!", "!_"), "unary_neg": ("-", "-_"),
}
_CHAINS = {"conditionalor": ("||", "_||_"), "conditionaland": ("&&", "_&&_")}


class FastParser:
    """Tables built once from lark's parser; `parse(builder)` per source."""

    def __init__(self, parser: lark.Lark) -> None:
        lexer = parser.parser.lexer
        scanner = lexer.scanner
        # The lexer: lark's terminals in lark's order, one alternation as lark's scanner has it,
        # and in front of it the same alternation cut down to the terminals no other terminal
        # before them can start like (names, operators), after any whitespace. Python's re tries
        # each alternative in turn, and numbers and strings come first in lark's: a name matched
        # there costs a fifth of what it costs in the whole. What the front one leaves (numbers,
        # strings, comments, `-`, `/`, `.5`, `r'...'`), the whole one lexes.
        terminals = scanner.terminals
        front, space = [], None
        for t in terminals:  # (the front's groups are named `f_<kind>`: the whole has the kinds' names)
            regexp = t.pattern.to_regexp()
            if t.name == "IDENT":  # unless it is a string's prefix (r, b, br): `r'a'`, `b"a"`
                front.append(f"(?P<f_IDENT>{regexp})(?![\'\"])")
            elif t.name == "DOT":  # unless it starts a number: `.5`
                front.append(f"(?P<f_DOT>{regexp})(?![0-9])")
            elif t.name == "WHITESPACE":
                space = regexp
            elif isinstance(t.pattern, PatternStr) and t.pattern.value[0] not in "-/.":
                front.append(f"(?P<f_{t.name}>{regexp})")
        if space is None or "WHITESPACE" not in lexer.ignore_types:  # pragma: no cover - another grammar
            raise RuntimeError("cel-python's grammar changed: no ignored WHITESPACE")
        # One scanner, the front alternation first: `finditer` walks the source in C, and a gap
        # between two matches is a character no terminal matches.
        whole = "|".join(f"(?P<{t.name}>{t.pattern.to_regexp()})" for t in terminals)
        self.scanner = re.compile(f"(?:{space})?(?:{'|'.join(front)})|{whole}", lexer.g_regex_flags)
        self.kinds = {i: name.removeprefix("f_") for name, i in self.scanner.groupindex.items()}
        self.ignore = frozenset(lexer.ignore_types)
        self.keywords = _keywords(lexer.callback)
        table = parser.parser.parser.parser.parse_table
        self.start = table.start_states["expr"]
        self.end = table.end_states["expr"]
        # Actions: a shift is the next state (an int); a reduction is (size, rule name, handler,
        # what the handler needs to know of the rule). Rules that only pass their one child
        # through have no handler: the value stays as it is.
        reductions: dict[Any, tuple[int, str, Callable[..., _Val] | None, Any]] = {}
        self.actions: dict[int, dict[str, Any]] = {}
        self.gotos: dict[int, dict[str, int]] = {}
        self.units: dict[tuple[int, int, str], int] = {}  # see `_FastBuild.run`
        for state, row in table.states.items():
            actions, gotos = self.actions.setdefault(state, {}), self.gotos.setdefault(state, {})
            for symbol, (action, arg) in row.items():
                symbol = str(symbol)  # lark's names are Tokens: str keys, for str's own fast comparison
                if action.name == "Shift":
                    (actions if symbol.isupper() or symbol == "$END" else gotos)[symbol] = arg
                else:
                    if arg not in reductions:
                        reductions[arg] = self._reduction(arg)
                    actions[symbol] = reductions[arg]

    def _reduction(self, rule: Any) -> tuple[int, str, Callable[..., _Val] | None, Any]:
        name = str(rule.origin.name)
        if rule.alias or rule.options.keep_all_tokens:  # pragma: no cover - not in cel-python's grammar
            raise RuntimeError(f"unexpected rule options in {name}")
        # lark keeps the children that are not anonymous tokens, and splices in those of `_rule`s
        kept = tuple((i, not sym.is_term and sym.name.startswith("_"))
                     for i, sym in enumerate(rule.expansion) if not (sym.is_term and sym.filter_out))
        size = len(rule.expansion)
        if rule.options.expand1 and len(kept) == 1:
            # lark inlines the one child; when there is nothing else in the rule, nothing changes
            return (size, name, None if size == 1 else _FastBuild.inline, kept[0][0])
        if name.startswith("_") or name in ("exprlist", "listinits", "mapinits", "fieldinits"):
            return (size, name, _FastBuild.sequence, kept)
        if name in _OPS:
            return (size, name, _FastBuild.operator, _OPS[name])
        if name in _CHAINS:
            return (size, name, _FastBuild.chain, _CHAINS[name])
        return (size, name, getattr(_FastBuild, "r_" + name), None)

    def after_pass_throughs(self, below: int, top: int, kind: str) -> int:
        """The top state once the pass-through reductions due in state `top` on token `kind` are done."""
        act = self.actions[top][kind]
        while type(act) is tuple and act[2] is None:
            top = self.gotos[below][act[1]]
            act = self.actions[top].get(kind)
        return top

    def tokens(self, source: str) -> list[_Val]:
        out = []
        pos = 0
        ignore, keywords, kinds = self.ignore, self.keywords, self.kinds
        for m in self.scanner.finditer(source):
            if m.start() != pos:  # a character no terminal matches
                raise _Decline
            i: int = m.lastindex  # type: ignore[assignment]  # (every alternative is a group)
            kind = kinds[i]
            start, pos = m.span(i)
            if kind in ignore:
                continue
            text = source[start:pos]
            if kind == "IDENT":
                kind = keywords.get(text, kind)
            out.append(_Val(kind, None, text, 0, start, pos))
        if pos != len(source):
            raise _Decline
        return out

    def parse(self, builder: _Builder) -> Node | None:
        """The AST of `builder.src`, made with `builder`; None when lark should parse it instead."""
        try:
            toks = self.tokens(builder.src)
            end = len(builder.src)
            toks.append(_Val("$END", None, "", 0, end, end))
            return _FastBuild(builder).run(self, toks)
        except _Decline:
            del builder.issues[:], builder.semantic[:]  # lark's path finds them again, in its order
            return None


class _FastBuild:
    """One parse: the LALR loop, and the reductions that build the AST."""

    def __init__(self, builder: _Builder) -> None:
        self.b = builder

    def run(self, fp: FastParser, toks: list[_Val]) -> Node:
        actions, gotos, end_state, units = fp.actions, fp.gotos, fp.end, fp.units
        states = [fp.start]
        values: list[_Val] = []
        for tok in toks:
            kind = tok.kind
            while True:
                act = actions[states[-1]].get(kind)
                if act is None:  # a syntax error: lark reports it
                    raise _Decline
                if type(act) is int:
                    states.append(act)
                    values.append(tok)
                    break
                size, name, handler, spec = act
                if handler is None:
                    # A pass-through rule replaces the top state only, and then usually another
                    # does: `a` in `a > 1` passes through eight. Where a run of them ends depends
                    # on the state below, the top and the token only: found once, remembered.
                    key = (states[-2], states[-1], kind)
                    top = units.get(key)
                    if top is None:
                        top = units[key] = fp.after_pass_throughs(*key)
                    states[-1] = top
                else:
                    kids = values[-size:]
                    del values[-size:]
                    del states[-size:]
                    values.append(handler(self, kids, spec))
                    states.append(gotos[states[-1]][name])
                if kind == "$END" and states[-1] == end_state:
                    return self.node(values[-1])
        raise AssertionError("no end state")  # pragma: no cover - $END always ends the loop or declines

    # -- values ----------------------------------------------------------
    def made(self, node: Node, h: int, kids: list[_Val]) -> _Val:
        """A rule's tree built into `node`: `h` levels deep, its span the span of its children."""
        if h > MAX_NESTING:  # lark's path reports it
            raise _Decline
        s = kids[0].cs
        if node.start < 0:
            node.start = s
        e = kids[-1].ce
        return _Val("node", node, None, h, s, e)

    def node(self, v: _Val) -> Node:
        """The node a value stands for; a `||`/`&&` chain is built into its balanced tree here."""
        if v.node is None:
            if v.kind != "chain":  # pragma: no cover - the grammar only puts expressions here
                raise AssertionError(v.kind)
            (op, fn), operands = v.extra
            v.node = self.b._balanced([o.node for o in operands], [o.e for o in operands], 0, len(operands), op, fn)
        return v.node

    @staticmethod
    def keep(kids: list[_Val], kept: tuple[tuple[int, bool], ...]) -> list[_Val]:
        out: list[_Val] = []
        for i, splice in kept:
            if splice:
                out.extend(kids[i].extra)
            else:
                out.append(kids[i])
        return out

    # -- generic reductions ------------------------------------------------
    def inline(self, kids: list[_Val], index: int) -> _Val:
        """`?paren_expr`: lark passes the child through, its container now the parentheses."""
        child = kids[index]
        child.cs, child.ce = kids[0].cs, kids[-1].ce
        return child

    def sequence(self, kids: list[_Val], kept: tuple[tuple[int, bool], ...]) -> _Val:
        """A list rule (`exprlist`, ...) or one of lark's `__x_star_n` helpers spliced into it."""
        return _Val("list", None, self.keep(kids, kept), 0, kids[0].cs, kids[-1].ce)

    def operator(self, kids: list[_Val], op: tuple[str, str]) -> _Val:
        """`relation_lt: relation "<"` and the like, `unary_not: "!"`: the operator and its left operand."""
        s, e = kids[0].cs, kids[-1].ce
        return _Val("op", None, (op, kids[0] if len(kids) == 2 else None), 0, s, e)

    def chain(self, kids: list[_Val], rule: tuple[str, str]) -> _Val:
        """`a || b || c` (or `&&`): the builder walks the left spine of such trees, parentheses or
        not, and balances the operands; so does this, when the chain is used (`node`)."""
        left, right = kids[0], kids[2]
        if left.kind == "chain" and left.extra[0] is rule:
            operands, h = left.extra[1], left.h
        else:
            self.node(left)
            operands, h = [left], 1 + left.h
        self.node(right)
        operands.append(right)
        h = max(h, 1 + right.h)
        if h > MAX_NESTING:
            raise _Decline
        s, e = left.cs, right.ce
        return _Val("chain", None, (rule, operands), h, s, e)

    # -- the rules of `_Builder` ---------------------------------------------
    def r_expr(self, kids: list[_Val], spec: None) -> _Val:
        c, a, b = kids[0], kids[2], kids[4]
        cn, an, bn = self.node(c), self.node(a), self.node(b)
        return self.made(Cond(self.b.find_op(c.e, "?"), kids[-1].ce, cn, an, bn), 1 + max(c.h, a.h, b.h), kids)

    def r_relation(self, kids: list[_Val], spec: None) -> _Val:
        optree, right = kids
        (op, fn), left = optree.extra
        a, b = self.node(left), self.node(right)
        return self.made(Call(optree.e - len(op), right.ce, fn, [a, b]), 1 + max(left.h, right.h), kids)

    r_addition = r_multiplication = r_relation

    def r_unary(self, kids: list[_Val], spec: None) -> _Val:
        optree, operand = kids
        (_, fn), _ = optree.extra
        inner = self.node(operand)
        return self.made(Call(optree.s, operand.ce, fn, [inner]), 1 + operand.h, kids)

    def r_member_dot(self, kids: list[_Val], spec: None) -> _Val:
        operand, name = kids[0], kids[2]
        v = self.made(Select(name.s, name.e, self.node(operand), _field(name)), 1 + operand.h, kids)
        if operand.qual is not None:
            v.qual = f"{operand.qual}.{name.extra}"
        return v

    def r_member_dot_opt(self, kids: list[_Val], spec: None) -> _Val:
        operand, name = kids[0], kids[3]
        return self.made(OptSelect(name.s, name.e, self.node(operand), _field(name)), 1 + operand.h, kids)

    def r_member_index_opt(self, kids: list[_Val], spec: None) -> _Val:
        operand, index = kids[0], kids[3]
        off = self.b.find_op(operand.e, "[")
        node = Call(off, kids[-1].ce, "_[?_]", [self.node(operand), self.node(index)])
        return self.made(node, 1 + max(operand.h, index.h), kids)

    def r_member_index(self, kids: list[_Val], spec: None) -> _Val:
        operand, index = kids[0], kids[2]
        off = self.b.find_op(operand.e, "[")
        node = Call(off, kids[-1].ce, "_[_]", [self.node(operand), self.node(index)])
        return self.made(node, 1 + max(operand.h, index.h), kids)

    def _args(self, kids: list[_Val]) -> tuple[list[Node], int]:
        """The arguments of a call (its `exprlist`, if any) and the deepest of them."""
        for k in kids:
            if k.kind == "list":
                return [self.node(x) for x in k.extra], max(x.h for x in k.extra)
        return [], 0

    def r_member_dot_arg(self, kids: list[_Val], spec: None) -> _Val:
        operand, name = kids[0], kids[2]
        target = self.node(operand)
        args, h = self._args(kids[4:])
        node = self.b.method_call(name.extra, name.s, kids[-1].ce, target, args)
        return self.made(node, 1 + max(operand.h, h), kids)

    def r_member_object(self, kids: list[_Val], spec: None) -> _Val:
        operand = kids[0]
        if operand.qual is None:
            # The builder never builds the operand of `x{...}` when it is no type name: what
            # building it here may have found (a macro's issues) it would not have.
            raise _Decline
        fields: list[tuple[str, int, Node]] = []
        h = 0
        for k in kids[2:]:
            if k.kind == "list":
                items = k.extra
                for i in range(0, len(items), 2):
                    fields.append((_field(items[i]), items[i].s, self.node(items[i + 1])))
                    h = max(h, items[i + 1].h)
        return self.made(ObjLit(operand.s, kids[-1].ce, operand.qual, fields), 1 + h, kids)

    def r_dot_ident_arg(self, kids: list[_Val], spec: None) -> _Val:
        name = kids[1]
        args, h = self._args(kids[3:])
        return self.made(Call(name.s, kids[-1].ce, name.extra, args), 1 + h, kids)

    def r_dot_ident(self, kids: list[_Val], spec: None) -> _Val:
        name = kids[1]
        v = self.made(Ident(name.s, name.e, name.extra, root=True), 1, kids)
        v.qual = name.extra
        return v

    def r_ident_arg(self, kids: list[_Val], spec: None) -> _Val:
        name = kids[0]
        args, h = self._args(kids[2:])
        return self.made(self.b.function_call(name.extra, name.s, kids[-1].ce, args), 1 + h, kids)

    def r_ident(self, kids: list[_Val], spec: None) -> _Val:
        name = kids[0]
        v = self.made(Ident(name.s, name.e, name.extra), 1, kids)
        v.qual = name.extra
        return v

    def r_list_lit(self, kids: list[_Val], spec: None) -> _Val:
        items: list[Node] = []
        optional: set[int] = set()
        h = 0
        if kids[1].kind == "list":
            for x in kids[1].extra:
                if x.kind == "opt":
                    optional.add(len(items))
                    x = x.extra
                items.append(self.node(x))
                h = max(h, x.h)
        return self.made(ListLit(kids[0].cs, kids[-1].ce, items, frozenset(optional)), 1 + h, kids)

    def r_map_lit(self, kids: list[_Val], spec: None) -> _Val:
        entries: list[tuple[Node, Node]] = []
        optional: set[int] = set()
        h = 0
        if kids[1].kind == "list":
            for x in kids[1].extra:
                k, v, is_opt = x.extra
                if is_opt:
                    optional.add(len(entries))
                entries.append((self.node(k), self.node(v)))
                h = max(h, k.h, v.h)
        return self.made(MapLit(kids[0].cs, kids[-1].ce, entries, frozenset(optional)), 1 + h, kids)

    def r_opt_elem(self, kids: list[_Val], spec: None) -> _Val:
        return _Val("opt", None, kids[1], 0, kids[0].cs, kids[-1].ce)

    def r_map_entry(self, kids: list[_Val], spec: None) -> _Val:
        return _Val("entry", None, (kids[0], kids[2], False), 0, kids[0].cs, kids[-1].ce)

    def r_opt_entry(self, kids: list[_Val], spec: None) -> _Val:
        return _Val("entry", None, (kids[1], kids[3], True), 0, kids[0].cs, kids[-1].ce)

    def r_literal(self, kids: list[_Val], spec: None) -> _Val:
        tok = kids[0]
        before = len(self.b.issues)
        node = self.b.literal(tok.kind, tok.extra, tok.s, tok.e)
        if len(self.b.issues) > before:  # lark's path reports it, beside any later issue
            raise _Decline
        return self.made(node, 1, kids)


def _field(tok: _Val) -> str:
    return tok.extra[1:-1] if tok.kind == "QUOTED_IDENT" else tok.extra  # type: ignore[no-any-return]


def _keywords(callbacks: dict[str, Any]) -> dict[str, str]:
    """What lark's IDENT callback retypes: keywords (`in`, `null`, reserved words), `true`/`false`."""
    chain = callbacks.get("IDENT")
    if not isinstance(chain, CallChain) or not isinstance(chain.callback1, UnlessCallback):
        raise RuntimeError("lark's IDENT callback is not the one this was written for")
    found: dict[str, str] = {}
    for t in chain.callback1.scanner.terminals:
        if not isinstance(t.pattern, PatternStr) or t.pattern.flags:
            raise RuntimeError(f"unexpected keyword terminal {t.name}")
        found[t.pattern.value] = t.name
    for word in ("true", "false"):  # ast._ambiguous_literals
        found.setdefault(word, "BOOL_LIT")
    return found


_FAST: FastParser | None = None
_TRIED = False


def fast_parser() -> FastParser | None:
    """The fast parser, built once; None when this lark version is not one it was tested with, or
    cel-python's grammar is not the one it was written for (the RuntimeErrors above): parsing
    then stays lark's, as slow as before and as right (test_cel_lalr.py fails on it)."""
    global _FAST, _TRIED
    if not _TRIED:
        if lark.__version__ in TESTED_LARK_VERSIONS:
            try:
                _FAST = FastParser(_parser())
            except RuntimeError:  # pragma: no cover - a cel-python upgrade
                _FAST = None
        _TRIED = True  # (two threads may both build it: the same tables, the last one kept)
    return _FAST
