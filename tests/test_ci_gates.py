"""CI gates: failing tests fail lint and the pre-commit hook, diff thresholds, settings files,
inline suppressions, YAML 1.1 values, and the smaller CLI defects of issue 18."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from policy_engine.cli import main

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_LOG = ROOT / "data" / "requests.jsonl.gz"

POLICY = """\
version: 1
name: gate
default: standard
rules:
  - name: background
    when: "!context.interactive"
    speed: standard
  - name: interactive
    when: context.interactive && request.max_tokens > 100
    speed: {speed}
tests:
  - name: background stays standard
    request: {{model: claude-opus-5-5, max_tokens: 1024, messages: [{{role: user, content: hi}}]}}
    context: {{interactive: false}}
    expect: {{speed: standard, rule: background}}
  - name: interactive goes {speed}
    request: {{model: claude-opus-5-5, max_tokens: 1024, messages: [{{role: user, content: hi}}]}}
    context: {{interactive: true}}
    expect: {{speed: {expect}, rule: interactive}}
"""


def _policy(tmp_path: Path, name: str = "gate.yaml", speed: str = "standard", expect: str | None = None) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(POLICY.format(speed=speed, expect=expect or speed))
    return path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    out = capsys.readouterr()
    return status, out.out, out.err


# -- failing tests are lint errors ----------------------------------------------------------


def test_a_failing_embedded_test_is_a_lint_error_at_its_expectation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _policy(tmp_path, expect="fast")  # the rule says standard, the test expects fast
    status, out, _ = _run(["lint", str(path)], capsys)
    assert status == 1
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "expect: {speed: fast" in text)
    assert f"{path}:{line}:5: error[PE305]: test 'interactive goes standard' fails: speed: expected 'fast', got 'standard'" in out
    assert _run(["lint", str(_policy(tmp_path, "ok.yaml"))], capsys)[0] == 0


def test_a_failing_test_file_case_is_a_lint_error_in_the_test_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _policy(tmp_path)
    cases = tmp_path / "gate_test.yaml"
    cases.write_text("tests:\n  - name: wrong\n    request: {model: claude-opus-5-5, max_tokens: 1024, "
                     "messages: [{role: user, content: hi}]}\n    context: {interactive: true}\n"
                     "    expect: {speed: fast}\n")
    status, out, _ = _run(["lint", str(tmp_path)], capsys)
    assert status == 1
    assert f"{cases}:5:5: error[PE305]: test 'wrong' fails against {tmp_path / 'gate.yaml'}: speed: expected 'fast'" in out
    assert _run(["lint", str(tmp_path), "--no-tests"], capsys)[0] == 0


def test_a_policy_named_like_a_test_file_gets_a_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _policy(tmp_path, "gate_test.yaml")
    status, out, _ = _run(["lint", str(path)], capsys)
    assert status == 1 and "unknown key 'version'" in out
    assert "read as a test file because its name ends in _test.yaml" in out


# -- the pre-commit hooks, in a scratch repository ---------------------------------------


def _hook_repo(tmp_path: Path) -> tuple[Path, str]:
    """This checkout's package and hooks as a committed git repository (pre-commit installs from a rev)."""
    repo = tmp_path / "hooks"
    repo.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", ".pre-commit-hooks.yaml"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "policy_engine", repo / "policy_engine",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", "build"))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-qm", "hooks"], check=True)
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    return repo, sha


