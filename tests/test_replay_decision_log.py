"""simulate and diff over decision logs: the same decisions and costs as over the requests they record,
and reading that stops cleanly, in bounded memory, where a log cannot be read on (issue 16, part 2)."""

from __future__ import annotations

import gzip
import json
import re
import os
import resource
import subprocess
import sys
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from policy_engine.cli import main
from policy_engine.compile import compile_file
from policy_engine.decide import load as load_engine
from policy_engine.decisionlog import RECORD_KIND, DecisionLog, DecisionRecord, JsonlFile
from policy_engine.simulate import Outcome, Replayer, diff, iter_log, open_log

ROOT = Path(__file__).parent.parent
SAMPLE = ROOT / "data" / "requests.jsonl.gz"
POLICIES = ROOT / "policies"

HAND = """\
version: 1
name: hand
rules:
  - name: interactive
    when: context.interactive
    speed: fast
budgets:
  - name: fast_day
    window: day
    limit_usd: 0.2
    counts: fast
    on_exceed: downgrade
"""
OPUS = {"model": "claude-opus-4-6", "max_tokens": 100, "messages": [{"role": "user", "content": "."}]}


def _lines(path: Path | str, max_line_bytes: int | None = None) -> list[tuple[int, str]]:
    with open_log(str(path)) as stream:
        return list(iter_log(stream) if max_line_bytes is None else iter_log(stream, max_line_bytes))


def _write_decision_log(compiled: Any, lines: list[tuple[int, str]], path: Path) -> list[Outcome]:
    """Replay `lines` with a decision log attached: the records of exactly the decisions `simulate` makes."""
    outcomes: list[Outcome] = []
    log = DecisionLog(JsonlFile(path), queue_size=len(lines) + 16)
    try:
        Replayer(compiled, decision_log=log).run(lines, on_outcome=outcomes.append)
    finally:
        log.close()
    assert log.dropped == 0 and log.write_errors == 0
    return outcomes


def _replay(compiled: Any, lines: list[tuple[int, str]]) -> tuple[Any, list[Outcome]]:
    outcomes: list[Outcome] = []
    report = Replayer(compiled).run(lines, on_outcome=outcomes.append)
    return report, outcomes


def _decided(o: Outcome) -> tuple[Any, ...]:
    return (o.line, o.speed, o.rule, o.outcome, o.forced_by, o.cost_micro, o.latency_s, o.at, o.priced)


def _priced(o: Outcome) -> tuple[Any, ...]:
    return (o.standard_micro, o.fast_micro, o.standard_latency_s, o.fast_latency_s)


@pytest.fixture(scope="module")
def sample() -> list[tuple[int, str]]:
    return _lines(SAMPLE)


@pytest.mark.parametrize("policy", ["default", "cost-guard", "latency-first"])
def test_a_decision_log_replays_to_the_decisions_of_its_requests(tmp_path: Path, sample: list[tuple[int, str]],
                                                                 policy: str) -> None:
    """Line by line over the sample log: deciding the recorded features gives the very decision and cost
    of deciding the original request; the baselines too, except where a rejected record has no usage."""
    compiled = compile_file(str(POLICIES / f"{policy}.yaml"))
    report, from_requests = _replay(compiled, sample)
    path = tmp_path / "decisions.jsonl"
    logged = _write_decision_log(compiled, sample, path)
    assert [_decided(o) + _priced(o) for o in logged] == [_decided(o) + _priced(o) for o in from_requests]

    records = _lines(path)
    assert len(records) == len(sample) == report.decided
    first = json.loads(records[0][1])
    DecisionRecord.model_validate(first)
    assert first["record"] == RECORD_KIND and "messages" not in json.dumps(first)  # features, never the prompt
    replayed_report, replayed = _replay(compiled, records)
    assert replayed_report.invalid == 0 and replayed_report.with_usage == report.decided - report.speeds["rejected"]
    assert [_decided(o) for o in replayed] == [_decided(o) for o in from_requests]
    kept = [(a, b) for a, b in zip(replayed, from_requests) if a.speed != "rejected"]
    assert [_priced(a) for a, _ in kept] == [_priced(b) for _, b in kept]
    assert (replayed_report.cost, replayed_report.premium, dict(replayed_report.speeds), dict(replayed_report.rules)) == (
        report.cost, report.premium, dict(report.speeds), dict(report.rules))
    if policy == "cost-guard":
        assert report.speeds["rejected"] > 0  # the sample has rejects under this policy: the test covers them


