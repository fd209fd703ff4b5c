"""`policy-engine`: the command line, with verbs in the style of OPA's CLI.

Exit codes: 0 success, 1 findings or failures, 2 usage errors. Bad input is
reported as diagnostics, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import PolicyEngineError, PolicyError

__all__ = ["main"]

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2

Command = Callable[[argparse.Namespace], int]


def _schema(args: argparse.Namespace) -> int:
    from .schemas import SCHEMA_FILES, render, write_schemas

    if args.write:
        for path in write_schemas(args.write):
            print(f"wrote {path}")
        return EXIT_OK
    sys.stdout.write(render(SCHEMA_FILES[f"{args.kind}.schema.json"]()))
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    from .load import load_policy

    status = EXIT_OK
    for path in _policy_files(args.paths):
        try:
            policy = load_policy(path)
        except PolicyError as exc:
            print(exc.format(), file=sys.stderr)
            status = EXIT_FINDINGS
            continue
        print(f"{path}: ok ({policy.name}: {len(policy.rules)} rules, {len(policy.budgets)} budgets, {len(policy.tests)} tests)")
    return status


def _policy_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*.y*ml") if p.suffix in (".yaml", ".yml")))
        else:
            files.append(path)
    return files


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="policy-engine",
        description="Decide per Anthropic Messages API request whether to use fast mode, from YAML/CEL policies.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND")

    check = verbs.add_parser("check", help="load and validate policy files", description="Load and validate policy files.")
    check.add_argument("paths", nargs="+", metavar="PATH", help="policy files or directories")
    check.set_defaults(run=_check)

    schema = verbs.add_parser("schema", help="print or write the JSON Schemas",
                              description="Print the JSON Schema of policy (default) or catalog files, or write both.")
    schema.add_argument("kind", nargs="?", choices=("policy", "catalog"), default="policy", help="which schema to print")
    schema.add_argument("--write", metavar="DIR", help="write every schema into DIR instead of printing one")
    schema.set_defaults(run=_schema)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.run(args))
    except PolicyError as exc:
        print(exc.format(), file=sys.stderr)
        return EXIT_FINDINGS
    except PolicyEngineError as exc:
        print(f"policy-engine: {exc}", file=sys.stderr)
        return EXIT_FINDINGS
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