def test_pre_commit_fails_on_a_policy_whose_test_fails_with_file_and_line(tmp_path: Path) -> None:
    hooks, sha = _hook_repo(tmp_path)
    scratch = tmp_path / "scratch"
    (scratch / "policies").mkdir(parents=True)
    policy = _policy(scratch / "policies", "gate.yaml", expect="fast")
    (scratch / ".pre-commit-config.yaml").write_text(
        f"repos:\n  - repo: {hooks}\n    rev: {sha}\n    hooks:\n      - id: policy-engine-lint\n"
        "      - id: policy-engine-test\n      - id: policy-engine-fmt\n")
    subprocess.run(["git", "init", "-q", str(scratch)], check=True)
    subprocess.run(["git", "-C", str(scratch), "add", "-A"], check=True)
    env = {**os.environ, "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-cache"), "POLICY_ENGINE_COMPILE": "0"}
    env.pop("POLICY_ENGINE_PURE_PYTHON", None)
    pre_commit = [sys.executable, "-m", "pre_commit"]
    run = subprocess.run([*pre_commit, "run", "--all-files", "--color", "never"], cwd=scratch, env=env,
                         capture_output=True, text=True, timeout=900)
    output = run.stdout + run.stderr
    assert run.returncode == 1, output
    line = next(n for n, text in enumerate(policy.read_text().splitlines(), 1) if "expect: {speed: fast" in text)
    assert f"policies/gate.yaml:{line}:5: error[PE305]" in output  # the lint hook
    case_line = line - 3  # the test hook names the case by the line of its `- name:`
    assert f"FAIL policies/gate.yaml:{case_line}: interactive goes standard" in output
    assert "policy-engine fmt --check" in output and "Traceback" not in output
    # Fixed, every hook passes.
    _policy(scratch / "policies", "gate.yaml")
    fixed = subprocess.run([*pre_commit, "run", "--all-files", "--color", "never"], cwd=scratch, env=env,
                           capture_output=True, text=True, timeout=900)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr


def test_the_hooks_file_declares_lint_test_and_both_fmt_modes() -> None:
    import yaml

    hooks = {h["id"]: h for h in yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())}
    assert hooks["policy-engine-test"]["entry"] == "policy-engine test"
    assert hooks["policy-engine-fmt"]["entry"] == "policy-engine fmt --check"
    assert hooks["policy-engine-fmt-fix"]["entry"] == "policy-engine fmt"
    assert "exclude" not in hooks["policy-engine-lint"]  # test files are linted too (their failing cases)


def test_fmt_fixes_what_check_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("name: p\nversion: 1\ndefault: standard\nrules: []\n")
    assert _run(["fmt", "--check", str(path)], capsys)[:2] == (1, f"would reformat {path}\n")
    assert path.read_text().startswith("name: p")  # --check writes nothing
    assert _run(["fmt", str(path)], capsys)[:2] == (0, f"formatted {path}\n")
    assert path.read_text().startswith("version: 1\nname: p\n")
    assert _run(["fmt", "--check", str(path)], capsys)[0] == 0


# -- YAML 1.1 values ----------------------------------------------------------------------


def test_unquoted_times_are_a_warning_and_fmt_quotes_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    path = _policy(tmp_path)
    text = path.read_text().replace("    context: {interactive: false}\n",
                                    "    context: {interactive: false}\n    now: 2026-03-02T15:00:00Z   # in business hours\n", 1)
    path.write_text(text)
    status, out, _ = _run(["lint", str(path)], capsys)
    assert status == 0 and "warning[PE006]: unquoted `2026-03-02T15:00:00Z`: a YAML 1.1 reader" in out
    assert _run(["lint", str(path), "--strict"], capsys)[0] == 1
    assert isinstance(yaml.safe_load(text)["tests"][0]["now"], datetime)  # what a YAML 1.1 tool sees
    assert _run(["fmt", str(path)], capsys)[0] == 0
    formatted = path.read_text()
    assert '    now: "2026-03-02T15:00:00Z" # in business hours\n' in formatted
    assert yaml.safe_load(formatted)["tests"][0]["now"] == "2026-03-02T15:00:00Z"
    assert _run(["lint", str(path), "--strict"], capsys)[0] == 0
    assert _run(["test", str(path)], capsys)[0] == 0  # the case still runs at that time


def test_yaml11_booleans_octals_and_base60_are_flagged_but_kept_where_quoting_changes_meaning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _policy(tmp_path)
    text = path.read_text().replace("    context: {interactive: false}\n", "    context: {interactive: no, mode: 0755, at: 1:30}\n", 1)
    path.write_text(text)
    status, out, _ = _run(["lint", str(path), "--format", "json"], capsys)
    found = {(d["code"], d["message"].split(":")[0]) for d in json.loads(out)["diagnostics"]}
    assert {("PE006", "unquoted `no`"), ("PE006", "unquoted `0755`"), ("PE006", "unquoted `1")} <= found
    # Quoted, `no` would be the string "no" in the case's context, not false: fmt leaves all three.
    assert _run(["fmt", str(path)], capsys)[0] == 0
    assert "{interactive: no, mode: 0755, at: 1:30}" in path.read_text()


