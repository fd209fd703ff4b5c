"""Loading the catalog: the packaged file, a user file that extends it, or one that replaces it.

Parsing and validation go through the project loader (`policy_engine.load.read_yaml` and
`validate`), so catalog problems are reported at file:line:col like policy problems.
"""

from __future__ import annotations

import dataclasses
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from policy_engine.errors import Diagnostic, PolicyError
from policy_engine.load import Document, read_yaml, validate

from ._models import Catalog

DEFAULT_CATALOG_PATH = Path(__file__).with_name("catalog.yaml")

# Blocks that carry a price and its provenance: an override replaces them whole, so a user's
# price never ends up paired with the packaged `source` (or with half of the packaged tiers).
_ATOMIC_MODEL_BLOCKS = frozenset({"standard", "cache", "data_residency", "batch"})


def _merge(base: Any, over: Any, path: tuple[Any, ...] = ()) -> Any:
    """Deep-merge `over` onto `base`: mappings key by key down to each model's blocks;
    lists, scalars and priced blocks (standard, fast.pricing, cache, data_residency, batch)
    are replaced whole. Neither argument is modified."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return over
    # path: () / providers / <provider> / models / <model> / <block> / ...
    if len(path) == 5 and path[2] == "models" and path[4] in _ATOMIC_MODEL_BLOCKS:
        return over
    if len(path) == 6 and path[2] == "models" and path[4:6] == ("fast", "pricing"):
        return over
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _merge(base[key], value, (*path, key)) if key in base else value
    return merged


@lru_cache(maxsize=1)
def _default_document() -> Document:
    return read_yaml(DEFAULT_CATALOG_PATH)


@lru_cache(maxsize=1)
def _default_catalog() -> Catalog:
    return _validated(_default_document())


_PROVENANCE = ("missing required key 'source'", "missing required key 'as_of'")


def _validated(document: Document) -> Catalog:
    """`validate`, with a price that lacks its provenance reported as such (PE224)."""
    try:
        return validate(document, Catalog)
    except PolicyError as exc:
        diagnostics = [
            dataclasses.replace(d, code="PE224", message=d.message.replace("missing required key", "price without its")
                                + ": every price needs the page or contract it comes from, and the day it was read",
                                hint="add `source: <where the figure comes from>` and `as_of: YYYY-MM-DD` to the block")
            if d.code == "PE012" and d.message.startswith(_PROVENANCE) else d
            for d in exc.diagnostics
        ]
        raise PolicyError(diagnostics, exc.sources) from None


def load_catalog(path: str | os.PathLike[str] | None = None, *, extend: bool = True) -> Catalog:
    """Load the model and price catalog.

    * `path=None`: the packaged catalog.yaml (validated once per process, then shared:
      a Catalog is immutable).
    * `path` and `extend=True` (default): the user file is deep-merged onto the packaged one.
      Providers and models merge by id and the user's entries win; inside a model, keys merge
      one by one, except the priced blocks `standard`, `fast.pricing`, `cache`,
      `data_residency` and `batch`, which the user replaces whole, provenance included.
      So a user file can set only `fast.pricing` of one model, or add a model.
    * `path` and `extend=False`: the user file is the whole catalog.

    Raises PolicyError with file:line:col diagnostics (YAML syntax, duplicate keys, unknown
    keys, wrong types, prices that are not whole pico-dollars per token). Problems in a
    merged catalog are reported against the user's file.
    """
    if path is None:
        return _default_catalog()
    user = read_yaml(path)
    if not extend:
        return _validated(user)
    if not isinstance(user.data, dict):
        line, col = user.locate(())
        raise PolicyError(
            [Diagnostic(user.file, line, col, "PE011", "a catalog file must be a mapping (providers: ...)")],
            {user.file: user.source},
        )
    merged = dataclasses.replace(user, data=_merge(_default_document().data, user.data))
    return _validated(merged)
