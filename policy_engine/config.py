"""A repository's policy-engine settings: `.policy-engine.yaml`, or `[tool.policy-engine]` in pyproject.toml.

Found by walking up from the working directory to the repository root (the first directory
holding `.git`); the first directory with either file wins, and `.policy-engine.yaml` wins
over pyproject.toml in the same directory. Paths in it are relative to the file. Command-line
options override it; `--no-config` ignores it and `--config FILE` names one.

```yaml
paths: [policies/]                # what lint, test, fmt and check read when given no PATH
catalog: catalog/extra.yaml       # the user catalog (as --catalog)
severity: {PE302: error, PE240: "off"}   # per-code severity: error, warning, info or off
thresholds:
  coverage: 80                    # test --threshold
  max_cost_increase_usd_per_day: 5
  max_cost_increase_usd: 20       # over the whole log
  max_cost_increase_percent: 10
  max_speed_change_percent: 5     # share of requests whose speed changes
  fail_on_new_rejects: true
```
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from .errors import Diagnostic, PolicyError, did_you_mean

__all__ = ["RepoConfig", "Thresholds", "find_config", "load_config", "CONFIG_NAMES"]

CONFIG_NAMES = (".policy-engine.yaml", ".policy-engine.yml")


class Thresholds(BaseModel):
    """Gates: `test` fails below `coverage`; `diff` fails when the change crosses any other one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    coverage: float | None = Field(default=None, ge=0, le=100, description="Minimum coverage percentage (test --threshold).")
    max_cost_increase_usd_per_day: Decimal | None = Field(
        default=None, ge=0, description="diff: most the new policy may add to the cost, in USD per day of the log's traffic.")
    max_cost_increase_usd: Decimal | None = Field(
        default=None, ge=0, description="diff: most the new policy may add to the cost over the whole log, in USD.")
    max_cost_increase_percent: float | None = Field(
        default=None, ge=0, description="diff: most the new policy may add to the cost, in percent of the old cost.")
    max_speed_change_percent: float | None = Field(
        default=None, ge=0, le=100, description="diff: largest share of requests, in percent, whose speed may change.")
    fail_on_new_rejects: bool = Field(default=False, description="diff: fail when the new policy rejects a request the old one did not.")


class RepoConfig(BaseModel):
    """The settings file's content."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    paths: list[str] = Field(default_factory=list, description="Policy and test paths for lint, test, fmt and check.")
    catalog: str | None = Field(default=None, description="User catalog file extending the packaged one.")
    severity: dict[str, Literal["error", "warning", "info", "off"]] = Field(
        default_factory=dict, description="Severity per diagnostic code; `off` drops the code's findings.")
    thresholds: Thresholds = Field(default_factory=Thresholds)
    _file: str | None = PrivateAttr(default=None)
    _root: str | None = PrivateAttr(default=None)

    @property
    def file(self) -> str | None:
        """Where the settings came from; None for the defaults."""
        return self._file

    @property
    def root(self) -> str | None:
        """The directory the settings' paths are relative to; None for the defaults."""
        return self._root

    @field_validator("severity")
    @classmethod
    def _known_codes(cls, value: dict[str, str]) -> dict[str, str]:
        from .check import CODES

        for code in value:
            if code not in CODES:
                hint = did_you_mean(code, list(CODES))
                raise ValueError(f"unknown diagnostic code {code!r}" + (f" ({hint})" if hint else ""))
        return value

    def resolve(self, path: str) -> str:
        """A path from the settings, taken relative to the settings' directory (shown relative to here)."""
        if self.root is None or os.path.isabs(path):
            return path
        full = os.path.normpath(os.path.join(self.root, path))
        shown = os.path.relpath(full)
        return full if shown.startswith("..") else shown


def _pyproject_table(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([Diagnostic(str(path), 1, 1, "PE001", f"cannot read: {exc}")]) from None
    if "policy-engine" not in text:
        return None  # not ours: no need to parse it
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            if "[tool.policy-engine" not in text:
                return None
            raise PolicyError([Diagnostic(str(path), 1, 1, "PE001", "reading [tool.policy-engine] needs Python 3.11 or the "
                                          "tomli package (pip install tomli), or a .policy-engine.yaml")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line, col = getattr(exc, "lineno", 1) or 1, getattr(exc, "colno", 1) or 1
        raise PolicyError([Diagnostic(str(path), line, col, "PE001", f"TOML syntax error: {exc}")]) from None
    table = data.get("tool", {}).get("policy-engine")
    return table if isinstance(table, dict) else None


def find_config(start: str | os.PathLike[str] | None = None) -> Path | None:
    """The settings file that applies in `start` (default: the working directory), or None."""
    here = Path(start or os.getcwd()).resolve()
    for directory in (here, *here.parents):
        for name in CONFIG_NAMES:
            if (directory / name).is_file():
                return directory / name
        pyproject = directory / "pyproject.toml"
        if pyproject.is_file() and _pyproject_table(pyproject) is not None:
            return pyproject
        if (directory / ".git").exists():
            return None
    return None


def load_config(path: str | os.PathLike[str]) -> RepoConfig:
    """Read and validate one settings file; problems raise PolicyError with file:line:col where known."""
    from .load import read_yaml, validate

    path = Path(path)
    if path.name == "pyproject.toml":
        table = _pyproject_table(path)
        if table is None:
            raise PolicyError([Diagnostic(str(path), 1, 1, "PE012", "no [tool.policy-engine] table")])
        try:
            config = RepoConfig.model_validate(table)
        except ValidationError as exc:  # TOML keeps no positions: the key path says where
            raise PolicyError([Diagnostic(str(path), 1, 1, "PE011", f"[tool.policy-engine] {'.'.join(map(str, e['loc']))}: {e['msg']}")
                               for e in exc.errors(include_url=False)]) from None
    else:
        try:
            config = validate(read_yaml(path), RepoConfig)
        except PolicyError as exc:
            if not all(d.code == "PE005" for d in exc.diagnostics):
                raise
            config = RepoConfig()  # an empty settings file: every default
    config._file, config._root = str(path), str(path.parent)
    return config
