"""`policy-engine calibrate`: fit measured throughput from decision logs and write a catalog overlay."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ..errors import PolicyEngineError
from . import EXIT_FINDINGS, EXIT_OK, UsageError

__all__ = ["VERBS", "setup_calibrate"]


def setup_calibrate(p: argparse.ArgumentParser) -> None:
    """Fit time to first token and output tokens per second from decision logs.

    Reads decision-log lines (JSON Lines, gzip allowed, - for stdin) and groups settled
    requests by model, platform and the speed they were served at. Streams give the time to
    first token and the output rate; non-streaming responses give a rate only after their
    model's stream-fitted TTFT is subtracted from their total time. Prints p10/p50/p90/p99,
    the mean and the standard deviation of each figure; -o writes a catalog overlay (the p50
    of each figure, `assumption: false`, the sample size and time range) for
    `--catalog` / `policy_engine.load(policy, catalog=FILE)`. Exit 0 when something was
    fitted, 1 when no record could be used, 2 on usage errors."""
    p.add_argument("logs", nargs="+", metavar="LOG", help="decision log (.jsonl, .jsonl.gz, or - for stdin)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the catalog overlay (YAML) here")
    p.add_argument("--format", choices=("text", "json"), default="text", help="report format (default text)")
    p.add_argument("--min-output-tokens", type=int, default=16, metavar="N",
                   help="ignore responses with fewer output tokens (default 16: timer noise dominates their rate)")
    p.add_argument("--catalog", metavar="FILE", help="catalog file extending the packaged models (to name models)")
    p.set_defaults(run=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from ..catalog import load_catalog
    from ..decisionlog.calibrate import calibrate
    from ..simulate import iter_log, open_log

    catalog = load_catalog(args.catalog) if args.catalog else load_catalog()

    def lines() -> object:
        for path in args.logs:
            try:
                stream = open_log(path)
            except PolicyEngineError as exc:
                raise UsageError(str(exc)) from None
            with stream:
                yield from iter_log(stream)

    if args.min_output_tokens < 1:
        raise UsageError("--min-output-tokens must be at least 1")
    result = calibrate(lines(), catalog, min_output_tokens=args.min_output_tokens)  # type: ignore[arg-type]
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as out:
                out.write(result.overlay_yaml())
        except OSError as exc:
            raise UsageError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    sys.stdout.write(result.render(args.format))
    return EXIT_OK if result.used else EXIT_FINDINGS


VERBS: dict[str, Callable[[argparse.ArgumentParser], None]] = {"calibrate": setup_calibrate}
