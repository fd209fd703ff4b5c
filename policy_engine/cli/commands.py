"""The verbs of `policy-engine`: each has a setup function (its options, whose docstring is
its --help) and a run function returning the exit code."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from ..errors import PolicyEngineError, PolicyError
from . import EXIT_FINDINGS, EXIT_OK, EXIT_USAGE, UsageError, gates
from .catalog import setup_catalog
from .review import setup_review

FORMATS_LINT = ("text", "json", "sarif", "github")
FORMATS_REPORT = ("text", "json", "markdown", "html")


def _settings(args: argparse.Namespace) -> Any:
    """The repository's settings (`.policy-engine.yaml` or `[tool.policy-engine]`), read once per command."""
    cached = getattr(args, "_settings", None)
    if cached is not None:
        return cached
    from ..config import RepoConfig, find_config, load_config

    explicit = getattr(args, "config", None)
    try:
        if getattr(args, "no_config", False):
            settings = RepoConfig()
        elif explicit:
            if not os.path.isfile(explicit):
                raise UsageError(f"no such settings file: {explicit}")
            settings = load_config(explicit)
        else:
            found = find_config()
            settings = load_config(found) if found is not None else RepoConfig()
    except PolicyError as exc:
        raise UsageError(f"invalid settings file:\n{exc.format()}") from None
    args._settings = settings
    return settings


def _catalog(args: argparse.Namespace) -> Any:
    from ..catalog import load_catalog

    path = getattr(args, "catalog", None)
    if not path:
        settings = _settings(args)
        path = settings.resolve(settings.catalog) if settings.catalog else None
    if not path:
        return load_catalog()
    if not os.path.isfile(path):
        raise UsageError(f"no such catalog file: {path}")
    return load_catalog(path)


def _add_catalog(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--catalog", metavar="FILE",
                        help="catalog file extending the packaged models and prices (default: `catalog:` of the settings file)")


def _paths(args: argparse.Namespace) -> list[str]:
    """The PATHs given, else the settings file's `paths:`."""
    if args.paths:
        return list(args.paths)
    settings = _settings(args)
    if settings.paths:
        return [settings.resolve(p) for p in settings.paths]
    raise UsageError("no PATH given, and no `paths:` in a .policy-engine.yaml (or [tool.policy-engine]) settings file")


def _root(args: argparse.Namespace) -> str:
    """The repository root SARIF URIs are relative to: the settings file's directory, else git's top level."""
    settings = _settings(args)
    if settings.root is not None:
        return str(settings.root)
    try:
        shown = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return os.getcwd()
    return shown.stdout.strip() if shown.returncode == 0 and shown.stdout.strip() else os.getcwd()


def _files(paths: list[str], *, tests: bool = False) -> list[Path]:
    from ..check import policy_files

    try:
        return policy_files(paths, tests=tests)
    except FileNotFoundError as exc:
        raise UsageError(f"no such file or directory: {exc.args[0]}") from None


def _write(text: str, out: IO[str] | None = None) -> None:
    (out or sys.stdout).write(text)


# -- lint -----------------------------------------------------------------------------------


def setup_lint(p: argparse.ArgumentParser) -> None:
    """Check policy files: YAML, schema, CEL, and the semantic and test analyses.

    Finds unreachable rules, rules a guardrail always blocks, models the catalog cannot
    price, models named where a model feature would decide, models whose fast mode is
    retired or retiring, budget keys that can be empty, expressions over the cost limit,
    rules no test reaches, and test cases that fail (PE305, also for *_test.yaml files).
    Exit 0 when clean, 1 on errors (or warnings with --strict), 2 on usage errors.
    Directories are searched for *.yaml / *.yml (files ending _test.yaml are test files,
    not policies). `# policy-engine: ignore[CODE]` on a line (or above a rule) silences that
    finding there; severities per code come from the settings file."""
    p.add_argument("paths", nargs="*", metavar="PATH", help="policy files or directories (default: the settings' paths)")
    p.add_argument("--format", choices=FORMATS_LINT, default="text", help="output format (default text)")
    p.add_argument("--strict", action="store_true", help="fail (exit 1) on warnings too")
    p.add_argument("--no-tests", action="store_true", help="skip running the tests (no PE302/PE304/PE305)")
    p.add_argument("--max-cost", type=int, metavar="N", help="expression cost limit (default: the engine's)")
    p.add_argument("--retirement-days", type=int, metavar="N", default=30,
                   help="warn (PE222) when a named model's fast mode retires within N days (default 30)")
    _add_catalog(p)
    p.set_defaults(run=run_lint)


