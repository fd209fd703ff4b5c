"""Replay a request log through a policy: what it would decide, cost and save.

A log is JSON Lines (optionally gzip-compressed); each line is one request:

    {"ts": "2026-03-02T09:15:02Z", "request": {...Messages API params...},
     "context": {...}, "input_tokens": 5120, "batch": false,
     "usage": {"input_tokens": 120, "cache_read_input_tokens": 5000, "output_tokens": 811},
     "account": "ws:prod", "headers": {"anthropic-fast-output-tokens-remaining": "0", ...}, "status": 200}

Only `request` is required. `ts` (RFC 3339 or epoch seconds) is the decision time:
budgets and their calendar windows, and stickiness, evolve with it; a line without
one takes the previous line's time. `input_tokens` is an exact prompt size (else the
engine estimates it). `usage` is what the response reported; the request is billed
for it at the speed the policy chose. Without usage a request is billed as its
estimate expects: the expected input tokens and `max_tokens` of output. `headers`
are the response's headers: their `anthropic-fast-*` rate-limit figures (and, with
`"status": 429`, `retry-after`) are taken in at the line's time for `account`
(default "default"), so later lines see them as `ratelimit.*` and in the
rate_limited guardrail, as a live engine fed by the middleware would. A log that
puts `request` last (as scripts/gen_requests.py writes it) parses faster: identical
requests are then parsed once.

Every line is decided and settled by a real `Engine` with the policy's compiled
programs, so the replay cannot disagree with production: `settle` and `release` as
they are, and `decide` through `Engine._decide_scanned`, the same decision given the
request's `request_features`, which the replay computes once per distinct request (its
parsed requests are shared and never change). What the replay adds: a `MemoryLedger`
on the replay's clock, request parsing and scanning shared by identical requests, both
prices of every line for the baselines, and the report. Its own per-line work is kept small next to
the engine's (benchmarks/bench_simulate.py).

A decision log (`decisionlog.DecisionLog`'s JSON Lines) replays too: a line whose `record` is
`policy_engine.decision` is decided from its recorded features through `Engine._finish`, the
engine's own path after feature extraction, and billed with its recorded usage (see
`Replayer._step_recorded`). Lines are read in bounded memory (`LogLines`): a line over the cap is
skipped, and a log that cannot be read on (a truncated gzip file, a line with no end) stops the
lines there with `stopped` saying where.
"""

from __future__ import annotations

import gzip
import io
import json
import sys
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from operator import truediv
from typing import IO, Any, Final, cast

from .catalog import Catalog, UsageCounts, load_catalog, parse_usage, to_usd
from .compile import CompiledPolicy
from .decide import Decision, Engine
from .decisionlog import DecisionLog, Observed
from .decisionlog._record import RECORD_KIND, RECORD_VERSION
from .errors import PolicyEngineError
from .features import REQUEST, request_features
from .ledger import MemoryLedger
from .testing.runner import DEFAULT_TEST_TIME
from .tokens import estimate_input_tokens

__all__ = ["DiffReport", "LogError", "LogLines", "MAX_LINE_BYTES", "MissingFeatures", "Outcome", "Report", "Replayer", "diff",
           "iter_log", "open_log", "simulate", "START_TIME"]

START_TIME = DEFAULT_TEST_TIME
"""Decision time of the lines before the first one that carries a `ts`."""

_REQUEST_KEY: Final = ',"request":'
_CACHE_MAX: Final = 50_000


class LogError(PolicyEngineError):
    """A log line is not a valid record; `line` is its 1-based number."""

    def __init__(self, line: int, message: str) -> None:
        self.line = line
        super().__init__(f"line {line}: {message}")


class MissingFeatures(LogError):
    """A decision-log record lacks request features the policy reads (a record older than the feature)."""

    def __init__(self, line: int, features: list[str]) -> None:
        self.features = features
        named = ", ".join(f"request.{f}" for f in features)
        super().__init__(line, f"the record has no {named}, which a replayed policy reads (a record written before "
                               f"{'that feature' if len(features) == 1 else 'those features'} existed); skipped")


class Released(LogError):
    """A decision-log record of a request that was released: never sent, so there is nothing to bill or replay."""


@dataclass(slots=True, init=False)
class Outcome:
    """What the policy did with one log line, and what that cost."""

    line: int
    speed: str
    """`fast`, `standard`, or `rejected`."""
    rule: str
    outcome: str
    forced_by: str | None
    cost_micro: int
    standard_micro: int
    fast_micro: int | None
    """The line's usage priced at fast; None when the API would not run it fast."""
    latency_s: float
    standard_latency_s: float
    fast_latency_s: float | None
    priced: bool
    at: float
    """The line's decision time, epoch seconds (the replay's clock)."""

    # Written out: the __init__ @dataclass generates is interpreted code, one call per log line.
    def __init__(self, line: int, speed: str, rule: str, outcome: str, forced_by: str | None, cost_micro: int,
                 standard_micro: int, fast_micro: int | None, latency_s: float, standard_latency_s: float,
                 fast_latency_s: float | None, priced: bool, at: float = 0.0) -> None:
        self.line = line
        self.speed = speed
        self.rule = rule
        self.outcome = outcome
        self.forced_by = forced_by
        self.cost_micro = cost_micro
        self.standard_micro = standard_micro
        self.fast_micro = fast_micro
        self.latency_s = latency_s
        self.standard_latency_s = standard_latency_s
        self.fast_latency_s = fast_latency_s
        self.priced = priced
        self.at = at


# -- reading the log ------------------------------------------------------------------------


