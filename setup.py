"""Builds the decision path as C extensions with mypyc when it can, and as pure Python otherwise.

Only the modules every request runs through are compiled; they stay plain Python source
(the .py files ship too), so a build without a compiler behaves the same, only slower.

POLICY_ENGINE_COMPILE:
  auto (default)  compile when mypyc and a C compiler work; otherwise warn and build pure Python
  1               compile, and fail the build when that is not possible (what `make` uses)
  0               never compile
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

COMPILED = [
    "policy_engine/decide.py",
    "policy_engine/features.py",
    "policy_engine/tokens.py",
    "policy_engine/ledger/__init__.py",
    "policy_engine/catalog/_cost.py",
    "policy_engine/catalog/_rates.py",
    "policy_engine/compile.py",
    "policy_engine/telemetry.py",
    "policy_engine/ratelimit.py",
    "policy_engine/observe.py",
    "policy_engine/apply.py",
    "policy_engine/simulate.py",
    "policy_engine/integrations/_core.py",
]
MODE = os.environ.get("POLICY_ENGINE_COMPILE", "auto").strip().lower()
if MODE not in ("auto", "1", "0"):
    sys.exit(f"POLICY_ENGINE_COMPILE must be auto, 1 or 0, not {MODE!r}")


def _warn(why: object) -> None:
    print(f"policy_engine: building pure Python, without the compiled decision path ({why})", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """In `auto` mode a failed compilation leaves the pure-Python modules in place."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            if MODE != "auto":
                raise
            _warn(exc)

    def build_extension(self, ext):  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:
            if MODE != "auto":
                raise
            _warn(exc)


def _extensions() -> list:  # type: ignore[type-arg]
    if MODE == "0":
        return []
    try:
        from mypyc.build import mypycify

        # Imports outside the compiled set are analysed but not checked, and packages without
        # type information count as Any: the build does not depend on what else is installed.
        return mypycify(["--ignore-missing-imports", "--follow-imports=silent", *COMPILED],
                        opt_level="3", group_name="policy_engine")
    except BaseException as exc:  # mypycify exits on a type error
        if MODE != "auto":
            raise
        _warn(exc)
        return []


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