def run_lint(args: argparse.Namespace) -> int:
    from ..check import exit_status, lint_any, render
    from ..compile import MAX_EXPRESSION_COST

    catalog = _catalog(args)
    paths = _paths(args)
    files = list(dict.fromkeys(_files(paths) + _files(paths, tests=True)))
    if not files:
        raise UsageError("no policy files found in " + ", ".join(paths))
    max_cost = args.max_cost if args.max_cost is not None else MAX_EXPRESSION_COST
    severities = dict(_settings(args).severity)
    results = [lint_any(f, catalog, max_cost=max_cost, run_tests=not args.no_tests, severities=severities,
                        retirement_days=args.retirement_days) for f in files]
    _write(render(results, args.format, root=_root(args) if args.format == "sarif" else None))
    return exit_status(results, args.strict)


# -- check (kept for scripts written against the skeleton) -----------------------------------


def setup_check(p: argparse.ArgumentParser) -> None:
    """Load and validate policy files (schema and CEL only; `lint` does more).

    Exit 0 when every file is valid, 1 when one is not, 2 on usage errors (a missing path,
    a directory holding no policy)."""
    p.add_argument("paths", nargs="*", metavar="PATH", help="policy files or directories (default: the settings' paths)")
    p.set_defaults(run=run_check)


def run_check(args: argparse.Namespace) -> int:
    from ..check import plural
    from ..compile import compile_file

    status = EXIT_OK
    paths = _paths(args)
    files = _files(paths)
    if not files:
        raise UsageError("no policy files found in " + ", ".join(paths))
    for path in files:
        try:
            compiled = compile_file(str(path))
        except PolicyError as exc:
            print(exc.format(), file=sys.stderr)
            status = EXIT_FINDINGS
            continue
        policy = compiled.policy
        print(f"{path}: ok ({policy.name}: {plural(len(policy.rules), 'rule')}, {plural(len(policy.budgets), 'budget')}, "
              f"{plural(len(policy.tests), 'test')})")
    return status


# -- test -----------------------------------------------------------------------------------


FORMATS_TEST = ("text", "json", "junit", "lcov", "cobertura")


def setup_test(p: argparse.ArgumentParser) -> None:
    """Run the policies' embedded tests and *_test.yaml files.

    A *_test.yaml file holds `tests:` (cases as in a policy) and optionally `policy:` (the
    file under test, relative to it; default: its name without _test). A policy named on
    the command line brings its <name>_test.yaml along. A failure prints the expectation
    against the decision, `-` expected and `+` got. --coverage lists rule outcomes
    (matched / not matched) and && / || operand outcomes (true / false) no test exercises;
    --threshold fails below a coverage percentage (default: `thresholds.coverage` of the
    settings file). --format junit writes JUnit XML; lcov and cobertura write the coverage
    (rules as functions, outcomes as branches, at their YAML lines). Exit 0 when every case
    passes (and coverage meets the threshold), 1 otherwise, 2 on usage errors."""
    p.add_argument("paths", nargs="*", metavar="PATH", help="policy files, test files or directories (default: the settings' paths)")
    p.add_argument("--coverage", action="store_true", help="report rule and branch coverage (implied by lcov and cobertura)")
    p.add_argument("--threshold", type=float, metavar="PERCENT", help="fail when coverage is below PERCENT (implies --coverage)")
    p.add_argument("--format", choices=FORMATS_TEST, default="text", help="output format (default text)")
    p.add_argument("-v", "--verbose", action="store_true", help="list passing cases too")
    _add_catalog(p)
    p.set_defaults(run=run_test)


def _suites(paths: list[str]) -> tuple[dict[str, list[tuple[Any, str]]], list[str]]:
    """Policy file -> the cases of its *_test.yaml files (with file:line), and the files that failed to load."""
    from ..check import is_test_file
    from ..testing.runner import load_test_file

    explicit = [Path(p) for p in paths if Path(p).is_file()]
    policies = [f for f in _files(paths) if not is_test_file(f)]
    test_files = [f for f in _files(paths, tests=True) if is_test_file(f)] + [f for f in explicit if is_test_file(f)]
    for policy in explicit:
        if not is_test_file(policy):
            sibling = policy.with_name(policy.stem + "_test" + policy.suffix)
            if sibling.is_file():
                test_files.append(sibling)
    suites: dict[str, list[tuple[Any, str]]] = {}
    problems: list[str] = []
    for policy in policies:
        suites.setdefault(os.path.normpath(policy), [])
    for name in dict.fromkeys(os.path.normpath(f) for f in test_files):
        try:
            tests, document, target = load_test_file(name)
        except PolicyError as exc:
            problems.append(exc.format())
            continue
        for index, case in enumerate(tests.tests):
            suites.setdefault(os.path.normpath(target), []).append((case, f"{name}:{document.locate(('tests', index))[0]}"))
    return suites, problems