# -- diff thresholds ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("log") / "requests.jsonl"
    with gzip.open(SAMPLE_LOG, "rt") as source:
        path.write_text("".join(line for _, line in zip(range(1500), source)))
    return path


def _span_days(log: Path) -> float:
    with gzip.open(log, "rt") if log.suffix == ".gz" else open(log) as lines:
        stamps = [json.loads(line)["ts"] for line in lines]
    seconds = [datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() for s in stamps]
    return (max(seconds) - min(seconds)) / 86400


def test_diff_fails_above_a_cost_per_day_threshold_and_passes_below(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = SAMPLE_LOG  # the whole committed sample log (10,000 lines over 36 hours)
    old, new = _policy(tmp_path, "old.yaml"), _policy(tmp_path, "new.yaml", speed="fast")
    status, out, _ = _run(["diff", str(old), str(new), "--requests", str(log), "--format", "json"], capsys)
    assert status == 0  # no threshold, no gate
    report = json.loads(out)
    delta = float(report["cost_delta_usd"])
    per_day = delta / _span_days(log)
    assert per_day > 5
    argv = ["diff", str(old), str(new), "--requests", str(log), "--max-cost-increase-usd-per-day"]
    status, out, _ = _run([*argv, "5"], capsys)
    assert status == 1
    assert "CROSSED  --max-cost-increase-usd-per-day" in out
    assert f"+${per_day:,.2f}/day (limit $5.00/day)" in out
    assert "FAIL: 1 threshold crossed: max-cost-increase-usd-per-day" in out
    status, out, _ = _run([*argv, f"{per_day + 1:.2f}"], capsys)
    assert status == 0 and "thresholds: all met" in out
    # The same change does not cross the threshold when it is a change of nothing.
    assert _run(["diff", str(old), str(old), "--requests", str(log), "--max-cost-increase-usd-per-day", "5"], capsys)[0] == 0


def test_diff_reports_every_threshold_it_checks(tmp_path: Path, small_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old, new = _policy(tmp_path, "old.yaml"), _policy(tmp_path, "new.yaml", speed="fast")
    reject = tmp_path / "reject.yaml"
    reject.write_text(old.read_text().replace("rules:", "ceilings: {per_request_usd: 0.01, on_exceed: reject}\nrules:"))
    status, out, _ = _run(["diff", str(old), str(new), "--requests", str(small_log), "--format", "markdown",
                           "--max-cost-increase-usd", "1", "--max-cost-increase-percent", "10000",
                           "--max-speed-change-percent", "1", "--fail-on-new-rejects"], capsys)
    assert status == 1
    assert "#### Thresholds" in out
    assert "| ❌ crossed | `--max-cost-increase-usd`" in out and "| ✅ met | `--max-cost-increase-percent`" in out
    assert "| ❌ crossed | `--max-speed-change-percent`" in out and "| ✅ met | `--fail-on-new-rejects`" in out
    status, out, _ = _run(["diff", str(old), str(reject), "--requests", str(small_log), "--format", "json",
                           "--fail-on-new-rejects"], capsys)
    data = json.loads(out)
    assert status == 1 and data["thresholds_crossed"] == ["fail-on-new-rejects"]
    rejected = data["new"]["speed_mix"]["rejected"] - data["old"]["speed_mix"]["rejected"]
    assert rejected > 0 and data["thresholds"][0]["value"] == str(rejected)


def test_diff_thresholds_come_from_the_settings_file(tmp_path: Path, small_log: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _policy(tmp_path, "old.yaml"), _policy(tmp_path, "new.yaml", speed="fast")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".policy-engine.yaml").write_text("thresholds:\n  max_cost_increase_usd: 1\n")
    monkeypatch.chdir(tmp_path)
    status, out, _ = _run(["diff", "old.yaml", "new.yaml", "--requests", str(small_log)], capsys)
    assert status == 1 and "CROSSED  --max-cost-increase-usd:" in out
    assert _run(["diff", "old.yaml", "new.yaml", "--requests", str(small_log), "--no-config"], capsys)[0] == 0
    assert _run(["diff", "old.yaml", "new.yaml", "--requests", str(small_log), "--max-cost-increase-usd", "1000000"],
                capsys)[0] == 0  # the command line wins


def test_a_per_day_threshold_needs_timestamps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"request": {"model": "claude-opus-5-5", "max_tokens": 10,
                                           "messages": [{"role": "user", "content": "hi"}]}}) + "\n")
    old = _policy(tmp_path)
    status, _, err = _run(["diff", str(old), str(old), "--requests", str(log), "--max-cost-increase-usd-per-day", "5"], capsys)
    assert status == 2 and "needs a log whose lines carry `ts` timestamps" in err
    assert _run(["diff", str(old), str(old), "--requests", str(log), "--max-cost-increase-usd-per-day", "-5"], capsys)[0] == 2


