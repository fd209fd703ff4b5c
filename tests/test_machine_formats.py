"""Machine formats against their published schemas: JUnit XML (Jenkins junit-10.xsd), lcov
tracefiles (read by lcov's own tools), Cobertura XML (coverage-04.dtd), and SARIF 2.1.0 (the
OASIS JSON schema). The schemas are vendored in tests/data/schemas with their licences."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from policy_engine.check import CODES
from policy_engine.cli import main

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = Path(__file__).parent / "data" / "schemas"
POLICIES = ROOT / "policies"


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    out = capsys.readouterr()
    return status, out.out, out.err


def _failing_policy(tmp_path: Path) -> Path:
    path = tmp_path / "failing.yaml"
    text = (POLICIES / "default.yaml").read_text()
    # The first case expects fast for a request the policy sends fast: expect standard instead.
    text = text.replace("expect: {speed: fast, rule: interactive-misses-slo", "expect: {speed: standard, rule: interactive-misses-slo", 1)
    path.write_text(text)
    return path


# -- JUnit ----------------------------------------------------------------------------------


def test_junit_validates_against_the_jenkins_schema_and_carries_failures(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from lxml import etree

    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nname: [\n")
    status, out, _ = _run(["test", str(POLICIES), str(_failing_policy(tmp_path)), str(broken), "--format", "junit"], capsys)
    assert status == 1
    schema = etree.XMLSchema(etree.parse(str(SCHEMAS / "junit-10.xsd")))
    document = etree.fromstring(out.encode())
    schema.assertValid(document)
    suites = {s.get("name"): s for s in document.iter("testsuite")}
    assert {"default", "cost-guard", "latency-first", "loading"} <= set(suites)
    failures = document.findall(".//testcase/failure")
    lines = (tmp_path / "failing.yaml").read_text().splitlines()
    expect = next(i for i, text in enumerate(lines) if "expect: {speed: standard, rule: interactive-misses-slo" in text)
    line = max(i for i in range(expect) if lines[i].startswith("  - name:")) + 1  # the failing case's own line
    assert len(failures) == 1 and failures[0].get("message").startswith(f"{tmp_path / 'failing.yaml'}:{line}: speed: expected")
    assert "- speed: standard\n+ speed: fast" in failures[0].text
    errors = suites["loading"].findall("testcase/error")
    assert len(errors) == 1 and str(broken) in errors[0].get("message")
    assert document.get("failures") == "1" and document.get("errors") == "1"
    total = sum(int(s.get("tests")) for s in document.iter("testsuite"))
    assert document.get("tests") == str(total) == str(len(document.findall(".//testcase")))


# -- lcov -----------------------------------------------------------------------------------


needs_lcov = pytest.mark.skipif(shutil.which("lcov") is None or shutil.which("genhtml") is None,
                                reason="lcov is not installed (make test installs it with apt-get)")


@needs_lcov
def test_lcov_tracefile_reads_back_in_lcov_with_our_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(["test", str(POLICIES), "--format", "json", "--coverage"], capsys)
    report = json.loads(out)
    covered = sum(p["coverage"]["covered"] for p in report["policies"])
    total = sum(p["coverage"]["total"] for p in report["policies"])
    status, out, _ = _run(["test", str(POLICIES), "--format", "lcov"], capsys)
    assert status == 0
    info = tmp_path / "policies.info"
    info.write_text(out)
    summary = subprocess.run(["lcov", "--summary", str(info), "--rc", "lcov_branch_coverage=1"],
                             capture_output=True, text=True, timeout=120)
    text = summary.stdout + summary.stderr
    assert summary.returncode == 0, text
    assert f"branches...: {100 * covered / total:.1f}% ({covered} of {total} branches)" in text
    from policy_engine.compile import compile_file

    rules = sum(len(compile_file(str(p)).rules) for p in POLICIES.glob("*.yaml"))
    assert f"({rules} of {rules} functions)" in text
    # genhtml reads the YAML sources the records point at, line by line.
    html = subprocess.run(["genhtml", "--branch-coverage", "-q", "-o", str(tmp_path / "html"), str(info)],
                          capture_output=True, text=True, timeout=300)
    assert html.returncode == 0, html.stdout + html.stderr
    [page] = (tmp_path / "html").rglob("default.yaml.gcov.html")
    rule_line = next(line for line in page.read_text().splitlines() if "- name: nobody-waiting" in line)
    assert 'class="lineCov"' in rule_line and 'class="branchCov"' in rule_line  # the rule's line: run, both arms taken


def test_lcov_records_map_rules_and_operands_to_their_yaml_lines(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(["test", str(POLICIES / "default.yaml"), "--format", "lcov"], capsys)
    lines = (POLICIES / "default.yaml").read_text().splitlines()
    records = out.splitlines()
    assert records[1] == f"SF:{POLICIES / 'default.yaml'}"
    functions = {name: int(line) for line, name in (r[3:].split(",", 1) for r in records if r.startswith("FN:"))}
    for name, line in functions.items():
        assert lines[line - 1].strip() == f"- name: {name}"
    for record in (r for r in records if r.startswith("BRDA:")):
        line = int(record[5:].split(",")[0])
        assert "name:" in lines[line - 1] or "when:" in lines[line - 1] or lines[line - 1].startswith("      ")
    # The operand `request.max_tokens <= 1024` of input-bound is never false in the tests: a zero arm on its line.
    bound = next(n for n, text in enumerate(lines, 1) if "request.max_tokens <= 1024" in text)
    assert any(re.fullmatch(rf"BRDA:{bound},\d+,1,0", r) for r in records)


# -- Cobertura ------------------------------------------------------------------------------


def test_cobertura_validates_against_its_dtd_with_the_same_figures(capsys: pytest.CaptureFixture[str]) -> None:
    from lxml import etree

    status, out, _ = _run(["test", str(POLICIES), "--format", "cobertura"], capsys)
    assert status == 0
    dtd = etree.DTD(str(SCHEMAS / "coverage-04.dtd"))
    document = etree.fromstring(out.encode())
    assert dtd.validate(document), dtd.error_log.filter_from_errors()
    status, data, _ = _run(["test", str(POLICIES), "--format", "json", "--coverage"], capsys)
    report = json.loads(data)
    covered = sum(p["coverage"]["covered"] for p in report["policies"])
    total = sum(p["coverage"]["total"] for p in report["policies"])
    assert (document.get("branches-covered"), document.get("branches-valid")) == (str(covered), str(total))
    classes = {c.get("name"): c for c in document.iter("class")}
    assert set(classes) == {"default", "cost-guard", "latency-first"}
    assert classes["default"].get("filename").endswith("policies/default.yaml")
    methods = [m.get("name") for m in classes["default"].iter("method")]
    assert methods == ["nobody-waiting", "input-bound", "interactive-misses-slo"]


# -- SARIF ----------------------------------------------------------------------------------


def _sarif_validator() -> object:
    import jsonschema

    schema = json.loads((SCHEMAS / "sarif-schema-2.1.0.json").read_text())
    return jsonschema.Draft4Validator(schema, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER)


def test_sarif_validates_against_the_2_1_0_schema_with_help_for_every_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    spaced = repo / "dir with space" / "ünï"
    spaced.mkdir(parents=True)
    (repo / ".git").mkdir()
    (repo / ".policy-engine.yaml").write_text("{}\n")
    shutil.copy(ROOT / "tests" / "data" / "lint" / "08_models.yaml", spaced / "x #1.yaml")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(ROOT / "tests" / "data" / "lint" / "04_cel_error.yaml", outside / "y.yaml")
    monkeypatch.chdir(repo)
    status, out, _ = _run(["lint", "dir with space", str(outside / "y.yaml"), "--format", "sarif"], capsys)
    assert status == 1
    log = json.loads(out)
    validator = _sarif_validator()
    errors = sorted(validator.iter_errors(log), key=str)  # type: ignore[attr-defined]
    assert not errors, errors[0]
    run = log["runs"][0]
    assert run["originalUriBaseIds"]["%SRCROOT%"]["uri"] == repo.resolve().as_uri() + "/"
    locations = [r["locations"][0]["physicalLocation"]["artifactLocation"] for r in run["results"]]
    inside = [loc for loc in locations if loc.get("uriBaseId") == "%SRCROOT%"]
    assert inside and all(loc["uri"] == "dir%20with%20space/%C3%BCn%C3%AF/x%20%231.yaml" for loc in inside)
    from rfc3986_validator import validate_rfc3986  # the draft-04 checker does not check uri-reference

    assert all(validate_rfc3986(loc["uri"], rule="URI_reference") for loc in locations)
    assert not validate_rfc3986("dir with space/x #1.yaml", rule="URI_reference")  # the check can fail
    absolute = [loc for loc in locations if "uriBaseId" not in loc]
    assert absolute and all(loc["uri"] == (outside / "y.yaml").resolve().as_uri() for loc in absolute)
    assert unquote(urlparse(absolute[0]["uri"]).path) == str((outside / "y.yaml").resolve())
    rules = run["tool"]["driver"]["rules"]
    assert {r["id"] for r in rules} == set(CODES)
    for rule in rules:
        assert rule["shortDescription"]["text"] == CODES[rule["id"]][1]
        assert len(rule["fullDescription"]["text"]) > len(rule["shortDescription"]["text"])
        assert rule["help"]["text"] and rule["help"]["markdown"].startswith(f"**{rule['id']}: ")
        assert rule["helpUri"].endswith(f"README.md#{rule['id'].lower()}")
        assert rule["defaultConfiguration"]["level"] == {"error": "error", "warning": "warning"}[CODES[rule["id"]][0]]


def test_the_schema_check_can_fail() -> None:
    validator = _sarif_validator()
    bad = {"version": "2.1.0", "runs": [{"tool": {"driver": {"name": "x", "rules": [{"id": "PE001", "helpUri": "not a uri"}]}},
                                         "results": [{"message": {"text": "m"}, "level": "loud"}]}]}
    assert list(validator.iter_errors(bad))  # type: ignore[attr-defined]


def test_the_readme_has_an_entry_for_every_code_the_help_links_to() -> None:
    from policy_engine.diagnostic_help import HELP, codes_markdown

    readme = (ROOT / "README.md").read_text()
    assert set(HELP) == set(CODES), "every code in check.CODES needs its entry in diagnostic_help.HELP"
    table = readme.split("<!-- diagnostic-codes:start -->", 1)[1].split("<!-- diagnostic-codes:end -->", 1)[0]
    assert table.strip("\n") == codes_markdown().strip("\n"), "run: python -m policy_engine.diagnostic_help README.md"
    for code in CODES:
        assert f'<a id="{code.lower()}"></a>{code}' in table