def run_test(args: argparse.Namespace) -> int:
    from ..compile import compile_file
    from ..testing.runner import Coverage, expectation_diff, run_traced
    from . import formats

    threshold = args.threshold
    if threshold is None:
        threshold = _settings(args).thresholds.coverage
    if threshold is not None and not 0 <= threshold <= 100:
        raise UsageError("--threshold is a percentage between 0 and 100")
    coverage_on = args.coverage or threshold is not None or args.format in ("lcov", "cobertura")
    catalog = _catalog(args)
    paths = _paths(args)
    suites, problems = _suites(paths)
    if not suites and not problems:
        raise UsageError("no policy or test files found in " + ", ".join(paths))
    passed = failed = 0
    report: dict[str, Any] = {"policies": [], "passed": 0, "failed": 0}
    lines: list[str] = []
    coverages: list[tuple[str, Any]] = []
    total_items = total_covered = 0
    for policy_path, extra in suites.items():
        try:
            compiled = compile_file(policy_path)
        except PolicyError as exc:
            problems.append(exc.format())
            continue
        document = compiled.document
        cases = [(case, f"{policy_path}:{document.locate(('tests', i))[0]}") for i, case in enumerate(compiled.policy.tests)]
        cases += extra
        coverage = Coverage(compiled) if coverage_on else None
        entry: dict[str, Any] = {"file": policy_path, "policy": compiled.name, "cases": []}
        for index, (case, where) in enumerate(cases):
            started = time.perf_counter()
            result, trace = run_traced(compiled, case, catalog, index)
            elapsed = time.perf_counter() - started
            if coverage is not None:
                coverage.record(trace)
            diff_lines = [] if result.passed else expectation_diff(result, case)
            entry["cases"].append({"name": case.name, "where": where, "passed": result.passed,
                                   "failures": result.failures, "diff": diff_lines, "time_s": round(elapsed, 6)})
            if result.passed:
                passed += 1
                if args.verbose:
                    lines.append(f"PASS {where}: {case.name}")
            else:
                failed += 1
                lines.append(f"FAIL {where}: {case.name}")
                lines += [f"    {line}" for line in diff_lines]
        if coverage is not None:
            coverages.append((policy_path, coverage))
            total_items += len(coverage.items)
            total_covered += coverage.covered
            entry["coverage"] = {"percent": round(coverage.percent, 1), "covered": coverage.covered,
                                 "total": len(coverage.items),
                                 "missing": [{"rule": m.rule, "outcome": m.what, "line": m.line, "col": m.col}
                                             for m in coverage.missing()]}
            lines.append(f"coverage {policy_path}: {coverage.percent:.1f}% ({coverage.covered}/{len(coverage.items)})")
            lines += [f"    {policy_path}:{m.line}:{m.col}: rule {m.rule}: {_never(m.what)}" for m in coverage.missing()]
        report["policies"].append(entry)
    percent = 100.0 * total_covered / total_items if total_items else 100.0
    report.update(passed=passed, failed=failed, errors=problems)
    if coverage_on:
        report["coverage"] = round(percent, 1)
    below = threshold is not None and percent + 1e-9 < threshold
    if below:
        report["threshold"] = threshold
    for problem in problems:
        print(problem, file=sys.stderr)
    verdict = f"FAIL: coverage {percent:.1f}% is below the threshold of {threshold:g}%" if below else None
    if args.format == "text":
        lines.append("-" * 40)
        lines.append(f"PASS: {passed}/{passed + failed}" + (f"   coverage: {percent:.1f}%" if coverage_on else ""))
        lines += [verdict] if verdict else []
        _write("\n".join(lines) + "\n")
    else:
        _write({"json": lambda: json.dumps(report, indent=2) + "\n", "junit": lambda: formats.junit(report),
                "lcov": lambda: formats.lcov(coverages),
                "cobertura": lambda: formats.cobertura(coverages, _root(args))}[args.format]())
        if verdict:
            print(verdict, file=sys.stderr)  # the report itself is for a machine
    return EXIT_FINDINGS if failed or problems or below else EXIT_OK