def open_log(path: str, stdin: IO[bytes] | None = None) -> IO[bytes]:
    """A binary stream of the log's lines; `-` is stdin; gzip is detected by its magic bytes."""
    raw: IO[bytes]
    if path == "-":
        raw = stdin if stdin is not None else sys.stdin.buffer
    else:
        try:
            raw = open(path, "rb")  # noqa: SIM115 - closed by the caller through the returned stream
        except OSError as exc:
            raise PolicyEngineError(f"cannot read {path}: {exc.strerror or exc}") from None
    buffered = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw)  # type: ignore[arg-type,type-var]
    if buffered.peek(2)[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[return-value]
    return buffered


MAX_LINE_BYTES: Final = 32 * 1024 * 1024
"""The longest log line read (bytes, without its newline): the Messages API's request size limit, so a
longer line cannot hold a request the API took. Longer lines are invalid and skipped."""
ENDLESS_FACTOR: Final = 64
"""A line still without its newline this many caps past its start ends the reading: the input is no log
(`/dev/zero`, a binary file), and skipping it would never end."""
_SKIP_CHUNK: Final = 1024 * 1024

_UNREADABLE: Final = "\x00"
"""Starts the text `iter_log` yields for a line it could not read (the rest says why); `Replayer.parse`
makes it that line's LogError. No JSON text starts with it, so it costs the valid lines nothing."""


class LogLines:
    """(line number, text) of each non-blank line of a log stream, read in bounded memory.

    A line longer than `max_line_bytes` is read no further than that: it is skipped to its end, in
    chunks, and yielded as an unreadable line (so the replay counts it invalid). Where reading cannot
    go on, the lines stop and `stopped` says why and where: a compressed log that ends early or is
    corrupt, a line with no end in sight, a read error. The lines before it were yielded as usual.
    """

    def __init__(self, stream: IO[bytes], max_line_bytes: int = MAX_LINE_BYTES) -> None:
        if type(max_line_bytes) is not int or max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be a positive int, got {max_line_bytes!r}")
        self.stream = stream
        self.max_line_bytes = max_line_bytes
        self.stopped: LogError | None = None
        """Why the lines ended before the end of the log, at which line (None: they did not)."""

    def __iter__(self) -> Iterator[tuple[int, str]]:
        readline = self.stream.readline
        cap = self.max_line_bytes
        number = 0
        while True:
            line = number + 1
            too_long = False
            try:
                raw = readline(cap + 1)
                if len(raw) > cap and raw[-1] != 10:  # cap + 1 bytes and no newline among them
                    too_long = True
                    self._skip(line, len(raw))
            except (EOFError, zlib.error, OSError) as exc:
                self.stopped = _read_error(line, exc)
                return
            if not raw or self.stopped is not None:
                return
            number = line
            if too_long:
                yield number, f"{_UNREADABLE}the line is longer than {cap:,} bytes (the line cap); skipped"
                continue
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                yield number, f"{_UNREADABLE}not UTF-8 text ({exc.reason} at byte {exc.start})"
                continue
            if text:
                if text[0] == _UNREADABLE:  # not JSON either way; never to be taken for the marker
                    text = _UNREADABLE + "invalid JSON: the line starts with a NUL byte"
                yield number, text

    def _skip(self, number: int, seen: int) -> None:
        """Read past the rest of an over-long line, a chunk at a time; give up on one with no end in sight."""
        readline = self.stream.readline
        limit = self.max_line_bytes * ENDLESS_FACTOR
        while True:
            chunk = readline(_SKIP_CHUNK)
            if not chunk or chunk[-1] == 10:
                return
            seen += len(chunk)
            if seen > limit:
                self.stopped = LogError(number, f"no end of line after {seen:,} bytes ({ENDLESS_FACTOR} times the "
                                                f"{self.max_line_bytes:,}-byte line cap): this is not a log; the "
                                                f"report covers {_lines(number - 1)} before it")
                return


def _read_error(number: int, exc: BaseException) -> LogError:
    """Where and why the log could not be read on; every line before `number` was."""
    before = f"the report covers {_lines(number - 1)} before it"
    if isinstance(exc, EOFError):
        return LogError(number, f"the compressed log ends early (a truncated gzip file); {before}")
    if isinstance(exc, (zlib.error, gzip.BadGzipFile)):
        return LogError(number, f"the compressed log is corrupt ({exc}); {before}")
    return LogError(number, f"cannot read the log: {getattr(exc, 'strerror', None) or exc}; {before}")


def _lines(count: int) -> str:
    return "no line" if count == 0 else "the 1 line" if count == 1 else f"the {count:,} lines"


def iter_log(stream: IO[bytes], max_line_bytes: int = MAX_LINE_BYTES) -> LogLines:
    """(line number, text) of each non-blank line; lines it cannot read become LogError lines later,
    and where it cannot read on, `.stopped` says so (see `LogLines`)."""
    return LogLines(stream, max_line_bytes)


# -- the report -----------------------------------------------------------------------------


@dataclass
class _Scenario:
    cost: int = 0
    latency_s: float = 0.0


@dataclass
class Report:
    """Everything `simulate` prints, as exact integers where money is concerned."""

    policy: str
    version: str
    lines: int = 0
    invalid: int = 0
    errors: list[str] = field(default_factory=list)
    speeds: Counter[str] = field(default_factory=Counter)
    rules: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    downgrades: Counter[str] = field(default_factory=Counter)
    rejects: Counter[str] = field(default_factory=Counter)
    unpriced: int = 0
    with_usage: int = 0
    cost: int = 0
    premium: int = 0
    latency_s: float = 0.0
    policy_standard_latency_s: float = 0.0
    all_standard: _Scenario = field(default_factory=_Scenario)
    all_fast: _Scenario = field(default_factory=_Scenario)
    elapsed_s: float = 0.0
    missing_features: Counter[str] = field(default_factory=Counter)
    """Decision-log lines skipped for lacking a feature the policy reads, by feature (also in `invalid`)."""
    released: int = 0
    """Decision-log records of released requests (never sent): not replayed, not invalid."""
    stopped: str | None = None
    """Why the log could not be read to its end, at which line: the report covers the lines before it."""

    MAX_ERRORS = 20

    def add(self, o: Outcome) -> None:
        self.speeds[o.speed] += 1
        self.rules[o.rule][o.speed] += 1
        if o.outcome == "downgraded":
            self.downgrades[o.forced_by or "unknown"] += 1
        elif o.outcome == "rejected":
            self.rejects[o.forced_by or "unknown"] += 1
        if not o.priced:
            self.unpriced += 1
        self.all_standard.cost += o.standard_micro
        self.all_standard.latency_s += o.standard_latency_s
        fast_cost = o.fast_micro if o.fast_micro is not None else o.standard_micro
        self.all_fast.cost += fast_cost
        self.all_fast.latency_s += o.fast_latency_s if o.fast_latency_s is not None else o.standard_latency_s
        if o.speed == "rejected":
            return
        self.cost += o.cost_micro
        self.latency_s += o.latency_s
        self.policy_standard_latency_s += o.standard_latency_s
        if o.speed == "fast":
            self.premium += o.cost_micro - o.standard_micro

    def error(self, exc: LogError) -> None:
        if isinstance(exc, Released):
            self.released += 1
            return
        if isinstance(exc, MissingFeatures):
            for name in exc.features:
                self.missing_features["request." + name] += 1
        self.invalid += 1
        if len(self.errors) < self.MAX_ERRORS:
            self.errors.append(str(exc))

    @property
    def decided(self) -> int:
        return sum(self.speeds.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: money as exact decimal strings of dollars, latency in seconds."""
        decided = self.decided
        return {
            "policy": {"name": self.policy, "version": self.version},
            "requests": {"lines": self.lines, "decided": decided, "invalid": self.invalid,
                         "with_usage": self.with_usage, "unpriced": self.unpriced, "released": self.released,
                         "missing_features": dict(self.missing_features.most_common())},
            "stopped": self.stopped,
            "speed_mix": {s: self.speeds.get(s, 0) for s in ("fast", "standard", "rejected")},
            "cost": {"total_usd": _usd(self.cost), "fast_premium_usd": _usd(self.premium)},
            "latency": {"saved_s": round(self.policy_standard_latency_s - self.latency_s, 3),
                        "total_s": round(self.latency_s, 3)},
            "downgrades": dict(self.downgrades.most_common()),
            "rejects": dict(self.rejects.most_common()),
            "rules": {rule: dict(counts) for rule, counts in sorted(self.rules.items())},
            "baselines": {
                "all_standard": {"cost_usd": _usd(self.all_standard.cost), "latency_s": round(self.all_standard.latency_s, 3)},
                "all_fast": {"cost_usd": _usd(self.all_fast.cost), "latency_s": round(self.all_fast.latency_s, 3),
                             "latency_saved_s": round(self.all_standard.latency_s - self.all_fast.latency_s, 3)},
            },
            "errors": list(self.errors),
        }

    # -- rendering --------------------------------------------------------------------------

    def _rows(self) -> list[tuple[str, str, str, str]]:
        """(scenario, cost, premium over all-standard, latency saved) for the three scenarios."""
        std = self.all_standard
        return [
            ("this policy", _money(self.cost), _money(self.premium),
             _seconds(self.policy_standard_latency_s - self.latency_s)),
            ("all standard", _money(std.cost), _money(0), _seconds(0.0)),
            ("all fast", _money(self.all_fast.cost), _money(self.all_fast.cost - std.cost),
             _seconds(std.latency_s - self.all_fast.latency_s)),
        ]

    def _by_rule(self) -> list[tuple[str, Counter[str]]]:
        """Rules by how many requests they decided, most first (ties by name)."""
        return sorted(self.rules.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))

    def render_text(self) -> str:
        d = self.decided
        lines = [f"policy {self.policy} @{self.version}: {d} request{'' if d == 1 else 's'} decided"
                 + (f", {self.invalid} invalid lines skipped" if self.invalid else "")]
        lines.append("speed mix:   " + "   ".join(f"{s} {self.speeds.get(s, 0)} ({_pct(self.speeds.get(s, 0), d)})"
                                                 for s in ("fast", "standard", "rejected")))
        lines.append(f"{'':14}{'cost':>14}{'fast premium':>16}{'latency saved':>16}")
        for name, cost, premium, saved in self._rows():
            lines.append(f"  {name:12}{cost:>14}{premium:>16}{saved:>16}")
        if self.unpriced:
            lines.append(f"note: {self.unpriced} requests use a model the catalog cannot price; they count as the "
                         "policy's on_unpriced_model says (conservative: the catalog's dearest rates)")
        for title, counter in (("downgrades", self.downgrades), ("rejects", self.rejects)):
            if counter:
                lines.append(f"{title} by reason: " + ", ".join(f"{k} {v}" for k, v in counter.most_common()))
        lines.append("by rule:")
        for rule, counts in self._by_rule():
            lines.append(f"  {rule:32} " + "  ".join(f"{s} {counts[s]}" for s in ("fast", "standard", "rejected") if counts.get(s)))
        lines.extend(self._notes())
        lines.extend(f"invalid: {e}" for e in self.errors)
        if self.stopped:
            lines.append(f"stopped: {self.stopped}")
        return "\n".join(lines) + "\n"

    def _notes(self) -> list[str]:
        """What a replay from a decision log skipped, in words."""
        notes = []
        if self.missing_features:
            total = sum(self.missing_features.values())
            notes.append(f"missing features: records lack a feature a replayed policy reads ({total} of the invalid "
                         "lines; older records): " + ", ".join(f"{k} {v}" for k, v in self.missing_features.most_common()))
        if self.released:
            notes.append(f"released: {self.released} record{'' if self.released == 1 else 's'} of requests never "
                         "sent, not replayed")
        return notes

    def render_markdown(self) -> str:
        d = self.decided
        out = [f"### Simulation of `{self.policy}` (@{self.version}) over {d} requests", ""]
        out.append("| | fast | standard | rejected |")
        out.append("|---|---:|---:|---:|")
        out.append("| requests | " + " | ".join(f"{self.speeds.get(s, 0)} ({_pct(self.speeds.get(s, 0), d)})"
                                                for s in ("fast", "standard", "rejected")) + " |")
        out += ["", "| scenario | cost | fast premium | latency saved |", "|---|---:|---:|---:|"]
        out += [f"| {name} | {cost} | {premium} | {saved} |" for name, cost, premium, saved in self._rows()]
        if self.downgrades or self.rejects:
            out += ["", "| | reason | requests |", "|---|---|---:|"]
            out += [f"| downgrade | `{k}` | {v} |" for k, v in self.downgrades.most_common()]
            out += [f"| reject | `{k}` | {v} |" for k, v in self.rejects.most_common()]
        out += ["", "| rule | fast | standard | rejected |", "|---|---:|---:|---:|"]
        out += [f"| `{rule}` | " + " | ".join(str(counts.get(s, 0)) for s in ("fast", "standard", "rejected")) + " |"
                for rule, counts in self._by_rule()]
        notes = []
        if self.unpriced:
            notes.append(f"{self.unpriced} requests use a model the catalog cannot price; they count as the policy's "
                         "on_unpriced_model says (conservative: the catalog's dearest rates).")
        if self.invalid:
            notes.append(f"{self.invalid} invalid log lines were skipped.")
        notes.extend(n[0].upper() + n[1:] + "." for n in self._notes())
        if self.stopped:
            notes.append(f"The log could not be read to its end: {self.stopped}.")
        if notes:
            out += [""] + [f"> {n}" for n in notes]
        return "\n".join(out) + "\n"

    def render_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def render(self, fmt: str) -> str:
        return {"text": self.render_text, "markdown": self.render_markdown, "json": self.render_json}[fmt]()


def _usd(micro: int) -> str:
    return str(to_usd(micro).quantize(Decimal("0.000001")))


def _money(micro: int) -> str:
    sign = "-" if micro < 0 else ""
    return f"{sign}${abs(to_usd(micro)).quantize(Decimal('0.01')):,}"


def _seconds(s: float) -> str:
    return f"{s / 3600:,.1f} h" if abs(s) >= 3600 else f"{s:,.0f} s"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "0.0%"


# -- the replay -----------------------------------------------------------------------------


_scan_json: Final[Any] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
"""The stdlib's C scanner without `json.loads`'s wrappers: (value, end) of the JSON value at an index.

Not orjson: it saves about 1.4 us a line here, but it reads integers beyond 64 bits as
floats, and the check that would catch them costs more than it saves. msgspec is exact
but saves only about 0.6 us. Neither is worth a second parser to keep in step."""


def _json_value(text: str) -> Any:
    """`text` as exactly one JSON value (no surrounding whitespace); ValueError otherwise."""
    try:
        value, end = _scan_json(text, 0)
    except StopIteration:
        raise ValueError("not a JSON value") from None
    if end != len(text):
        raise ValueError("extra data")
    return value


def _counts(number: int, usage: Any) -> UsageCounts | None:
    """A line's usage parsed at standard (None: it has none), checked before deciding, so a bad line
    leaves no trace in budgets or stickiness. Its `speed` is set to standard in place: a logged speed
    is not what this policy did, and settlement sets its own."""
    if usage is None:
        return None
    if not isinstance(usage, dict):
        raise LogError(number, "'usage' must be an object")
    usage["speed"] = "standard"
    try:
        return parse_usage(usage)
    except ValueError as exc:
        raise LogError(number, f"invalid usage: {exc}") from None


def _estimated_usage(expected: int, cache_control: bool, max_tokens: int) -> dict[str, Any]:
    """The usage of a line without one, as the estimate expects: the expected prompt (as cache writes
    when the request caches, which is how the estimate prices it) and max_tokens of output."""
    usage: dict[str, Any] = ({"input_tokens": 0, "cache_creation_input_tokens": expected} if cache_control
                             else {"input_tokens": expected})
    usage["output_tokens"] = max_tokens
    return usage


def _failed(number: int, exc: BaseException) -> Decision:
    """The decision a failed decide carries (a ceiling's CeilingExceeded, on_error: raise's
    RuleEvaluationError: rejected ones), or the line's LogError: anything else means the line is bad."""
    if isinstance(exc, PolicyEngineError):
        failed = getattr(exc, "decision", None)
        if isinstance(failed, Decision):
            return failed
        raise LogError(number, str(exc)) from None
    # The engine should have said InvalidRequest; one odd line must not stop a long replay.
    raise LogError(number, f"the engine could not decide this line: {type(exc).__name__}: {exc}") from None


def _request_reads(compiled: CompiledPolicy) -> tuple[tuple[str, ...], ...]:
    """The recorded `request` features a replay from a decision log needs: those the engine decides
    with, and every `request.*` field (down to `thinking.*`) an expression of the policy reads."""
    programs: list[Any] = [p for _, p in compiled.variables]
    for rule in compiled.rules:
        programs.append(rule.when)
        if rule.reason_expr is not None:
            programs.append(rule.reason_expr)
    programs.extend(b.key for b in compiled.budgets)
    if compiled.stickiness_key is not None:
        programs.append(compiled.stickiness_key)
    paths: set[tuple[str, ...]] = {(name,) for name in _ENGINE_READS}
    for program in programs:
        references = getattr(program, "references", None)
        if references is None:  # a stand-in for a program (a test probe): it may read anything
            paths.update((name,) for name in REQUEST.fields)
            continue
        for ref in references:
            parts = ref.split(".")
            if parts[0] != "request":
                continue
            if len(parts) == 1:  # the whole object (`[request][0].stream`): every field
                paths.update((name,) for name in REQUEST.fields)
                continue
            # Down the declared objects only: past them (a list, a map) the value is read whole.
            path: list[str] = []
            kind: Any = REQUEST
            for part in parts[1:]:
                fields = getattr(kind, "fields", None)
                if not isinstance(fields, dict) or part not in fields:
                    break
                path.append(part)
                kind = fields[part].type
            if path:
                paths.add(tuple(path))
    return tuple(sorted(paths))


_ENGINE_READS: Final = ("model", "max_tokens", "input_tokens", "input_tokens_exact", "inference_geo", "cache_control",
                        "service_tier", "batch", "platform")
"""The recorded `request` features the engine itself decides with, whatever the policy reads."""


def _has_path(features: dict[str, Any], path: tuple[str, ...]) -> bool:
    value: Any = features
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return True


class Replayer:
    """Replays log lines in order through one compiled policy with its own fresh state."""

    def __init__(self, compiled: CompiledPolicy, catalog: Catalog | None = None,
                 ledger: Callable[..., MemoryLedger] = MemoryLedger, decision_log: DecisionLog | None = None) -> None:
        """`ledger` makes the replay's ledger (called with the replay's `clock` and `settled_memory_s`):
        a MemoryLedger subclass can watch what the engine records, as the HTML report does.
        `decision_log` is the engine's: the replay then writes the decision log of its lines, as
        production would have (each record's ratelimit from the line's headers and status)."""
        self.compiled = compiled
        self.catalog = catalog or load_catalog()
        self._now: datetime | None = START_TIME
        self._epoch = START_TIME.timestamp()
        # Reservations are settled at once, so nothing needs remembering past the replay's clock.
        # The replay's clock is a compiled method, not a lambda: the engine and the ledger read it
        # three times a line, and a lambda would be an interpreted call each time.
        self.ledger = ledger(clock=self._clock, settled_memory_s=0.0)
        self.engine = Engine([compiled], self.catalog, ledger=self.ledger, clock=self._clock, decision_log=decision_log)
        self._logged = decision_log is not None
        self._reads(_request_reads(compiled))
        self._requests: dict[str, Any] = {}
        self._scans: dict[int, tuple[dict[str, Any], dict[str, object]]] = {}
        self._minutes: dict[str, int] = {}
        self.report = Report(compiled.name, compiled.version)

    # parse -----------------------------------------------------------------------------

    def parse(self, number: int, text: str) -> dict[str, Any]:
        """A log line as a dict. The request part is parsed once per distinct text and shared."""
        record: Any = None
        cut = text.find(_REQUEST_KEY)
        if cut > 0 and text[-1] == "}":
            # `{...,"request":<value>}`: when the head closes into valid JSON the cut is at the top
            # level, so <value> is exactly the request and its text can key a cache. Any doubt
            # (a cut inside another value, whitespace, bad JSON) falls back to the whole line.
            # The first occurrence: a short scan, and a request whose tools name a `request`
            # property still splits.
            try:
                record = _json_value(text[:cut] + "}")
                if type(record) is dict:
                    raw = text[cut + len(_REQUEST_KEY):-1]
                    request = self._requests.get(raw)
                    if request is None:
                        request = _json_value(raw)
                        if len(self._requests) >= _CACHE_MAX:
                            self._requests.clear()
                        self._requests[raw] = request
                    record["request"] = request
                else:
                    record = None
            except (ValueError, RecursionError):
                record = None
        if record is None:
            try:
                record = json.loads(text)
            except ValueError as exc:
                if text[0] == _UNREADABLE:
                    raise LogError(number, text[1:]) from None  # what iter_log found wrong with the line
                raise LogError(number, f"invalid JSON: {exc}") from None
            except RecursionError:
                raise LogError(number, "invalid JSON: nested too deeply") from None
        if not isinstance(record, dict):
            raise LogError(number, f"a line must be a JSON object, got {type(record).__name__}")
        return record

    # step ------------------------------------------------------------------------------

    def step(self, number: int, record: dict[str, Any]) -> Outcome:
        """Decide and settle one parsed line. The line's `usage` dict is billed in place: its
        `speed` is set to the speed the policy chose (a logged speed is not what this policy did)."""
        request = record.get("request")
        if not isinstance(request, dict):
            if record.get("record") == RECORD_KIND:
                return self._step_recorded(number, record)
            raise LogError(number, "missing 'request' (the Messages API parameters)")
        ts = record.get("ts")
        if ts is not None:
            self._advance(number, ts)
        context = record.get("context")
        if context is not None and not isinstance(context, dict):
            raise LogError(number, "'context' must be an object")
        batch = record.get("batch", False)
        if batch is not False and batch is not True:
            raise LogError(number, "'batch' must be true or false")
        given = record.get("input_tokens")
        if given is not None and (type(given) is not int or given < 0):
            raise LogError(number, f"'input_tokens' must be a non-negative integer, got {given!r}")
        account = record.get("account", "default")
        if type(account) is not str:
            raise LogError(number, "'account' must be a string")
        headers = record.get("headers")
        if headers is not None and not isinstance(headers, dict):
            raise LogError(number, "'headers' must be an object")
        usage = record.get("usage")
        counts = _counts(number, usage)
        try:
            scanned = self._scanned(request)  # bound below: when this raises, so does the line
            decision = self.engine._decide_scanned(request, scanned, context, self._now, account, batch, given)
        except (PolicyEngineError, RecursionError, TypeError, ValueError, KeyError, AttributeError) as exc:
            decision = _failed(number, exc)
        billed: dict[str, Any]
        if counts is None:
            expected = given if given is not None else self._expected_input(number, request)
            billed = _estimated_usage(expected, scanned["cache_control"] is True, decision.max_tokens)
            counts = parse_usage(billed)
        else:
            billed = cast("dict[str, Any]", usage)  # _counts took it: a dict
            self.report.with_usage += 1
        return self._bill(number, decision, request, billed, counts, batch, account, headers, record.get("status"))

    def _step_recorded(self, number: int, record: dict[str, Any]) -> Outcome:
        """Decide and settle one decision-log record from its features, as the original request was decided.

        The record holds the request's features, not its params: the engine decides from them
        (`request_features` is not run again), with the recorded exact-or-estimated input tokens,
        batch and platform, the recorded context (its hashed ids as they are), account and
        `fallbacks`, at the recorded decision time. It is billed with the recorded usage; a
        rejected request has none, and is billed as the estimate expects, from the recorded
        input tokens (an upper bound where they were estimated)."""
        if record.get("v") != RECORD_VERSION:
            raise LogError(number, f"a decision-log record of version {record.get('v')!r}; this replay reads "
                                   f"version {RECORD_VERSION}")
        event = record.get("event")
        if event == "released":
            raise Released(number, "a released request (never sent, nothing billed): not replayed")
        features = record.get("features")
        if not isinstance(features, dict):
            raise LogError(number, "a decision-log record without its 'features'")
        scanned = features.get("request")
        context = features.get("context")
        account = features.get("account", "default")
        fallbacks = features.get("fallbacks")
        if not isinstance(scanned, dict):
            raise LogError(number, "'features.request' must be an object")
        if context is not None and not isinstance(context, dict):
            raise LogError(number, "'features.context' must be an object")
        if type(account) is not str:
            raise LogError(number, "'features.account' must be a string")
        # One C-level subset test of the top-level names a line; the nested paths are few (thinking.*).
        if not scanned.keys() >= self._read_names or (
                self._read_nested and not all(_has_path(scanned, path) for path in self._read_nested)):
            raise MissingFeatures(number, [".".join(path) for path in self._request_reads if not _has_path(scanned, path)])
        given = scanned["input_tokens"]
        exact, batch, platform = scanned["input_tokens_exact"], scanned["batch"], scanned["platform"]
        if type(given) is not int or given < 0:
            raise LogError(number, f"'features.request.input_tokens' must be a non-negative integer, got {given!r}")
        if type(exact) is not bool or type(batch) is not bool or type(platform) is not str:
            raise LogError(number, "'features.request': input_tokens_exact and batch must be true or false, "
                                   "platform a string")
        ts = record.get("ts")
        if ts is not None:
            self._advance(number, ts)
        usage = record.get("usage")
        counts = _counts(number, usage)
        # The params the engine reads beside the features: what decides and prices the fallbacks
        # chain, and the service tier the all-fast baseline checks.
        params: dict[str, Any] = {"model": scanned["model"], "max_tokens": scanned["max_tokens"],
                                  "service_tier": scanned["service_tier"]}
        if fallbacks is not None:
            params["fallbacks"] = fallbacks
        try:
            decision = self.engine._finish(params, context, self._now, account, batch, given, exact, None,
                                           time.perf_counter_ns(), scanned, platform)
        except (PolicyEngineError, RecursionError, TypeError, ValueError, KeyError, AttributeError) as exc:
            decision = _failed(number, exc)
        billed: dict[str, Any]
        if counts is None:
            billed = _estimated_usage(given, scanned["cache_control"] is True, decision.max_tokens)
            counts = parse_usage(billed)
        else:
            billed = cast("dict[str, Any]", usage)  # _counts took it: a dict
            self.report.with_usage += 1
        ratelimit = record.get("ratelimit")
        headers = status = None
        answered = account
        if isinstance(ratelimit, dict):
            headers, status = ratelimit.get("headers"), ratelimit.get("status")
            if headers is not None and not isinstance(headers, dict):
                raise LogError(number, "'ratelimit.headers' must be an object")
            if type(ratelimit.get("account")) is str:
                # The response's account: the first request of a key is decided before its account is known.
                answered = ratelimit["account"]
        return self._bill(number, decision, params, billed, counts, batch, answered, headers, status)

    def _bill(self, number: int, decision: Decision, request: dict[str, Any], usage: dict[str, Any],
              counts: UsageCounts, batch: bool, account: str, headers: dict[str, Any] | None, status: Any) -> Outcome:
        if self._logged:
            # The replay stands in for the integration: its record holds what the line says the response was.
            observed = Observed()
            observed.attempt(decision.speed, status if type(status) is int else None, headers, "done")
            observed.account = account
            decision._observed = observed
        outcome = self._settle(number, decision, request, usage, counts, batch)
        if headers:
            # What the response said about the account's fast limits, for the next lines' `ratelimit.*`
            # and the rate_limited guardrail; a 429's retry-after only when the line says it was one.
            self.engine.ratelimits.record(account, headers, rate_limited=status == 429, now=self._epoch)
        return outcome

    def _reads(self, paths: tuple[tuple[str, ...], ...]) -> None:
        """Set the recorded request features a decision-log line must hold (see `_request_reads`)."""
        self._request_reads = paths
        self._read_names = frozenset(path[0] for path in paths)
        self._read_nested = tuple(path for path in paths if len(path) > 1)

    def _clock(self) -> float:
        return self._epoch

    def _scanned(self, request: dict[str, Any]) -> dict[str, object]:
        """`request_features(request, 0, False)`, once per request object. `parse` hands out the
        same object for every line with the same request text, and nothing changes it after."""
        hit = self._scans.get(id(request))
        if hit is not None and hit[0] is request:
            return hit[1]
        scanned = request_features(request, 0, False)
        if len(self._scans) >= _CACHE_MAX:
            self._scans.clear()
        self._scans[id(request)] = (request, scanned)  # holding the request keeps its id from being reused
        return scanned

    def _advance(self, number: int, ts: Any) -> None:
        if type(ts) is str:
            epoch = self._utc_epoch(ts)
            if epoch is not None:
                # The engine's clock is the replay's: without `now` it reads this epoch.
                self._now, self._epoch = None, epoch
                return
        try:
            if isinstance(ts, (int, float)) and not isinstance(ts, bool):
                now = datetime.fromtimestamp(ts, timezone.utc)
            elif isinstance(ts, str):
                now = datetime.fromisoformat(ts[:-1] + "+00:00" if ts.endswith(("Z", "z")) else ts)
                if now.tzinfo is None:
                    now = now.replace(tzinfo=timezone.utc)
            else:
                raise ValueError(f"expected an RFC 3339 string or epoch seconds, got {type(ts).__name__}")
        except (ValueError, OverflowError, OSError) as exc:
            raise LogError(number, f"invalid 'ts' {ts!r}: {exc}") from None
        self._now, self._epoch = now, now.timestamp()

    def _utc_epoch(self, ts: str) -> float | None:
        """`datetime.fromisoformat(ts).timestamp()` for the shape logs write, `YYYY-MM-DDTHH:MM:SS[.fff[fff]]Z`,
        parsing the date and minute once per minute; None for any other shape, left to the general parser."""
        size = len(ts)
        if size == 24:  # milliseconds, the usual shape
            scale = 1_000
        elif size == 27 or size == 20:
            scale = 1_000_000 if size == 27 else 1
        else:
            return None
        if ts[-1] != "Z" or ts[16] != ":" or (size > 20 and ts[19] != "."):
            return None
        fraction = ts[17:19] + ts[20:-1]  # seconds and their fraction: one exact integer in 1/scale s
        head = ts[:16]
        minute = self._minutes.get(head)
        if minute is None:
            try:
                minute = int(datetime.fromisoformat(head + ":00+00:00").timestamp())
            except ValueError:
                return None
            if len(self._minutes) >= _CACHE_MAX:
                self._minutes.clear()
            self._minutes[head] = minute
        if not (fraction.isdigit() and fraction.isascii()) or ts[17] > "5":
            return None
        # One exact division, as timedelta.total_seconds() does: the very same float. Through
        # operator.truediv, since compiled code divides ints as floats, which rounds past 2**53.
        return truediv(minute * scale + int(fraction), scale)

    def _settle(self, number: int, decision: Decision, request: dict[str, Any], usage: dict[str, Any],
                counts: UsageCounts, batch: bool) -> Outcome:
        """Bill the line at the chosen speed through the engine, and price it at both speeds for the baselines."""
        # The engine's plan for the decision's model and geo: catalog entry, rate tables, throughput.
        mp = decision._plan
        assert mp is not None  # every decision the engine makes carries its model plan
        speed = decision.speed
        chosen = 0
        if decision.outcome == "rejected":
            speed = "rejected"
        else:
            usage["speed"] = speed
            billed: UsageCounts | dict[str, Any]
            if self._logged or "iterations" in usage:
                # The usage itself: a response with iterations is billed step by step, and a record
                # holds the usage as the response reported it.
                billed = usage
            else:
                # Settled from the counts parsed (at standard) before deciding: parse_usage passes them through.
                billed = counts if speed == "standard" else tuple.__new__(
                    UsageCounts, (counts[0], counts[1], counts[2], counts[3], counts[4], speed, counts[6]))
            try:
                chosen = self.engine.settle(decision, billed).cost_micro
            except ValueError as exc:
                # settle records nothing for a malformed usage; the reservation must not hold budget either.
                self.engine.release(decision)
                raise LogError(number, f"invalid usage: {exc}") from None
        # The baselines need the line at both speeds; the settlement already priced one of them.
        standard = chosen if speed == "standard" else self.engine.usage_cost(decision, counts, "standard") or 0
        fast = None
        entry = mp.entry
        if entry is not None and entry.fast.supported and not batch and request.get("service_tier") != "priority":
            fast = chosen if speed == "fast" else self.engine.usage_cost(decision, counts, "fast")
        std_otps, ttft_s, fast_otps = mp.throughput
        std_s = ttft_s + counts[1] / std_otps
        fast_s = ttft_s + counts[1] / fast_otps if fast is not None and fast_otps else None
        latency = 0.0 if speed == "rejected" else fast_s if speed == "fast" and fast_s is not None else std_s
        return Outcome(number, speed, decision.rule, decision.outcome, decision.forced_by, chosen,
                       standard, fast, latency, std_s, fast_s, mp.std_rates is not None and mp.priced_by is None, self._epoch)

    def _expected_input(self, number: int, request: dict[str, Any]) -> int:
        try:
            return estimate_input_tokens(request).expected
        except (PolicyEngineError, TypeError, ValueError) as exc:
            raise LogError(number, f"invalid request: {exc}") from None

    # run -------------------------------------------------------------------------------

    def run(self, lines: Iterable[tuple[int, str]], on_outcome: Callable[[Outcome], None] | None = None,
            progress: Callable[[int], None] | None = None) -> Report:
        report = self.report
        parse, step, add = self.parse, self.step, report.add
        started = time.perf_counter()
        for number, text in lines:
            report.lines += 1
            try:
                outcome = step(number, parse(number, text))
            except LogError as exc:
                report.error(exc)
                continue
            add(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
            if progress is not None and not report.lines & 1023:
                progress(report.lines)
        report.elapsed_s = time.perf_counter() - started
        report.stopped = _stopped(lines)
        return report


def simulate(compiled: CompiledPolicy, lines: Iterable[tuple[int, str]], catalog: Catalog | None = None,
             **kwargs: Any) -> Report:
    """Replay `lines` ((number, text) pairs, as `iter_log` yields: a request log's or a decision log's,
    each line told by its content) through `compiled`."""
    return Replayer(compiled, catalog).run(lines, **kwargs)


# -- diff: two policies over the same log ---------------------------------------------------


@dataclass
class _Change:
    count: int = 0
    cost_delta: int = 0
    latency_delta_s: float = 0.0
    lines: list[int] = field(default_factory=list)


@dataclass
class DiffReport:
    """The decisions that change between two policies over one log, grouped by what changed."""

    old: Report
    new: Report
    changes: dict[tuple[str, str, str, str], _Change] = field(default_factory=dict)
    unchanged: int = 0

    EXAMPLES = 5

    def add(self, a: Outcome, b: Outcome) -> None:
        if a.speed == b.speed and a.rule == b.rule:
            self.unchanged += 1
            return
        key = (a.speed, b.speed, a.rule, b.rule)
        change = self.changes.setdefault(key, _Change())
        change.count += 1
        change.cost_delta += b.cost_micro - a.cost_micro
        change.latency_delta_s += b.latency_s - a.latency_s
        if len(change.lines) < self.EXAMPLES:
            change.lines.append(b.line)

    def _sorted(self) -> list[tuple[tuple[str, str, str, str], _Change]]:
        return sorted(self.changes.items(), key=lambda kv: (-kv[1].count, kv[0]))

    @property
    def changed(self) -> int:
        return sum(c.count for c in self.changes.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "old": self.old.to_dict(), "new": self.new.to_dict(),
            "changed": self.changed, "unchanged": self.unchanged,
            "cost_delta_usd": _usd(self.new.cost - self.old.cost),
            "latency_delta_s": round(self.new.latency_s - self.old.latency_s, 3),
            "changes": [{"from": f, "to": t, "old_rule": orule, "new_rule": nrule, "requests": c.count,
                         "cost_delta_usd": _usd(c.cost_delta), "latency_delta_s": round(c.latency_delta_s, 3),
                         "example_lines": c.lines} for (f, t, orule, nrule), c in self._sorted()],
        }

    def render_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def _head(self) -> list[tuple[str, str, str]]:
        o, n = self.old, self.new
        rows = [("fast", str(o.speeds.get("fast", 0)), str(n.speeds.get("fast", 0))),
                ("standard", str(o.speeds.get("standard", 0)), str(n.speeds.get("standard", 0))),
                ("rejected", str(o.speeds.get("rejected", 0)), str(n.speeds.get("rejected", 0))),
                ("cost", _money(o.cost), _money(n.cost)),
                ("fast premium", _money(o.premium), _money(n.premium)),
                ("latency saved", _seconds(o.policy_standard_latency_s - o.latency_s),
                 _seconds(n.policy_standard_latency_s - n.latency_s))]
        return rows

    def render_text(self) -> str:
        o, n = self.old, self.new
        out = [f"old: {o.policy} @{o.version}   new: {n.policy} @{n.version}   over {o.decided} requests",
               f"{'':16}{'old':>14}{'new':>14}"]
        out += [f"  {k:14}{a:>14}{b:>14}" for k, a, b in self._head()]
        out.append(f"{_changes(self.changed)} (cost {_signed(n.cost - o.cost)}, "
                   f"latency {_signed_s(n.latency_s - o.latency_s)})")
        for (f, t, orule, nrule), c in self._sorted():
            rules = nrule if orule == nrule else f"{orule} -> {nrule}"
            out.append(f"  {c.count:>7}  {f} -> {t}  [{rules}]  cost {_signed(c.cost_delta)}  "
                       f"latency {_signed_s(c.latency_delta_s)}  e.g. lines {', '.join(map(str, c.lines))}")
        out.extend(o._notes())
        if o.stopped:
            out.append(f"stopped: {o.stopped}")
        return "\n".join(out) + "\n"

    def render_markdown(self) -> str:
        o, n = self.old, self.new
        out = [f"### Policy change: `{o.policy}` @{o.version} → `{n.policy}` @{n.version}", "",
               f"Replayed over {o.decided} requests: **{_changes(self.changed)}**, cost "
               f"**{_signed(n.cost - o.cost)}**, latency **{_signed_s(n.latency_s - o.latency_s)}**.", "",
               "| | old | new |", "|---|---:|---:|"]
        out += [f"| {k} | {a} | {b} |" for k, a, b in self._head()]
        if self.changes:
            out += ["", "| requests | change | rule | cost Δ | latency Δ | e.g. lines |", "|---:|---|---|---:|---:|---|"]
            for (f, t, orule, nrule), c in self._sorted():
                rules = f"`{nrule}`" if orule == nrule else f"`{orule}` → `{nrule}`"
                out.append(f"| {c.count} | {f} → {t} | {rules} | {_signed(c.cost_delta)} | "
                           f"{_signed_s(c.latency_delta_s)} | {', '.join(map(str, c.lines))} |")
        notes = [n[0].upper() + n[1:] + "." for n in o._notes()]
        if o.stopped:
            notes.append(f"The log could not be read to its end: {o.stopped}.")
        if notes:
            out += [""] + [f"> {n}" for n in notes]
        return "\n".join(out) + "\n"

    def render(self, fmt: str) -> str:
        return {"text": self.render_text, "markdown": self.render_markdown, "json": self.render_json}[fmt]()


def _changes(count: int) -> str:
    """`1 decision changes`, `4 decisions change`."""
    return "1 decision changes" if count == 1 else f"{count} decisions change"


def _signed(micro: int) -> str:
    return ("+" if micro > 0 else "") + _money(micro)


def _signed_s(seconds: float) -> str:
    return ("+" if seconds > 0 else "") + _seconds(seconds)


def diff(old: CompiledPolicy | Replayer, new: CompiledPolicy | Replayer, lines: Iterable[tuple[int, str]],
         catalog: Catalog | None = None, progress: Callable[[int], None] | None = None,
         on_outcome: Callable[[Outcome, Outcome], None] | None = None) -> DiffReport:
    """Replay `lines` through both policies, each with its own state, and pair their decisions.

    OLD and NEW are compiled policies, or replayers made for them (to choose their ledgers);
    `on_outcome` sees each line's pair of outcomes, old first."""
    catalog = catalog or load_catalog()
    a = old if isinstance(old, Replayer) else Replayer(old, catalog)
    b = new if isinstance(new, Replayer) else Replayer(new, catalog)
    result = DiffReport(a.report, b.report)
    # A decision-log record either policy cannot be decided from is skipped by both, never half replayed.
    both = tuple(sorted(set(a._request_reads) | set(b._request_reads)))
    a._reads(both)
    b._reads(both)
    started = time.perf_counter()
    for number, text in lines:
        a.report.lines += 1
        b.report.lines += 1
        try:
            record = a.parse(number, text)
            first = a.step(number, record)
            second = b.step(number, record)
        except LogError as exc:
            a.report.error(exc)
            b.report.error(exc)
            continue
        a.report.add(first)
        b.report.add(second)
        result.add(first, second)
        if on_outcome is not None:
            on_outcome(first, second)
        if progress is not None and not a.report.lines & 1023:
            progress(a.report.lines)
    a.report.elapsed_s = b.report.elapsed_s = time.perf_counter() - started
    a.report.stopped = b.report.stopped = _stopped(lines)
    return result


def _stopped(lines: Iterable[tuple[int, str]]) -> str | None:
    """Why `lines` (a `LogLines`, or a wrapper that passes its `stopped` on) ended before their log did."""
    stopped = getattr(lines, "stopped", None)
    return None if stopped is None else str(stopped)
