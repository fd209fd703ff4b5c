"""A process-wide cache of compiled CEL programs, keyed by source text and declarations.

Reloading a policy, linting it again, or compiling the same `when` in many rules and files
recompiles nothing that did not change: parsing is most of the cost of compiling (cel-python's
lark grammar), and a program is immutable, so one compiled program serves every caller.

Declarations are keyed by their structure, not their identity: `features.declarations()` builds
new `ObjectType`s on every call, and `ObjectType` compares by name only. Each type object gets a
token for its structure once (memoised by identity, holding the object so its id is not reused).
Tokens are never reused, so clearing the memo only costs misses, never a wrong hit.

Failures are cached too (as their issues): a policy with an error lints again just as fast.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable, Mapping, NamedTuple

from .types import CelType, ListType, MapType, ObjectType

MAX_ENTRIES = 4096
MAX_SOURCE_CHARS = 4_000_000
"""Bounds on what the cache keeps: entries, and the summed length of their sources."""

_MEMO_LIMIT = 16_384


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    """Every miss is one compilation: the counter `reload` and `lint` are tested against."""
    entries: int
    source_chars: int


class _Failure:
    __slots__ = ("cls", "issues", "source")

    def __init__(self, exc: Any) -> None:
        self.cls, self.issues, self.source = type(exc), list(exc.issues), exc.source

    def raise_(self) -> None:
        raise self.cls(self.issues, self.source)  # a fresh exception: no traceback piles up


class BoundedLru:
    """A thread-safe LRU map bounded in entries and in the summed size (characters) of its values."""

    def __init__(self, max_entries: int, max_chars: int) -> None:
        self.max_entries, self.max_chars = max_entries, max_chars
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.chars = 0
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Any:
        with self.lock:
            found = self._items.get(key)
            if found is None:
                return None
            self._items.move_to_end(key)
            return found[0]

    def put(self, key: Hashable, value: Any, chars: int) -> None:
        with self.lock:
            if key in self._items:
                return
            self._items[key] = (value, chars)
            self.chars += chars
            while len(self._items) > self.max_entries or (self.chars > self.max_chars and len(self._items) > 1):
                _, (_, size) = self._items.popitem(last=False)
                self.chars -= size

    def clear(self) -> None:
        with self.lock:
            self._items.clear()
            self.chars = 0


class ProgramCache:
    def __init__(self) -> None:
        self._entries = BoundedLru(MAX_ENTRIES, MAX_SOURCE_CHARS)
        self._lock = threading.Lock()
        self._tokens: dict[Hashable, int] = {}
        self._by_id: dict[int, tuple[CelType, int]] = {}
        self._next = itertools.count()
        self.hits = 0
        self.misses = 0

    def info(self) -> CacheInfo:
        return CacheInfo(self.hits, self.misses, len(self._entries), self._entries.chars)

    def clear(self) -> None:
        self._entries.clear()
        self.hits = self.misses = 0

    def get_or_compile(self, source: str, declarations: Mapping[str, CelType] | None, options: tuple[Any, ...],
                       compile_: Callable[[], Any], errors: tuple[type[BaseException], ...]) -> Any:
        key = (source, self._decls_key(declarations), options)
        found = self._entries.get(key)
        if found is not None:
            self.hits += 1  # (a racy count under threads is fine: it is a statistic)
            if isinstance(found, _Failure):
                found.raise_()
            return found
        self.misses += 1
        try:
            value = compile_()
        except errors as exc:
            self._entries.put(key, _Failure(exc), len(source))
            raise
        self._entries.put(key, value, len(source))
        return value

    # -- keys ------------------------------------------------------------
    def _decls_key(self, declarations: Mapping[str, CelType] | None) -> Hashable:
        if declarations is None:
            return None
        return tuple(sorted((name, self.token(t)) for name, t in declarations.items()))

    def token(self, t: CelType | None) -> int | None:
        """A number that two types share exactly when they have the same structure."""
        if t is None:
            return None
        memo = self._by_id.get(id(t))
        if memo is not None and memo[0] is t:
            return memo[1]
        structure = self._structure(t)
        with self._lock:
            token = self._tokens.get(structure)
            if token is None:
                token = self._tokens[structure] = next(self._next)
            if len(self._by_id) >= _MEMO_LIMIT:
                self._by_id.clear()
                self._tokens.clear()
            self._by_id[id(t)] = (t, token)
        return token

    def _structure(self, t: CelType) -> Hashable:
        if isinstance(t, ObjectType):
            fields = tuple((name, f.optional, self.token(f.type)) for name, f in t.fields.items())
            return ("object", t.name, t.nullable, fields)
        if isinstance(t, ListType):
            return ("list", self.token(t.elem), t.max_size, t.nullable)
        if isinstance(t, MapType):
            return ("map", self.token(t.key), self.token(t.value), t.max_size, t.nullable)
        if type(t) is CelType:
            return ("prim", t.kind, t.max_size, t.nullable)
        return (type(t).__qualname__, repr(t))  # other types: their repr shows their whole structure


PROGRAMS = ProgramCache()
PARSES = BoundedLru(MAX_ENTRIES, MAX_SOURCE_CHARS)
"""Source -> its AST and macro issues (see `ast.parsed`)."""
GENERATING = threading.Lock()
"""Held while a cached program's lazy variant is generated (its compiler is not thread-safe); rarely taken."""


def _after_fork_in_child() -> None:
    # A fork while another thread held a lock (a reload compiling in the background) would
    # leave the child's copy locked for ever: the child starts with fresh locks.
    for lru in (PROGRAMS._entries, PARSES):
        lru.lock = threading.Lock()
    PROGRAMS._lock = threading.Lock()
    global GENERATING
    GENERATING = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def clear() -> None:
    """Forget every cached parse and program (benchmarks measure cold compiles with it)."""
    PROGRAMS.clear()
    PARSES.clear()
