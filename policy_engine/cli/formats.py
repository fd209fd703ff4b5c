"""`policy-engine test` results for CI tools: JUnit XML, lcov tracefiles and Cobertura XML.

Coverage maps onto the formats' code model: a policy file is a source file, each rule a
function (at the line of its `name:`), and each coverage pair (a rule matched / not
matched, an `&&`/`||` operand true / false) a branch with two arms at the YAML line where
the rule or operand is written. A line's hit count is how many test cases evaluated what
is on it, so tools that colour lines show which rules and operands the tests reach.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any
from xml.etree import ElementTree as ET

__all__ = ["junit", "lcov", "cobertura"]


def _xml(root: ET.Element, doctype: str = "") -> str:
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + doctype + ET.tostring(root, encoding="unicode") + "\n"


def junit(report: dict[str, Any]) -> str:
    """JUnit XML (the Jenkins / Surefire dialect GitHub, GitLab and Jenkins read): a suite per policy file."""
    cases_total = sum(len(p["cases"]) for p in report["policies"])
    errors = report.get("errors", [])
    total_time = sum(c["time_s"] for p in report["policies"] for c in p["cases"])
    root = ET.Element("testsuites", name="policy-engine test", tests=str(cases_total + len(errors)),
                      failures=str(report["failed"]), errors=str(len(errors)), time=f"{total_time:.3f}")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    for entry in report["policies"]:
        cases = entry["cases"]
        suite = ET.SubElement(root, "testsuite", name=entry["policy"], tests=str(len(cases)),
                              failures=str(sum(not c["passed"] for c in cases)), errors="0", skipped="0",
                              time=f"{sum(c['time_s'] for c in cases):.3f}", timestamp=stamp, file=entry["file"])
        for case in cases:
            element = ET.SubElement(suite, "testcase", name=case["name"], classname=entry["file"],
                                    time=f"{case['time_s']:.3f}")
            if not case["passed"]:
                failure = ET.SubElement(element, "failure", type="expectation",
                                        message=f"{case['where']}: {case['failures'][0] if case['failures'] else 'failed'}")
                failure.text = "\n".join([f"{case['where']}: {case['name']}", *(case["diff"] or case["failures"])])
            ET.SubElement(element, "system-out").text = case["where"]
    if errors:
        suite = ET.SubElement(root, "testsuite", name="loading", tests=str(len(errors)), failures="0",
                              errors=str(len(errors)), skipped="0", time="0", timestamp=stamp)
        for problem in errors:
            first = problem.splitlines()[0] if problem else "error"
            element = ET.SubElement(suite, "testcase", name=first.split(": ", 1)[0], classname="loading", time="0")
            ET.SubElement(element, "error", type="PolicyError", message=first).text = problem
    return _xml(root)


def _pairs(coverage: Any) -> list[tuple[Any, Any]]:
    items = coverage.items
    return list(zip(items[::2], items[1::2]))


def _lines(coverage: Any) -> dict[int, tuple[int, int, int]]:
    """YAML line -> (hits, outcomes covered, outcomes) of the rules and operands written on it."""
    lines: dict[int, tuple[int, int, int]] = {}
    for yes, no in _pairs(coverage):
        hits, covered, total = lines.get(yes.line, (0, 0, 0))
        lines[yes.line] = (max(hits, yes.hits + no.hits), covered + yes.covered + no.covered, total + 2)
    return dict(sorted(lines.items()))


def lcov(coverages: Sequence[tuple[str, Any]]) -> str:
    """An lcov tracefile (geninfo(1) format): one record per policy file."""
    out: list[str] = []
    for path, coverage in coverages:
        out += ["TN:policy_engine", f"SF:{os.path.abspath(path)}"]
        pairs = _pairs(coverage)
        rules = [(yes, no) for yes, no in pairs if yes.what == "matched"]
        for yes, _ in rules:
            out.append(f"FN:{yes.line},{yes.rule}")
        for yes, no in rules:
            out.append(f"FNDA:{yes.hits + no.hits},{yes.rule}")
        out += [f"FNF:{len(rules)}", f"FNH:{sum(yes.hits + no.hits > 0 for yes, no in rules)}"]
        for block, (yes, no) in enumerate(pairs):
            evaluated = yes.hits + no.hits > 0
            for branch, item in enumerate((yes, no)):
                out.append(f"BRDA:{item.line},{block},{branch},{item.hits if evaluated else '-'}")
        out += [f"BRF:{2 * len(pairs)}", f"BRH:{sum(item.hits > 0 for pair in pairs for item in pair)}"]
        lines = _lines(coverage)
        out += [f"DA:{line},{hits}" for line, (hits, _, _) in lines.items()]
        out += [f"LF:{len(lines)}", f"LH:{sum(hits > 0 for hits, _, _ in lines.values())}", "end_of_record"]
    return "\n".join(out) + "\n"


def _rate(part: int, whole: int) -> str:
    return f"{part / whole:.4f}" if whole else "1"


def cobertura(coverages: Sequence[tuple[str, Any]], root: str) -> str:
    """Cobertura XML (coverage-04.dtd): a package per directory, a class per policy file, a method per rule."""
    from .. import __version__

    base = os.path.abspath(root)
    packages: dict[str, list[tuple[str, Any, dict[int, tuple[int, int, int]]]]] = {}
    for path, coverage in coverages:
        full = os.path.abspath(path)
        # Inside the root, relative to <source>; outside it, absolute (readers take either).
        shown = os.path.relpath(full, base) if os.path.commonpath([full, base]) == base else full
        name = os.path.dirname(shown).strip(os.sep).replace(os.sep, ".") or "."
        packages.setdefault(name, []).append((shown.replace(os.sep, "/"), coverage, _lines(coverage)))

    def rates(members: list[tuple[str, Any, dict[int, tuple[int, int, int]]]]) -> dict[str, str]:
        lines = [hits for _, _, by_line in members for hits, _, _ in by_line.values()]
        branches = sum(len(c.items) for _, c, _ in members)
        covered = sum(c.covered for _, c, _ in members)
        return {"line-rate": _rate(sum(h > 0 for h in lines), len(lines)), "branch-rate": _rate(covered, branches),
                "lines-covered": str(sum(h > 0 for h in lines)), "lines-valid": str(len(lines)),
                "branches-covered": str(covered), "branches-valid": str(branches)}

    every = [m for members in packages.values() for m in members]
    top = ET.Element("coverage", {**rates(every), "complexity": "0", "version": __version__,
                                  "timestamp": str(int(time.time() * 1000))})
    ET.SubElement(ET.SubElement(top, "sources"), "source").text = base
    package_list = ET.SubElement(top, "packages")
    for name, members in packages.items():
        figures = rates(members)
        package = ET.SubElement(package_list, "package", {"name": name, "line-rate": figures["line-rate"],
                                                          "branch-rate": figures["branch-rate"], "complexity": "0"})
        classes = ET.SubElement(package, "classes")
        for shown, coverage, by_line in members:
            figures = rates([(shown, coverage, by_line)])
            cls = ET.SubElement(classes, "class", {"name": coverage.compiled.name, "filename": shown,
                                                   "line-rate": figures["line-rate"], "branch-rate": figures["branch-rate"],
                                                   "complexity": "0"})
            methods = ET.SubElement(cls, "methods")
            for yes, no in _pairs(coverage):
                if yes.what != "matched":
                    continue
                rule_items = [i for i in coverage.items if i.rule == yes.rule]
                method = ET.SubElement(methods, "method", {
                    "name": yes.rule, "signature": "", "line-rate": "1" if yes.hits + no.hits else "0",
                    "branch-rate": _rate(sum(i.covered for i in rule_items), len(rule_items)), "complexity": "0"})
                ET.SubElement(ET.SubElement(method, "lines"), "line", number=str(yes.line), hits=str(yes.hits + no.hits))
            line_elements = ET.SubElement(cls, "lines")
            for number, (hits, covered, total) in by_line.items():
                percent = 100 * covered // total
                line = ET.SubElement(line_elements, "line", {
                    "number": str(number), "hits": str(hits), "branch": "true",
                    "condition-coverage": f"{percent}% ({covered}/{total})"})
                ET.SubElement(ET.SubElement(line, "conditions"), "condition", number="0", type="jump", coverage=f"{percent}%")
    doctype = '<!DOCTYPE coverage SYSTEM "http://cobertura.sourceforge.net/xml/coverage-04.dtd">\n'
    return _xml(top, doctype)