def test_diff_over_a_decision_log_equals_diff_over_its_requests(tmp_path: Path, sample: list[tuple[int, str]]) -> None:
    default, latency_first = (compile_file(str(POLICIES / f"{p}.yaml")) for p in ("default", "latency-first"))
    path = tmp_path / "decisions.jsonl"
    _write_decision_log(default, sample, path)
    from_requests = diff(default, latency_first, sample).to_dict()
    from_records = diff(default, latency_first, _lines(path)).to_dict()
    assert from_requests["changed"] > 1000
    assert from_records == from_requests


def test_a_decision_log_carries_and_replays_the_rate_limits_the_responses_reported(tmp_path: Path) -> None:
    """The request log's headers become each record's `ratelimit`; replaying the records feeds them to the
    rate-limit state as the headers were: the same downgrades by the rate_limited guardrail."""
    spent = {"anthropic-fast-output-tokens-limit": "8000", "anthropic-fast-output-tokens-remaining": "0",
             "anthropic-fast-output-tokens-reset": "2026-03-02T10:00:30Z"}
    chat, usage = {"interactive": True}, {"input_tokens": 100, "output_tokens": 100}
    line = {"context": chat, "input_tokens": 100, "usage": usage, "request": OPUS}
    log = [
        dict(line, ts="2026-03-02T10:00:00Z", account="ws:a", headers=spent),
        dict(line, ts="2026-03-02T10:00:00Z", account="ws:a"),
        dict(line, ts="2026-03-02T10:00:00Z", account="ws:b"),
        dict(line, ts="2026-03-02T10:01:00Z", account="ws:b", status=429, headers={"retry-after": "20"}),
        dict(line, ts="2026-03-02T10:01:15Z", account="ws:b"),
        dict(line, ts="2026-03-02T10:01:21Z", account="ws:b"),
    ]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in log))
    (tmp_path / "hand.yaml").write_text(HAND)
    compiled = compile_file(str(tmp_path / "hand.yaml"))
    _, from_requests = _replay(compiled, _lines(requests))
    assert [o.forced_by for o in from_requests] == [None, "rate_limited", None, None, "rate_limited", None]
    path = tmp_path / "decisions.jsonl"
    _write_decision_log(compiled, _lines(requests), path)
    records = [json.loads(text) for _, text in _lines(path)]
    assert records[0]["ratelimit"]["headers"] == spent
    assert records[3]["ratelimit"] == {"status": 429, "account": "ws:b", "headers": {"retry-after": "20"}}
    assert [r["features"]["account"] for r in records] == ["ws:a", "ws:a", "ws:b", "ws:b", "ws:b", "ws:b"]
    _, replayed = _replay(compiled, _lines(path))
    assert [_decided(o) + _priced(o) for o in replayed] == [_decided(o) + _priced(o) for o in from_requests]


def _records(tmp_path: Path, requests: list[dict[str, Any]], policy: str = HAND) -> list[dict[str, Any]]:
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    (tmp_path / "p.yaml").write_text(policy)
    out = tmp_path / "decisions.jsonl"
    _write_decision_log(compile_file(str(tmp_path / "p.yaml")), _lines(path), out)
    return [json.loads(text) for _, text in _lines(out)]


def _write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


