"""How a persistent ledger names a scope in its storage: `Scope.id`, or with the key hashed.

A scope's key is the value a budget is keyed by: a tenant, a user, a team. With
`hash_scopes` a ledger stores (in its SQLite file, its Redis keys and its journal)
`budget \\x1f #<digest> \\x1f window` instead, so those ids are not kept in plain text:

* `hash_scopes=True`: SHA-256 of the key. Hides ids from a casual reader of the store,
  but anyone who can guess an id (a user number, a tenant's name) can check the guess;
* `hash_scopes=b"secret"` (or a str): HMAC-SHA256 with that secret. Without the secret
  a guess cannot be checked. Every process sharing the store needs the same secret.

Budget names and windows stay readable (they are the policy's, not a person's). Every
process on one SQLite file or one Redis prefix must use the same setting: a different
one would count the same key in a different scope, so the store remembers the setting's
`fingerprint` and a ledger opened with another one refuses to start (`ScopeIdsMismatch`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from typing import NamedTuple, Union

from . import Charge, Scope

__all__ = ["ScopeIds", "StoredScope", "HashScopes", "ScopeIdsMismatch", "describe_charges"]

HashScopes = Union[bool, str, bytes]
"""A ledger's `hash_scopes` option: False (plain ids), True (SHA-256), or an HMAC secret."""

_CACHE_MAX = 65_536


class ScopeIdsMismatch(ValueError):
    """The store names scopes with another `hash_scopes` setting than this ledger's: budgets would split."""


class StoredScope(NamedTuple):
    """A scope as the store names it: what a journal keeps (no plain key) and replays."""

    id: str
    limit: int
    expires_at: float


class ScopeIds:
    """`ids(scope)` -> the scope's id in the store. Digests are remembered: the same scopes recur."""

    __slots__ = ("hashed", "_secret", "_cache")

    def __init__(self, hash_scopes: HashScopes = False) -> None:
        if isinstance(hash_scopes, str):
            hash_scopes = hash_scopes.encode("utf-8")
        if isinstance(hash_scopes, bytes) and not hash_scopes:
            raise ValueError("hash_scopes: an empty secret hides nothing; pass True for an unkeyed hash, or a secret")
        if not isinstance(hash_scopes, (bool, bytes)):
            raise TypeError(f"hash_scopes must be a bool, str or bytes, got {type(hash_scopes).__name__}")
        self.hashed = hash_scopes is not False
        self._secret = hash_scopes if isinstance(hash_scopes, bytes) else None
        self._cache: dict[str, str] = {}

    def __call__(self, scope: Scope | StoredScope) -> str:
        if not self.hashed or type(scope) is StoredScope:
            return scope.id
        sid = scope.id
        stored = self._cache.get(sid)
        if stored is None:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()  # old windows' scopes are dead weight
            stored = self._cache[sid] = f"{scope.budget}\x1f#{self.digest(scope.key)}\x1f{scope.window}"  # type: ignore[union-attr]
        return stored

    @property
    def fingerprint(self) -> str:
        """What the store remembers of the setting: `plain`, `sha256`, or `hmac-sha256:` and a tag of the
        secret (an HMAC of a fixed text: it tells secrets apart and reveals nothing of them)."""
        if not self.hashed:
            return "plain"
        if self._secret is None:
            return "sha256"
        return "hmac-sha256:" + hmac.new(self._secret, b"policy_engine scope ids", hashlib.sha256).hexdigest()[:16]

    def check(self, stored: str | None, where: str) -> None:
        """Raise `ScopeIdsMismatch` unless the store's fingerprint (None: none yet) is this setting's."""
        if stored is not None and stored != self.fingerprint:
            raise ScopeIdsMismatch(
                f"{where} names its scopes with hash_scopes={_describe(stored)}, but this ledger has "
                f"hash_scopes={_describe(self.fingerprint)}: every process on one store needs the same setting "
                f"(and secret), or the same tenant would be counted in two budgets. Use a new file or prefix to change it.")

    def digest(self, key: str) -> str:
        """The stored form of one key (hex; 128 bits are plenty against collisions between keys)."""
        data = key.encode("utf-8", "surrogatepass")
        if self._secret is not None:
            return hmac.new(self._secret, data, hashlib.sha256).hexdigest()[:32]
        return hashlib.sha256(data).hexdigest()[:32]

    def stored(self, charges: Sequence[Charge]) -> tuple[tuple[StoredScope, int], ...]:
        """Charges with their scopes as the store names them (what a journal may keep)."""
        return tuple((StoredScope(self(s), s.limit, s.expires_at), a) for s, a in charges)


def _describe(fingerprint: str) -> str:
    return {"plain": "False", "sha256": "True"}.get(fingerprint, "<a secret>" if fingerprint.startswith("hmac") else repr(fingerprint))


def describe_charges(charges: Iterable[tuple[str, int]]) -> str:
    """Stored scope ids (hashed keys stay hashed) and amounts, for a log line: `budget/key/window=amount, ...`."""
    return ", ".join(f"{sid.replace(chr(0x1f), '/')}={amount}" for sid, amount in charges) or "-"
