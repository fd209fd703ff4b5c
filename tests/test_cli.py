"""The policy-engine command line: exit codes, no tracebacks, test/explain/fmt/diff end to end."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy_engine.cli import main

ROOT = Path(__file__).parent.parent
POLICIES = ROOT / "policies"
DEFAULT = POLICIES / "default.yaml"


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    out = capsys.readouterr()
    return status, out.out, out.err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_lint_never_shows_a_traceback_on_random_bytes(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "p.yaml"
    path.write_bytes(data)
    for fmt in ("text", "sarif"):
        proc_status = main(["lint", str(path), "--format", fmt])
        assert proc_status in (0, 1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet="ab:-[]{}&*!|>'\"#\n 01", max_size=200))
def test_lint_and_fmt_survive_yaml_shaped_noise(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "p.yaml"
    path.write_text("version: 1\nname: n\n" + text)
    before = path.read_bytes()
    assert main(["lint", str(path)]) in (0, 1)
    assert main(["fmt", str(path)]) in (0, 1)
    from policy_engine.fmt import _same, _same_model

    after = path.read_bytes()
    # fmt never changes what the file means: the same data, or (values YAML 1.1 readers would
    # retype, now quoted) the same validated policy
    assert after == before or _same(before.decode(), after.decode()) or _same_model(str(path), before.decode(), after.decode())


def test_yaml_bomb_is_a_diagnostic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = ["version: 1", "name: bomb", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}]"
              for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    status, out, err = _run(["lint", str(path)], capsys)
    assert status == 1 and "error[PE003]" in out and "alias bomb" in out and "Traceback" not in out + err


def test_a_real_process_prints_no_traceback_for_garbage(tmp_path: Path) -> None:
    path = tmp_path / "garbage.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage\x00")
    proc = subprocess.run([sys.executable, "-m", "policy_engine", "lint", str(path), "--format", "github"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout.startswith("::error file=") and "PE004" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("argv", [
    ["lint"], ["lint", "no/such/file.yaml"], ["lint", str(DEFAULT), "--format", "xml"], ["frobnicate"], [],
    ["test", str(DEFAULT), "--threshold", "120"], ["explain", str(DEFAULT)],
])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _run(argv, capsys)
    assert status == 2
    assert "Traceback" not in out + err


def test_every_verb_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for verb in ("lint", "test", "explain", "eval", "simulate", "diff", "bench", "fmt", "schema", "check", "serve"):
        status, out, _ = _run([verb, "--help"], capsys)
        assert status == 0 and out.startswith("usage: policy-engine " + verb)


def test_schema_still_prints_and_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(["schema"], capsys)
    assert status == 0 and json.loads(out)["title"]
    status, out, _ = _run(["schema", "--write", str(tmp_path)], capsys)
    assert status == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["catalog.schema.json", "decision-record.schema.json",
                                                                          "policy.schema.json", "serve-openapi.json"]


# -- test -------------------------------------------------------------------------------------


def test_test_runs_embedded_cases_with_coverage(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(["test", str(POLICIES), "--coverage"], capsys)
    assert status == 0
    cases = sum(len(yaml.safe_load(f.read_text())["tests"]) for f in sorted(POLICIES.glob("*.yaml")))
    assert f"PASS: {cases}/{cases}" in out
    assert "rule input-bound: no test case where `request.max_tokens <= 1024` is false" in out
    status, out, _ = _run(["test", str(POLICIES), "--threshold", "99"], capsys)
    assert status == 1 and "below the threshold of 99%" in out


def test_a_test_file_failure_prints_a_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(DEFAULT, tmp_path / "default.yaml")
    (tmp_path / "default_test.yaml").write_text(
        "tests:\n"
        "  - name: background goes fast (wrong)\n"
        "    request: {model: claude-opus-5-5, max_tokens: 100, messages: []}\n"
        "    context: {interactive: false}\n"
        "    expect: {speed: fast, rule: nobody-waiting}\n")
    status, out, _ = _run(["test", str(tmp_path)], capsys)
    assert status == 1
    assert f"FAIL {tmp_path / 'default_test.yaml'}:2: background goes fast (wrong)" in out
    assert "    - speed: fast\n    + speed: standard\n      rule: nobody-waiting\n" in out
    embedded = len(yaml.safe_load(DEFAULT.read_text())["tests"])
    assert f"PASS: {embedded}/{embedded + 1}" in out


def test_test_file_for_a_missing_policy_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ghost_test.yaml").write_text("tests:\n  - name: t\n    request: {}\n    expect: {}\n")
    status, _, err = _run(["test", str(tmp_path)], capsys)
    assert status == 1 and "ghost.yaml:1:1: error[PE001]: cannot read file" in err


# -- explain ----------------------------------------------------------------------------------


def test_explain_shows_rules_values_guardrails_and_estimates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"model": "claude-opus-5", "max_tokens": 4096, "batch": True,
                                   "messages": [{"role": "user", "content": "hi"}]}))
    context = tmp_path / "context.yaml"
    context.write_text("interactive: true\nlatency_slo_ms: 20000\n")
    state = tmp_path / "state.yaml"
    state.write_text("budgets: {daily_fast_premium: {spent_usd: 150}}\n")
    argv = ["explain", str(DEFAULT), "--request", str(request), "--context", str(context), "--state", str(state),
            "--input-tokens", "1000"]
    status, out, _ = _run(argv, capsys)
    assert status == 0
    assert "decision: standard by interactive-misses-slo (downgraded)" in out
    assert "  2. input-bound -> standard: not matched" in out
    assert "       request.input_tokens = 1000" in out
    assert "       vars.misses_slo = true" in out
    assert "guardrails: batch" in out
    assert "daily_fast_premium: spent $150.000000 of $200.000000" in out
    status, out, _ = _run([*argv, "--format", "json"], capsys)
    data = json.loads(out)
    assert data["decision"]["outcome"] == "downgraded" and data["guardrails"] == ["batch"]
    assert data["rules"][2]["read"] == {"model.fast_available": True, "vars.misses_slo": True}
    assert data["estimates"]["standard_usd"] == "$0.1074"  # 1000 x $5 + 4096 x $25 per MTok


def test_explain_rejects_bad_input_files_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "request.json"
    bad.write_text("[1, 2]")
    status, _, err = _run(["explain", str(DEFAULT), "--request", str(bad)], capsys)
    assert status == 2 and "must hold a mapping" in err
    bad.write_text('{"model": "claude-opus-4-6"}')  # the request is checked first, then the context
    context = tmp_path / "context.json"
    context.write_text('{"tenantt": "x"}')
    status, _, err = _run(["explain", str(DEFAULT), "--request", str(bad), "--context", str(context)], capsys)
    assert status == 1 and "params['max_tokens'] must be a positive int" in err


# -- fmt --------------------------------------------------------------------------------------


MESSY = """\
# header comment
rules:
    # the only rule
    - speed: fast   # go fast
      when: >-
        request.model.startsWith("claude-opus") &&
          context.interactive
      name: opus
