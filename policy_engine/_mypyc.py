"""The compiled decision path: mypyc's class attributes, which modules run compiled, and a way back to pure Python.

The modules every request runs through (listed in setup.py) are compiled to C with mypyc
when the build can; their .py sources ship beside them and are the same code. Python
imports a compiled module in preference to its source, so:

* `POLICY_ENGINE_PURE_PYTHON=1` in the environment makes this package import its sources
  instead (full tracebacks through the decision path; a check that both builds agree);
* `stale_modules()` names compiled modules whose source changed after the build, which
  would otherwise keep running the old code (the test suite and benchmarks refuse to run then).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

try:
    from mypy_extensions import mypyc_attr
except ImportError:  # the usual case at run time: the decorators only matter to the compiler

    def mypyc_attr(*attrs: str, **kwattrs: object):  # type: ignore[no-redef,misc]
        return lambda cls: cls


__all__ = ["mypyc_attr", "PURE_PYTHON", "compiled_modules", "stale_modules", "stale_message", "describe_build", "checked_build"]

PURE_PYTHON = os.environ.get("POLICY_ENGINE_PURE_PYTHON", "").strip() not in ("", "0")
_PACKAGE = Path(__file__).resolve().parent


class _SourcesFirst(importlib.abc.MetaPathFinder):
    """Finds this package's modules among its .py sources only, so compiled builds of them are skipped."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("policy_engine.") or path is None:
            return None
        for entry in path:
            finder = importlib.machinery.FileFinder(entry, (importlib.machinery.SourceFileLoader,
                                                            importlib.machinery.SOURCE_SUFFIXES))
            spec = finder.find_spec(fullname)
            if spec is not None:
                return spec
        return None


def prefer_sources() -> None:
    """Import every module of this package not yet imported from its .py source (idempotent)."""
    if not any(isinstance(f, _SourcesFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourcesFirst())


def _builds() -> list[tuple[str, Path, Path]]:
    """(module, compiled file, source file) for every compiled module in this package's directory."""
    found = []
    suffixes = importlib.machinery.EXTENSION_SUFFIXES  # the most specific first; ".so" ends them all
    for built in _PACKAGE.rglob("*"):
        suffix = next((s for s in suffixes if built.name.endswith(s)), None)
        if suffix is None:
            continue
        source = built.with_name(built.name[: -len(suffix)] + ".py")
        parts = source.relative_to(_PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found.append((module, built, source))
    return sorted(found)


def compiled_modules() -> list[str]:
    """The modules of this package imported from a compiled build (empty in pure Python)."""
    return [m for m, built, _ in _builds() if getattr(sys.modules.get(m), "__file__", None) == str(built)]


def stale_modules() -> list[str]:
    """Compiled modules whose source is newer than their build (in pure Python, none matter)."""
    if PURE_PYTHON:
        return []
    return [m for m, built, source in _builds() if source.exists() and source.stat().st_mtime > built.stat().st_mtime]


def stale_message(consequence: str) -> str | None:
    """What to do about stale compiled modules (None when there are none); `consequence` completes
    "...changed after it was compiled, so {consequence} the old build"."""
    stale = stale_modules()
    if not stale:
        return None
    return (f"{', '.join(stale)} changed after it was compiled, so {consequence} the old build: run `make test` or "
            "`make bench` (they rebuild), or set POLICY_ENGINE_PURE_PYTHON=1 to use the sources")


def describe_build() -> str:
    """Which build runs, for test headers and benchmark reports."""
    compiled = compiled_modules()
    if compiled:
        return f"compiled with mypyc ({len(compiled)} modules: {', '.join(m.removeprefix('policy_engine.') for m in compiled)})"
    why = "POLICY_ENGINE_PURE_PYTHON=1" if PURE_PYTHON else "no compiled modules: no C compiler at install, or POLICY_ENGINE_COMPILE=0"
    return f"pure Python ({why})"


def checked_build(consequence: str) -> str:
    """`describe_build()`, for a run that must not use stale compiled modules: exits with
    `stale_message(consequence)` when there are any."""
    stale = stale_message(consequence)
    if stale:
        raise SystemExit(stale)
    return describe_build()