READS_FEATURES = """\
version: 1
name: reads
rules:
  - name: tools
    when: request.has_tools
    speed: fast
  - name: thinking
    when: request.thinking.budget_tokens > 1000
    speed: fast
"""


def test_a_record_lacking_a_feature_the_policy_reads_is_named_and_counted(tmp_path: Path) -> None:
    line = {"ts": "2026-03-02T10:00:00Z", "context": {"interactive": True}, "input_tokens": 10,
            "usage": {"input_tokens": 10, "output_tokens": 10}, "request": OPUS}
    records = _records(tmp_path, [line, line, line])
    del records[0]["features"]["request"]["has_tools"]  # as a record written before the feature existed
    del records[1]["features"]["request"]["thinking"]["budget_tokens"]
    path = _write(tmp_path / "old.jsonl", records)
    (tmp_path / "reads.yaml").write_text(READS_FEATURES)
    report, outcomes = _replay(compile_file(str(tmp_path / "reads.yaml")), _lines(path))
    assert [o.line for o in outcomes] == [3]
    assert report.invalid == 2
    assert dict(report.missing_features) == {"request.has_tools": 1, "request.thinking.budget_tokens": 1}
    assert report.errors[0].startswith("line 1: the record has no request.has_tools, which a replayed policy reads")
    assert report.errors[1].startswith("line 2: the record has no request.thinking.budget_tokens")
    assert report.to_dict()["requests"]["missing_features"] == {"request.has_tools": 1,
                                                                "request.thinking.budget_tokens": 1}
    assert "missing features: records lack a feature a replayed policy reads" in report.render_text()
    assert "Missing features" in report.render_markdown()
    # A policy that reads neither decides all three.
    report, outcomes = _replay(compile_file(str(tmp_path / "p.yaml")), _lines(path))
    assert report.invalid == 0 and len(outcomes) == 3
    # What the engine itself decides with is needed whatever the policy reads.
    # In a diff, a record either policy cannot be decided from is skipped by both.
    old = Replayer(compile_file(str(tmp_path / "p.yaml")))
    result = diff(old, compile_file(str(tmp_path / "reads.yaml")), _lines(path))
    assert (result.old.decided, result.new.decided, result.old.invalid, result.new.invalid) == (1, 1, 2, 2)
    assert result.old.missing_features == result.new.missing_features
    assert sum(old.ledger.totals().values()) == result.old.cost > 0  # nothing of the skipped lines was billed
    # What the engine itself decides with is needed whatever the policy reads.
    del records[2]["features"]["request"]["inference_geo"]
    report, _ = _replay(compile_file(str(tmp_path / "p.yaml")), _lines(_write(tmp_path / "older.jsonl", records)))
    assert dict(report.missing_features) == {"request.inference_geo": 1}


def test_rejected_and_released_records(tmp_path: Path) -> None:
    """A rejected record has no usage: a policy that lets it through bills it as the estimate expects. A
    released record (never sent) is counted, not replayed and not invalid."""
    ceiling = HAND + "ceilings:\n  per_request_usd: 0.001\n  on_exceed: reject\n"
    line = {"ts": "2026-03-02T10:00:00Z", "context": {"interactive": False}, "input_tokens": 1000,
            "usage": {"input_tokens": 1000, "output_tokens": 10}, "request": OPUS}
    records = _records(tmp_path, [line], ceiling)
    assert records[0]["event"] == "rejected" and records[0]["usage"] is None
    released = json.loads(json.dumps(records[0]))
    released["event"] = "released"
    path = _write(tmp_path / "decisions.jsonl", [records[0], released])
    (tmp_path / "hand.yaml").write_text(HAND)
    report, outcomes = _replay(compile_file(str(tmp_path / "hand.yaml")), _lines(path))
    # Opus 4.6 standard: 1000 input tokens x $5 + max_tokens 100 x $25 per MTok = $0.0075.
    assert [(o.speed, o.cost_micro) for o in outcomes] == [("standard", 7500)]
    assert (report.released, report.invalid, report.with_usage) == (1, 0, 0)
    assert "released: 1 record of requests never sent, not replayed" in report.render_text()