# -- settings file --------------------------------------------------------------------------


def test_settings_set_paths_catalog_severities_and_coverage(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".git").mkdir()
    policy = _policy(tmp_path / "policies")
    policy.write_text(policy.read_text().replace("    speed: {speed}\n".format(speed="standard"),
                                                 "    speed: standard\n  - name: never-tested\n    when: request.max_tokens > 99999\n"
                                                 "    speed: standard\n", 1))
    (tmp_path / ".policy-engine.yaml").write_text(
        "paths: [policies/]\nseverity: {PE302: error, PE006: 'off'}\nthresholds: {coverage: 100}\n")
    monkeypatch.chdir(tmp_path / "policies")  # found from a subdirectory; paths are relative to the settings file
    status, out, _ = _run(["lint"], capsys)
    assert status == 1 and "error[PE302]: no test reaches rule 'never-tested'" in out, out
    status, out, _ = _run(["test"], capsys)
    assert status == 1 and "below the threshold of 100%" in out
    assert _run(["test", "--threshold", "0"], capsys)[0] == 0  # the command line wins
    assert _run(["lint", "--no-config", "gate.yaml"], capsys)[0] == 0  # PE302 is a warning again
    assert _run(["fmt", "--check"], capsys)[0] == 0 and _run(["check"], capsys)[0] == 0  # the settings' paths too
    assert _run(["fmt", "--check", "--no-config"], capsys)[0] == 2  # no PATH and no settings
    # The user catalog: a missing one is a usage error, a broken one is reported by its name.
    (tmp_path / ".policy-engine.yaml").write_text("paths: [policies/]\ncatalog: catalog/house.yaml\n")
    status, _, err = _run(["lint"], capsys)
    assert status == 2 and "no such catalog file: " in err and "house.yaml" in err
    (tmp_path / "catalog").mkdir()
    (tmp_path / "catalog" / "house.yaml").write_text("not: a catalog\n")
    status, out, err = _run(["lint"], capsys)
    assert status == 1 and "house.yaml" in out + err


def test_pyproject_tool_table_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".git").mkdir()
    policy = _policy(tmp_path / "policies")
    policy.write_text(policy.read_text() + "variables:\n  unused: request.max_tokens\n")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.policy-engine]\npaths = ["policies"]\n'
                                              'severity = { PE240 = "error" }\n')
    monkeypatch.chdir(tmp_path)
    status, out, _ = _run(["lint"], capsys)
    assert status == 1 and "error[PE240]: variable 'unused' is never used" in out


@pytest.mark.parametrize("content, message", [
    ("severity: {PE999: error}\n", "unknown diagnostic code 'PE999'"),
    ("severity: {PE302: loud}\n", "severity.PE302"),
    ("pathz: [x]\n", "unknown key 'pathz'"),
    ("thresholds: {coverage: 120}\n", "thresholds.coverage"),
])
def test_a_bad_settings_file_is_a_usage_error_with_its_position(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch, content: str, message: str) -> None:
    (tmp_path / ".git").mkdir()
    (tmp_path / ".policy-engine.yaml").write_text(content)
    _policy(tmp_path)
    monkeypatch.chdir(tmp_path)
    status, _, err = _run(["lint", "gate.yaml"], capsys)
    assert status == 2 and ".policy-engine.yaml:1:" in err and message in err, err
    assert _run(["lint", "gate.yaml", "--config", "nope.yaml"], capsys)[0] == 2


# -- suppressions -------------------------------------------------------------------------


