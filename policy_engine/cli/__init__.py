"""`policy-engine`: the command line, with verbs in the style of OPA's CLI.

Exit codes: 0 success, 1 findings or failures, 2 usage errors (bad options, missing
files, unreadable inputs), 3 an internal error (a bug: please report it). Bad input
is reported as diagnostics, never as a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from ..errors import PolicyEngineError, PolicyError

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FINDINGS", "EXIT_USAGE", "EXIT_INTERNAL"]

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3

Command = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """The command line itself is wrong: exit 2 with this message."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse would exit from inside parse_args; main() turns this into exit code 2.
        raise UsageError(f"{self.prog}: {message}")


def _verbs() -> dict[str, Callable[[argparse.ArgumentParser], None]]:
    from . import calibrate, commands, serve, tools

    return {**commands.VERBS, **tools.VERBS, **calibrate.VERBS, **serve.VERBS}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="policy-engine",
        description="Decide per Anthropic Messages API request whether to use fast mode, from YAML/CEL policies.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", parser_class=_Parser)
    for name, setup in _verbs().items():
        verb = verbs.add_parser(name, **_help(setup))
        setup(verb)
        _add_settings(verb)
    return parser


def _add_settings(verb: argparse.ArgumentParser) -> None:
    group = verb.add_argument_group("settings")
    group.add_argument("--config", metavar="FILE",
                       help="settings file (default: .policy-engine.yaml or pyproject.toml's [tool.policy-engine], "
                            "searched from here up to the repository root)")
    group.add_argument("--no-config", action="store_true", help="ignore any settings file")


def _help(setup: Callable[..., None]) -> dict[str, str]:
    doc = inspect.cleandoc(setup.__doc__ or "")
    first = doc.split("\n\n")[0].replace("\n", " ")
    return {"help": first[0].lower() + first[1:].rstrip(".") if first else "", "description": doc,
            "formatter_class": argparse.RawDescriptionHelpFormatter}  # type: ignore[dict-item]


def _version() -> str:
    from .. import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help and --version
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_OK
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.run(args))
    except UsageError as exc:
        print(f"policy-engine {args.verb}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PolicyError as exc:
        print(exc.format(), file=sys.stderr)
        return EXIT_FINDINGS
    except PolicyEngineError as exc:
        print(f"policy-engine {args.verb}: {exc}", file=sys.stderr)
        return EXIT_FINDINGS
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK  # `policy-engine ... | head`: the reader has what it wanted
    except Exception as exc:  # noqa: BLE001 - a bug must not show users a traceback
        print(f"policy-engine {args.verb}: internal error, please report it: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