def test_the_cli_replays_decision_logs(tmp_path: Path, sample: list[tuple[int, str]],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    compiled = compile_file(str(POLICIES / "default.yaml"))
    path = tmp_path / "decisions.jsonl.gz"
    plain = tmp_path / "decisions.jsonl"
    _write_decision_log(compiled, sample[:2000], plain)
    with gzip.open(path, "wb") as out:
        out.write(plain.read_bytes())
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(text + "\n" for _, text in sample[:2000]))
    outputs = []
    for log in (requests, path):
        assert main(["simulate", str(POLICIES / "default.yaml"), "--requests", str(log), "--format", "json",
                     "--no-config"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1] and outputs[0]["requests"]["decided"] == 2000
    diffs = []
    for log in (requests, path):
        assert main(["diff", str(POLICIES / "default.yaml"), str(POLICIES / "latency-first.yaml"), "--requests",
                     str(log), "--format", "json", "--no-config"]) == 0
        diffs.append(json.loads(capsys.readouterr().out))
    assert diffs[0] == diffs[1] and diffs[0]["changed"] > 0


# -- reading ---------------------------------------------------------------------------------


def _truncated_gzip(tmp_path: Path, lines: list[tuple[int, str]]) -> tuple[Path, int]:
    """A gzip file of `lines` cut off at 60% of its bytes, and the number of whole lines still in it."""
    data = gzip.compress("".join(text + "\n" for _, text in lines).encode(), mtime=0)
    cut = data[: len(data) * 6 // 10]
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(cut)
    got = zlib.decompressobj(wbits=31).decompress(cut)  # all that can be decompressed
    return path, got.count(b"\n")


def test_a_truncated_gzip_log_reports_where_it_stops_and_keeps_the_lines_before(
        tmp_path: Path, sample: list[tuple[int, str]], capsys: pytest.CaptureFixture[str]) -> None:
    path, whole = _truncated_gzip(tmp_path, sample[:3000])
    assert 1000 < whole < 3000
    stopped_at = whole + 1
    code = main(["simulate", str(POLICIES / "default.yaml"), "--requests", str(path), "--format", "json", "--no-config"])
    captured = capsys.readouterr()
    assert code == 2  # was 3: EOFError as an internal error, and no report
    data = json.loads(captured.out)
    assert data["requests"]["decided"] == whole and data["requests"]["invalid"] == 0
    message = (f"line {stopped_at}: the compressed log ends early (a truncated gzip file); the report covers the "
               f"{whole:,} lines before it")
    assert data["stopped"] == message
    assert captured.err.strip() == f"policy-engine simulate: the log could not be read to its end: {message}"
    # The figures are those of the lines before it.
    report, _ = _replay(compile_file(str(POLICIES / "default.yaml")), sample[:whole])
    assert data["cost"]["total_usd"] == report.to_dict()["cost"]["total_usd"]
    # diff says the same, and the text report too.
    code = main(["diff", str(POLICIES / "default.yaml"), str(POLICIES / "latency-first.yaml"), "--requests", str(path),
                 "--no-config"])
    captured = capsys.readouterr()
    assert code == 2 and message in captured.err
    assert f"over {whole} requests" in captured.out
    # In Python: the lines stop and say why.
    with open_log(str(path)) as stream:
        lines = iter_log(stream)
        assert len(list(lines)) == whole
        assert lines.stopped is not None and lines.stopped.line == stopped_at


def test_a_corrupt_gzip_log_is_reported_as_such(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = bytearray(gzip.compress(b"".join(b'{"request": {"model": "m", "max_tokens": %d}}\n' % i
                                            for i in range(1, 20000)), mtime=0))
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x5A
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(bytes(data))
    code = main(["simulate", str(POLICIES / "default.yaml"), "--requests", str(path), "--no-config"])
    err = capsys.readouterr().err
    assert code == 2
    assert "the compressed log is corrupt" in err or "ends early" in err
    assert "the report covers the" in err


def test_lines_over_the_cap_are_invalid_and_skipped(tmp_path: Path, sample: list[tuple[int, str]],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    long = json.dumps({"request": dict(OPUS, messages=[{"role": "user", "content": "x" * 5000}])})
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join([sample[0][1], long, sample[1][1], "y" * 3000]))  # the last one ends the file
    assert len(sample[0][1]) < 1000 and len(sample[1][1]) < 1000
    code = main(["simulate", str(POLICIES / "default.yaml"), "--requests", str(path), "--max-line-bytes", "1000",
                 "--format", "json", "--no-config"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (data["requests"]["decided"], data["requests"]["invalid"]) == (2, 2)
    assert data["errors"] == ["line 2: the line is longer than 1,000 bytes (the line cap); skipped",
                              "line 4: the line is longer than 1,000 bytes (the line cap); skipped"]
    assert main(["simulate", str(POLICIES / "default.yaml"), "--requests", str(path), "--max-line-bytes", "1000",
                 "--strict", "--no-config"]) == 1
    capsys.readouterr()
    # Without the option the long line is a request like any other.
    assert main(["simulate", str(POLICIES / "default.yaml"), "--requests", str(path), "--format", "json",
                 "--no-config"]) == 0
    assert json.loads(capsys.readouterr().out)["requests"]["decided"] == 3
    assert main(["simulate", str(POLICIES / "default.yaml"), "--requests", str(path), "--max-line-bytes", "0",
                 "--no-config"]) == 2
    # A line exactly at the cap is read.
    exact = tmp_path / "exact.jsonl"
    exact.write_text(sample[0][1] + "\n")
    assert _lines(exact, len(sample[0][1]))[0][1] == sample[0][1]
    assert _lines(exact, len(sample[0][1]) - 1)[0][1].startswith("\x00")


def test_undecodable_and_nul_lines_say_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'\xff\xfe{"x": 1}\n\x00{"request": {}}\n')
    report = Replayer(compile_file(str(POLICIES / "default.yaml"))).run(_lines(path))
    assert report.errors == ["line 1: not UTF-8 text (invalid start byte at byte 0)",
                             "line 2: invalid JSON: the line starts with a NUL byte"]


_MEMORY_LIMIT = 512 * 1024 * 1024


def _bounded(args: list[str], stdin: Any = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """The CLI in a child whose address space is capped: a reader that holds the whole line dies of it."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_LIMIT, _MEMORY_LIMIT))

    env = dict(os.environ, POLICY_ENGINE_PURE_PYTHON="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "policy_engine", *args], stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, preexec_fn=limit)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_dev_zero_as_a_log_ends_cleanly_in_bounded_memory() -> None:
    """/dev/zero is one endless line: with the default cap (32 MiB) the reading gives up 2 GiB in, in a
    512 MiB address space (it grew to the limit and died with exit 3 before)."""
    child = _bounded(["simulate", str(POLICIES / "default.yaml"), "--requests", "/dev/zero", "--no-config"])
    out, err = child.communicate(timeout=120)
    assert child.returncode == 2, err.decode()
    assert err.decode().strip() == (
        "policy-engine simulate: the log could not be read to its end: line 1: no end of line after "
        "2,147,483,649 bytes (64 times the 33,554,432-byte line cap): this is not a log; the report covers no "
        "line before it")
    assert b"0 requests decided" in out


def test_an_endless_line_on_stdin_ends_diff_cleanly_in_bounded_memory(sample: list[tuple[int, str]]) -> None:
    """Two good lines, then a line that never ends, through a pipe: diff compares the two and exits 2."""
    child = _bounded(["diff", str(POLICIES / "default.yaml"), str(POLICIES / "latency-first.yaml"), "--requests",
                      "-", "--max-line-bytes", "100000", "--format", "json", "--no-config"], stdin=subprocess.PIPE)
    assert child.stdin is not None
    chunk = b"a" * 65536
    try:
        child.stdin.write((sample[0][1] + "\n" + sample[1][1] + "\n").encode())
        for _ in range(100_000):  # 6.5 GB, far more than the address space: the child must stop reading first
            child.stdin.write(chunk)
    except BrokenPipeError:
        pass
    finally:
        try:
            child.stdin.close()
        except BrokenPipeError:
            pass
    assert child.stdout is not None and child.stderr is not None
    out, err = child.stdout.read(), child.stderr.read()  # a few lines each: no pipe fills up
    assert child.wait(timeout=120) == 2, err.decode()
    assert re.search(r"line 3: no end of line after [\d,]+ bytes \(64 times the 100,000-byte line cap\): this is not a "
                     r"log; the report covers the 2 lines before it", err.decode())
    assert json.loads(out)["old"]["requests"]["decided"] == 2


def test_a_diff_over_a_truncated_log_says_where_it_stopped_in_every_format(
        tmp_path: Path, sample: list[tuple[int, str]]) -> None:
    path, whole = _truncated_gzip(tmp_path, sample[:1500])
    default, latency_first = (compile_file(str(POLICIES / f"{p}.yaml")) for p in ("default", "latency-first"))
    with open_log(str(path)) as stream:
        result = diff(default, latency_first, iter_log(stream))
    message = f"line {whole + 1}: the compressed log ends early (a truncated gzip file)"
    assert result.old.stopped is not None and result.old.stopped.startswith(message)
    assert f"stopped: {message}" in result.render_text()
    assert f"> The log could not be read to its end: {message}" in result.render_markdown()
    assert json.loads(result.render_json())["new"]["stopped"].startswith(message)


def test_usage_iterations_are_billed_step_by_step_from_both_log_kinds(tmp_path: Path) -> None:
    """A compaction step is not in the top-level usage: billed per step, it is, as settle bills it live;
    and a request's `fallbacks` chain reserves the same worst case when decided from its record."""
    usage = {"input_tokens": 1000, "output_tokens": 100, "iterations": [
        {"type": "compaction", "input_tokens": 50_000, "output_tokens": 2_000},
        {"type": "message", "input_tokens": 1000, "output_tokens": 100}]}
    request = dict(OPUS, fallbacks=[{"model": "claude-sonnet-4-6", "max_tokens": 50}])
    line = {"ts": "2026-03-02T10:00:00Z", "context": {"interactive": False}, "input_tokens": 1000,
            "usage": usage, "request": request}
    records = _records(tmp_path, [line])
    assert records[0]["features"]["fallbacks"] == [{"model": "claude-sonnet-4-6", "max_tokens": 50}]
    assert [s["kind"] for s in records[0]["steps"]] == ["compaction", "message"]
    compiled = compile_file(str(tmp_path / "p.yaml"))
    _, from_requests = _replay(compiled, _lines(tmp_path / "requests.jsonl"))
    # Opus 4.6 standard ($5 / $25 per MTok): (51,000 x 5 + 2,100 x 25) / 1e6 dollars = 307,500 micro-dollars.
    assert [(o.speed, o.cost_micro) for o in from_requests] == [("standard", 307_500)]
    _, replayed = _replay(compiled, _lines(tmp_path / "decisions.jsonl"))
    assert [_decided(o) + _priced(o) for o in replayed] == [_decided(o) + _priced(o) for o in from_requests]
    live = load_engine(tmp_path / "p.yaml")
    decision = live.decide(request, {"interactive": False}, input_tokens=1000,
                           now=datetime(2026, 3, 2, 10, tzinfo=timezone.utc))
    assert records[0]["decision"]["estimate_micro"] == decision.estimate_micro
    assert live.settle(decision, dict(usage, speed="standard")).cost_micro == 307_500