UNTESTED = """\
version: 1
name: s
default: standard
variables:
  unused: request.max_tokens       # policy-engine: ignore[PE240] kept for the next rule
rules:
  # policy-engine: ignore[PE302] reached in production only
  - name: big
    when: request.max_tokens > 100000
    speed: standard
  - name: small
    when: request.max_tokens < 10
    speed: standard
tests:
  - name: default
    request: {model: claude-opus-5-5, max_tokens: 1024, messages: [{role: user, content: hi}]}
    expect: {rule: default}
"""


def test_a_suppression_silences_one_code_on_its_line_or_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(UNTESTED)
    status, out, _ = _run(["lint", str(path), "--format", "json", "--strict"], capsys)
    found = [(d["code"], d["line"]) for d in json.loads(out)["diagnostics"]]
    assert found == [("PE302", 11)]  # `small` has no suppression; `big`'s and the variable's are used
    assert status == 1


def test_suppressions_must_name_a_code_and_must_silence_something(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.yaml"
    text = UNTESTED.replace("# policy-engine: ignore[PE240] kept", "# policy-engine: ignore kept")
    text = text.replace("    when: request.max_tokens < 10\n", "    when: request.max_tokens < 10   # policy-engine: ignore[PE203, PE999]\n")
    path.write_text(text)
    status, out, _ = _run(["lint", str(path), "--format", "json"], capsys)
    found = {(d["code"], d["line"], d["message"]) for d in json.loads(out)["diagnostics"]}
    assert ("PE402", 5, "a suppression must name the codes it silences") in found
    assert ("PE240", 5, "variable 'unused' is never used") in found  # a bare ignore silences nothing
    assert ("PE401", 12, "suppression of PE203 silences nothing here") in found
    assert ("PE401", 12, "suppression names PE999, which is not a policy-engine code") in found
    assert status == 1  # PE402 is an error


# -- the smaller defects ------------------------------------------------------------------


def test_check_on_a_folder_without_policies_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _run(["check", str(tmp_path)], capsys)
    assert status == 2 and "no policy files found" in err


def test_a_missing_catalog_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _policy(tmp_path)
    for verb in (["lint", str(path)], ["test", str(path)], ["explain", str(path), "--request", str(ROOT / "examples" / "request.json")]):
        status, _, err = _run([*verb, "--catalog", str(tmp_path / "missing.yaml")], capsys)
        assert status == 2 and "no such catalog file" in err, verb


def test_check_counts_in_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "one.yaml"
    path.write_text("version: 1\nname: one\ndefault: standard\nrules:\n  - {name: r, when: 'true', speed: standard}\n"
                    "budgets:\n  - {name: b, window: day, limit_usd: 1, counts: premium, on_exceed: downgrade}\n")
    status, out, _ = _run(["check", str(path)], capsys)
    assert status == 0 and out == f"{path}: ok (one: 1 rule, 1 budget, 0 tests)\n"


def test_explain_refuses_a_state_budget_the_policy_lacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state.yaml"
    state.write_text("budgets: {daily_fast_premiun: {spent_usd: 150}}\n")
    status, _, err = _run(["explain", str(ROOT / "examples" / ".." / "policies" / "default.yaml"), "--request",
                           str(ROOT / "examples" / "request.json"), "--state", str(state)], capsys)
    assert status == 2 and "--state sets budget 'daily_fast_premiun'" in err and "did you mean 'daily_fast_premium'?" in err


def test_counts_and_coverage_gaps_read_as_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _policy(tmp_path)
    status, out, _ = _run(["lint", str(path), "--format", "github"], capsys)
    assert status == 0 and out.endswith("policy-engine lint: 1 file, 0 errors, 0 warnings\n")
    status, out, _ = _run(["test", str(path), "--coverage"], capsys)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "name: interactive" in text)
    assert f"{path}:{line}:11: rule interactive: no test case where it does not match" in out
    assert "never" not in out


def test_directories_leave_out_hidden_files_such_as_the_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".git").mkdir()
    (tmp_path / ".policy-engine.yaml").write_text("severity: {PE301: warning}\n")
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    (tmp_path / ".github" / "workflows" / "ci.yml").write_text("on: push\n")
    _policy(tmp_path / "policies")
    monkeypatch.chdir(tmp_path)
    status, out, _ = _run(["lint", "."], capsys)
    assert status == 0 and out == "1 file checked: 0 errors, 0 warnings\n"
