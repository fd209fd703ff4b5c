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


class ProgramCache:
    def __init__(self) -> None:
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()
        self._tokens: dict[Hashable, int] = {}
        self._by_id: dict[int, tuple[CelType, int]] = {}
        self._next = itertools.count()
        self.hits = 0
        self.misses = 0

    def info(self) -> CacheInfo:
        return CacheInfo(self.hits, self.misses, len(self._entries), self._chars)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._chars = 0
            self.hits = self.misses = 0

    def get_or_compile(self, source: str, declarations: Mapping[str, CelType] | None, options: tuple[Any, ...],
                       compile_: Callable[[], Any], errors: tuple[type[BaseException], ...]) -> Any:
        key = (source, self._decls_key(declarations), options)
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
        if found is not None:
            if isinstance(found, _Failure):
                found.raise_()
            return found
        try:
            value = compile_()
        except errors as exc:
            self._store(key, source, _Failure(exc))
            raise
        self._store(key, source, value)
        return value

    def _store(self, key: Hashable, source: str, value: Any) -> None:
        with self._lock:
            self.misses += 1
            if key in self._entries:
                return
            self._entries[key] = value
            self._chars += len(source)
            while len(self._entries) > MAX_ENTRIES or (self._chars > MAX_SOURCE_CHARS and len(self._entries) > 1):
                old, _ = self._entries.popitem(last=False)
                self._chars -= len(old[0])  # type: ignore[index]

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