def _never(what: str) -> str:
    """A coverage gap in words: no case makes the rule match, not match, or the operand true or false."""
    if what == "matched":
        return "no test case where it matches"
    if what == "not matched":
        return "no test case where it does not match"
    return f"no test case where {what}"


# -- explain --------------------------------------------------------------------------------


def setup_explain(p: argparse.ArgumentParser) -> None:
    """Explain one decision: every rule's outcome with the values it read, the guardrails,
    the ceilings, the budgets and the estimates.

    --request is a JSON or YAML file of Messages API parameters (`batch: true` marks a
    Message Batches request); --context the caller's context; --state the budget,
    rate-limit and conversation state, as a test case's `state:`."""
    p.add_argument("policy", metavar="POLICY", help="policy file")
    add_decision_inputs(p)
    p.set_defaults(run=run_explain)


def add_decision_inputs(p: argparse.ArgumentParser) -> None:
    """The options that describe one request to decide (explain, eval), and --format and --catalog."""
    p.add_argument("--request", required=True, metavar="FILE", help="Messages API parameters (JSON or YAML; - for stdin)")
    p.add_argument("--context", metavar="FILE", help="the caller's context (JSON or YAML)")
    p.add_argument("--state", metavar="FILE", help="budget / rate-limit / conversation state (JSON or YAML)")
    p.add_argument("--now", metavar="TIME", help="decision time, RFC 3339 (default 2026-12-01T12:00:00Z)")
    p.add_argument("--input-tokens", type=int, metavar="N", help="exact input token count (default: estimated)")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format (default text)")
    _add_catalog(p)


def run_explain(args: argparse.Namespace) -> int:
    from .explain import explain

    return explain(args)


# -- simulate and diff ----------------------------------------------------------------------