name: messy
version: 1


budgets:
- key: "'global'"
  name: daily      # daily budget
  limit_usd: 10
  window: day
"""

TIDY = """\
# header comment
version: 1
name: messy
rules:
  # the only rule
  - name: opus
    when: >-
      request.model.startsWith("claude-opus") &&
        context.interactive
    speed: fast   # go fast

budgets:
  - name: daily      # daily budget
    key: "'global'"
    window: day
    limit_usd: 10
"""


def test_fmt_orders_keys_reindents_and_keeps_comments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "messy.yaml"
    path.write_text(MESSY)
    assert _run(["fmt", "--check", str(path)], capsys)[:2] == (1, f"would reformat {path}\n")
    assert path.read_text() == MESSY
    assert _run(["fmt", str(path)], capsys)[0] == 0
    assert path.read_text() == TIDY
    assert _run(["fmt", "--check", str(path)], capsys)[0] == 0


def test_fmt_check_passes_on_the_shipped_policies(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["fmt", "--check", str(POLICIES)], capsys)[0] == 0


def test_fmt_reports_broken_yaml_without_touching_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("a: [1, 2\n")
    status, _, err = _run(["fmt", str(path)], capsys)
    assert status == 1 and "error[PE001]" in err and path.read_text() == "a: [1, 2\n"


# -- diff against git -------------------------------------------------------------------------


def test_diff_reads_the_old_policy_from_a_git_revision(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    (repo / "policies").mkdir(parents=True)
    policy = repo / "policies" / "default.yaml"
    shutil.copy(DEFAULT, policy)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    subprocess.run([*git, "-C", str(repo), "add", "."], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-q", "-m", "base"], check=True)
    policy.write_text(policy.read_text().replace('when: "!context.interactive"', 'when: "false"'))
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"context": {"interactive": False, "latency_slo_ms": 1000}, "input_tokens": 100,
                               "request": {"model": "claude-opus-5-5", "max_tokens": 4096, "messages": []}}) + "\n")
    monkeypatch.chdir(repo)
    status, out, _ = _run(["diff", "main:policies/default.yaml", "policies/default.yaml", "--requests", str(log)], capsys)
    assert status == 0
    assert "1 decision changes" in out and "standard -> fast  [nobody-waiting -> interactive-misses-slo]" in out
    status, _, err = _run(["diff", "nosuchrev:policies/default.yaml", "policies/default.yaml", "--requests", str(log)], capsys)
    assert status == 2 and "cannot read nosuchrev:policies/default.yaml from git" in err


def _shuffled(value: object, rng: random.Random) -> object:
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: _shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [_shuffled(v, rng) for v in value]
    return value


def _times_as_text(value: object) -> object:
    if isinstance(value, dict):
        return {k: _times_as_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_times_as_text(v) for v in value]
    return str(value) if isinstance(value, datetime) else value


@pytest.mark.parametrize("seed", range(12))
def test_fmt_canonicalizes_any_key_order_and_indentation(seed: int) -> None:
    from policy_engine.fmt import KEY_ORDERS, format_text

    rng = random.Random(seed)
    for path in sorted(POLICIES.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        flow = rng.choice([False, None])
        text = yaml.safe_dump(_shuffled(data, rng), sort_keys=False, indent=rng.choice([2, 3, 4]),
                              default_flow_style=flow, width=rng.choice([40, 80, 1000]))
        out = format_text(text, "p.yaml")
        assert _times_as_text(yaml.safe_load(out)) == _times_as_text(data)  # fmt quotes times (YAML 1.1 would retype them)
        assert format_text(out, "p.yaml") == out  # idempotent
        assert list(yaml.safe_load(out)) == [k for k in KEY_ORDERS["policy"] if k in data]
        if flow is False:  # flow collections ({...}) are kept as written
            rule_keys = [list(r) for r in yaml.safe_load(out)["rules"]]
            assert all(keys == [k for k in KEY_ORDERS["rule"] if k in keys] for keys in rule_keys)
            assert all((len(line) - len(line.lstrip(" "))) % 2 == 0 for line in out.splitlines()
                       if line.lstrip().startswith(("name:", "- name:", "when:", "speed:")))


def test_explain_input_files_get_the_loaders_limits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bomb = tmp_path / "request.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i-1}"] * 10) + "]" for i in range(1, 7)]
    bomb.write_text("\n".join(lines) + "\n")
    status, _, err = _run(["explain", str(DEFAULT), "--request", str(bomb)], capsys)
    assert status == 2 and "error[PE003]" in err and "alias bomb" in err
