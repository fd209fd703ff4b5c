"""`policy-engine calibrate`: fit measured throughput from decision logs and write a catalog overlay."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator

from ..errors import PolicyEngineError
from . import EXIT_FINDINGS, EXIT_OK, UsageError

__all__ = ["VERBS", "setup_calibrate", "setup_import_otel"]


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

    def lines() -> Iterator[tuple[int, str]]:
        for path in args.logs:
            try:
                stream = open_log(path)
            except PolicyEngineError as exc:
                raise UsageError(str(exc)) from None
            with stream:
                yield from iter_log(stream)

    if args.min_output_tokens < 1:
        raise UsageError("--min-output-tokens must be at least 1")
    result = calibrate(lines(), catalog, min_output_tokens=args.min_output_tokens)
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as out:
                out.write(result.overlay_yaml())
        except OSError as exc:
            raise UsageError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    sys.stdout.write(result.render(args.format))
    return EXIT_OK if result.used else EXIT_FINDINGS


def setup_import_otel(p: argparse.ArgumentParser) -> None:
    """Convert OpenTelemetry GenAI spans (OTLP JSON) into decision-log lines for simulate, diff and calibrate.

    SPANS is an OTLP JSON document (`{"resourceSpans": ...}`) or JSON Lines of them (the
    collector's file exporter), - for stdin. Anthropic inference spans become one line each:
    model, max_tokens, usage (cache reads and writes included) and timing come from the
    span; the features no span carries (tools, images, documents, thinking, betas,
    cache_control, message count, the caller's context and account) get defaults listed in
    each line's `source.assumed` and in the README. A summary of what was converted and
    what was skipped (and why) goes to stderr. Exit 0 when some span was converted, 1 when
    none was, 2 on unreadable input."""
    p.add_argument("spans", metavar="SPANS", help="OTLP JSON file (or JSON Lines of documents, or - for stdin)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the decision-log lines here (default stdout)")
    p.set_defaults(run=run_import_otel)


def run_import_otel(args: argparse.Namespace) -> int:
    import json

    from ..decisionlog.otel import convert

    try:
        if args.spans == "-":
            text = sys.stdin.read()
        else:
            with open(args.spans, encoding="utf-8") as source:
                text = source.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {args.spans}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        records, report = convert(text)
    except PolicyEngineError as exc:
        raise UsageError(f"{args.spans}: {exc}") from None
    lines = "".join(json.dumps(r, separators=(",", ":"), ensure_ascii=False) + "\n" for r in records)
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as out:
                out.write(lines)
        except OSError as exc:
            raise UsageError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    else:
        sys.stdout.write(lines)
    print(report.render(), file=sys.stderr)
    return EXIT_OK if records else EXIT_FINDINGS


VERBS: dict[str, Callable[[argparse.ArgumentParser], None]] = {"calibrate": setup_calibrate,
                                                                "import-otel": setup_import_otel}