class _Progress:
    """A progress line on stderr, only when stderr is a terminal."""

    def __init__(self, stream: IO[bytes] | None, enabled: bool) -> None:
        self.enabled = enabled
        self.total = 0
        self.raw = None
        self.last = 0.0
        if enabled and stream is not None:
            raw = getattr(stream, "fileobj", None) or stream
            raw = getattr(raw, "raw", raw)
            try:
                self.total = os.fstat(raw.fileno()).st_size
                self.raw = raw
            except (OSError, AttributeError, ValueError):
                self.total = 0

    def __call__(self, lines: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < 0.2:
            return
        self.last = now
        text = f"\r{lines:>10,} requests"
        if self.total and self.raw is not None:
            try:
                done = min(1.0, self.raw.tell() / self.total)
                bar = "#" * int(done * 30)
                text = f"\r[{bar:<30}] {done:4.0%} {lines:>10,} requests"
            except (OSError, ValueError):
                pass
        sys.stderr.write(text)
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.last:
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()


def _open_requests(path: str) -> IO[bytes]:
    from ..simulate import open_log

    try:
        return open_log(path)
    except PolicyEngineError as exc:
        raise UsageError(str(exc)) from None


def log_time(ts: Any) -> datetime | None:
    """A log line's `ts` (RFC 3339, `Z` allowed, or epoch seconds) as an aware datetime; None if it is neither."""
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        try:
            return datetime.fromtimestamp(ts, timezone.utc)
        except (OverflowError, OSError, ValueError):
            return None
    if isinstance(ts, str):
        try:
            when = datetime.fromisoformat(ts[:-1] + "+00:00" if ts.endswith(("Z", "z")) else ts)
        except ValueError:
            return None
        return when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return None


def _compiled(spec: str) -> Any:
    """A policy file, or `rev:path` read from git (so CI can compare against the base branch)."""
    from ..compile import compile_file

    if os.path.exists(spec) or ":" not in spec:
        if not os.path.exists(spec):
            raise UsageError(f"no such file: {spec}")
        return compile_file(spec)
    rev, _, path = spec.partition(":")
    try:
        shown = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, check=False, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise UsageError(f"cannot run git to read {spec}: {exc}") from None
    if shown.returncode != 0:
        message = shown.stderr.decode("utf-8", "replace").strip() or "git show failed"
        raise UsageError(f"cannot read {spec} from git: {message}")
    return compile_file(spec, text=shown.stdout)


def _report_available(fmt: str) -> None:
    """--format html needs the `report` extra: say so before a long replay, as a usage error."""
    from ..report import ReportError, require_plotly

    if fmt == "html":
        try:
            require_plotly()
        except ReportError as exc:
            raise UsageError(str(exc)) from None


def setup_simulate(p: argparse.ArgumentParser) -> None:
    """Replay a request log through a policy and report what it would decide and cost.

    Each line of the log (JSON Lines, gzip allowed, - for stdin) holds `request`, and
    optionally `context`, `ts` (the decision time: budgets and windows evolve with it),
    `input_tokens`, `batch`, `usage` (else billed as the estimate expects), and `account`
    with the response's `headers` (and `status`) to replay fast rate-limit state. Reports
    the speed mix, cost and fast premium, latency saved, downgrades and rejects by
    reason, and the all-standard and all-fast baselines. --format markdown adds a chart of
    the spend per hour (mermaid, as GitHub renders it); --format html writes one
    self-contained page of charts (needs the `report` extra: pip install
    'policy-engine[report]').

    A decision log (the engine's DecisionLog, told by its content) replays too: each
    record is decided from its recorded features and billed with its recorded usage. A
    record lacking a feature the policy reads is skipped with a message. Exit 2 when the
    log cannot be read to its end (a truncated gzip file, a line with no end): the
    report then covers the lines before."""
    p.add_argument("policy", metavar="POLICY", help="policy file (or git rev:path)")
    p.add_argument("--requests", required=True, metavar="LOG",
                   help="request log or decision log (.jsonl, .jsonl.gz, or - for stdin)")
    p.add_argument("--format", choices=FORMATS_REPORT, default="text", help="output format (default text)")
    p.add_argument("--strict", action="store_true", help="exit 1 when some log lines are invalid")
    _add_log_options(p)
    _add_catalog(p)
    p.set_defaults(run=run_simulate)


def _add_log_options(p: argparse.ArgumentParser) -> None:
    from ..simulate import MAX_LINE_BYTES

    p.add_argument("--max-line-bytes", type=_positive_int, default=MAX_LINE_BYTES, metavar="N",
                   help=f"longest log line read (default {MAX_LINE_BYTES:,}: the Messages API's request size limit); "
                        "longer lines are invalid and skipped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _log_stopped(verb: str, stopped: Any) -> bool:
    """Say on stderr where and why the log could not be read to its end (the report covers the lines before)."""
    if stopped is None:
        return False
    print(f"policy-engine {verb}: the log could not be read to its end: {stopped}", file=sys.stderr)
    return True


def run_simulate(args: argparse.Namespace) -> int:
    from ..report import run_simulate as replay
    from ..simulate import iter_log

    _report_available(args.format)
    compiled = _compiled(args.policy)
    catalog = _catalog(args)
    with _open_requests(args.requests) as stream:
        progress = _Progress(stream, sys.stderr.isatty() and not args.no_progress)
        lines = iter_log(stream, args.max_line_bytes)
        report, text = replay(compiled, lines, args.format, catalog, progress=progress)
        progress.done()
    _write(text)
    if report.invalid:
        print(f"policy-engine simulate: {report.invalid} invalid log lines skipped (first: {report.errors[0]})",
              file=sys.stderr)
    if _log_stopped("simulate", lines.stopped):
        return EXIT_USAGE  # an unreadable input: the figures are partial, whatever --strict says
    return EXIT_FINDINGS if args.strict and report.invalid else EXIT_OK


def setup_diff(p: argparse.ArgumentParser) -> None:
    """Compare two policy versions over the same request log.

    Shows the decisions that change, grouped by (old -> new speed, rule), with cost and
    latency deltas. OLD and NEW are files or git revisions (`main:policies/default.yaml`);
    --format markdown gives a pull-request comment, with a chart of the spend per hour;
    --format html one self-contained page charting old against new (needs the `report`
    extra). Thresholds (options below, or the settings file's `thresholds:`) turn it into a
    gate: exit 1 when the change crosses one, and the report says which; exit 0 otherwise,
    2 on usage errors and on a log that cannot be read to its end. The log may be a
    request log or a decision log (told by its content), as for simulate."""
    p.add_argument("old", metavar="OLD", help="old policy: a file or git rev:path")
    p.add_argument("new", metavar="NEW", help="new policy: a file or git rev:path")
    p.add_argument("--requests", required=True, metavar="LOG",
                   help="request log or decision log (.jsonl, .jsonl.gz, or - for stdin)")
    p.add_argument("--format", choices=FORMATS_REPORT, default="text", help="output format (default text)")
    _add_log_options(p)
    _add_catalog(p)
    gates.add_options(p)
    p.set_defaults(run=run_diff)


def run_diff(args: argparse.Namespace) -> int:
    from ..report import run_diff as replay
    from ..simulate import iter_log

    _report_available(args.format)
    old, new = _compiled(args.old), _compiled(args.new)
    catalog = _catalog(args)
    with _open_requests(args.requests) as stream:
        progress = _Progress(stream, sys.stderr.isatty() and not args.no_progress)
        span = gates.LogSpan(iter_log(stream, args.max_line_bytes))
        result, text = replay(old, new, span, args.format, catalog, progress=progress)
        progress.done()
    found = gates.evaluate(result, span, args, _settings(args))
    out, err = gates.render(found, args.format, text)
    _write(out)
    if err:
        print(err, end="", file=sys.stderr)
    if _log_stopped("diff", span.stopped):
        return EXIT_USAGE  # an unreadable input: the comparison is partial, whatever the gates say
    return EXIT_FINDINGS if any(g.crossed for g in found) else EXIT_OK


# -- fmt ------------------------------------------------------------------------------------


def setup_fmt(p: argparse.ArgumentParser) -> None:
    """Normalize key order and indentation of policy files, keeping every comment.

    Rewrites files in place (the fix); --check only reports the files that would change
    (exit 1), --diff prints the changes. Plain values YAML 1.1 readers would retype (times,
    yes/no, on/off, octal-looking numbers) are quoted where the policy stays the same. A
    file is never rewritten unless the result parses to the same data with the same
    comments. Exit 0 when done (or nothing to change), 1 when --check/--diff found changes
    or a file is not YAML, 2 on usage errors."""
    p.add_argument("paths", nargs="*", metavar="PATH", help="policy or test files, or directories (default: the settings' paths)")
    p.add_argument("--check", action="store_true", help="exit 1 when a file would change; write nothing")
    p.add_argument("--diff", action="store_true", help="print a unified diff of the changes; write nothing")
    p.set_defaults(run=run_fmt)


def run_fmt(args: argparse.Namespace) -> int:
    import difflib

    from ..fmt import format_text

    status = EXIT_OK
    paths = _paths(args)
    files = _files(paths) + _files(paths, tests=True)
    for path in dict.fromkeys(files):
        try:
            original = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            print(f"{path}: cannot read: {exc}", file=sys.stderr)
            status = EXIT_FINDINGS
            continue
        try:
            formatted = format_text(original, str(path))
        except PolicyError as exc:
            print(exc.format(), file=sys.stderr)
            status = EXIT_FINDINGS
            continue
        if formatted == original:
            continue
        if args.check or args.diff:
            status = EXIT_FINDINGS
            if args.diff:
                _write("".join(difflib.unified_diff(original.splitlines(True), formatted.splitlines(True),
                                                    f"{path}", f"{path} (formatted)")))
            else:
                print(f"would reformat {path}")
            continue
        tmp = path.with_name(path.name + ".fmt-tmp")
        tmp.write_text(formatted, encoding="utf-8")
        os.replace(tmp, path)  # atomic: a crash leaves the old file, never half a new one
        print(f"formatted {path}")
    return status


# -- schema ---------------------------------------------------------------------------------


def setup_schema(p: argparse.ArgumentParser) -> None:
    """Print the JSON Schema of policy (default) or catalog files or decision-log records, or write them all."""
    p.add_argument("kind", nargs="?", choices=("policy", "catalog", "decision-record"), default="policy",
                   help="which schema to print")
    p.add_argument("--write", metavar="DIR", help="write every schema into DIR instead of printing one")
    p.set_defaults(run=run_schema)


def run_schema(args: argparse.Namespace) -> int:
    from ..schemas import SCHEMA_FILES, render, write_schemas

    if args.write:
        for path in write_schemas(args.write):
            print(f"wrote {path}")
        return EXIT_OK
    _write(render(SCHEMA_FILES[f"{args.kind}.schema.json"]()))
    return EXIT_OK


VERBS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "lint": setup_lint,
    "test": setup_test,
    "explain": setup_explain,
    "simulate": setup_simulate,
    "diff": setup_diff,
    "fmt": setup_fmt,
    "schema": setup_schema,
    "check": setup_check,
    "catalog": setup_catalog,
    "review": setup_review,
}
