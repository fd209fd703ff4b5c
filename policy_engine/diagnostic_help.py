"""What each diagnostic code means and how to fix it: SARIF rule help and the README's code table.

`check.CODES` holds each code's severity and one-line summary; this module holds the
longer text code-scanning alert pages show. Every code has an entry (a test checks it),
and the README's "Diagnostic codes" table is generated from both.
"""

from __future__ import annotations

import functools

__all__ = ["HELP", "help_uri", "readme_uri", "README_URL", "codes_markdown"]

README_URL = "https://github.com/anthropics/policy-engine/blob/main/README.md"
"""Where the README is published when the installed distribution names no Documentation URL."""

HELP: dict[str, tuple[str, str]] = {
    "PE001": ("The file cannot be read, or it is not valid YAML, so nothing in it can be checked.",
              "Fix the YAML syntax at the position shown (an unclosed quote or bracket, a tab used for "
              "indentation, a key without a value). For a `*_test.yaml` file, also check that the policy "
              "it names with `policy:` exists."),
    "PE002": ("A mapping repeats a key. YAML readers keep only one of the values, silently.",
              "Remove or rename one of the two keys; the message names the line of the first."),
    "PE003": ("The file is larger than 1 MiB, nests too deeply, or expands aliases into more values than a "
              "policy can hold (an alias bomb).",
              "A policy is configuration: split it, or remove the anchors (`&`) and aliases (`*`) that "
              "repeat large structures."),
    "PE004": ("The file is not UTF-8 text.", "Save the file as UTF-8."),
    "PE005": ("The file holds no YAML document.", "A policy starts with `version: 1` and `name:`."),
    "PE006": ("A plain (unquoted) value reads differently in YAML 1.1 and YAML 1.2: `2026-03-02T15:00:00Z` is a "
              "timestamp to pyyaml's `safe_load` but a string to a YAML 1.2 reader; `yes`, `no`, `on`, `off` "
              "are booleans; `0777` is octal; `1:30` is a base-60 number. Tools then disagree about the file.",
              "Quote the value (`now: \"2026-03-02T15:00:00Z\"`), or write booleans as `true`/`false` and "
              "numbers without a leading zero. `policy-engine fmt` quotes such values wherever the policy "
              "stays the same."),
    "PE010": ("A mapping has a key the policy format does not define, usually a misspelling.",
              "Use the suggested key, or remove it. The policy format reference in the README lists every "
              "key. A policy saved under a name ending in `_test.yaml` is read as a test file: rename it."),
    "PE011": ("A value has the wrong type or is out of range.",
              "Give the value the type the message names; the hint shows an example."),
    "PE012": ("A required key is missing.", "Add the key named in the message."),
    "PE020": ("Two rules, budgets or tests share a name; decisions, metrics and tests refer to them by name.",
              "Give each one its own name."),
    "PE100": ("A CEL expression does not parse.", "Fix the expression at the caret (a missing operand, "
              "an unbalanced parenthesis, `and`/`or` instead of `&&`/`||`)."),
    "PE101": ("A CEL expression uses an identifier, field or function that does not exist.",
              "Use the suggested name; the README's features section lists what a policy can read."),
    "PE102": ("A CEL expression combines values of types no overload accepts (`int < string`, ...).",
              "Convert one side (`int(x)`, `double(x)`, `string(x)`) or compare like with like."),
    "PE103": ("An expression has the wrong result type: `when` must be `bool`, `reason` and budget `key` "
              "must be `string`.", "Change the expression so it yields the type the field needs."),
    "PE104": ("An expression's worst-case evaluation cost is over the limit, which bounds the time a "
              "decision can take.", "Simplify the expression (fewer nested comprehensions), or raise the "
              "limit with `--max-cost` if the cost is intended."),
    "PE105": ("An expression is nested deeper than 64 levels (parentheses alone do not count). The limit keeps "
              "compiling and evaluating any input bounded in time and memory.",
              "Split the expression into `variables:` and refer to them as `vars.<name>`."),
    "PE106": ("An expression is longer than 100,000 characters, the limit that keeps parsing any input bounded.",
              "Move long lists into variables or several rules; an allowlist of models belongs in the catalog."),
    "PE201": ("An earlier rule matches every request, so this rule and every later one never decide.",
              "Move the catch-all rule last, or narrow its condition."),
    "PE202": ("Every request this rule matches is matched by an earlier rule first, so it never decides.",
              "Reorder the rules (more specific first) or remove the redundant one."),
    "PE203": ("The rule's condition contradicts itself (`x > 5 && x < 3`), so it never matches.",
              "Check the comparison operators and bounds."),
    "PE210": ("The rule chooses fast, but a guardrail always forces standard for the requests it matches "
              "(a model without fast mode, a batch request, Priority Tier).",
              "Narrow the rule to requests that can run fast, or choose standard."),
    "PE220": ("A model compared with `request.model` is not in the catalog, so the rule matches nothing, "
              "or is a misspelling.", "Use the suggested model name, or add the model to your catalog "
              "file (`--catalog`, or `catalog:` in `.policy-engine.yaml`)."),
    "PE221": ("The catalog has no price for the model at standard (or at fast) speed: its cost cannot be "
              "estimated, so ceilings and budgets cannot bound it.", "Give the model a price in your catalog file."),
    "PE222": ("A rule, or a test without its own `now`, names a model whose fast mode is retired, or is retired "
              "within `lint --retirement-days` (30 by default). The message gives the date, what fast requests do "
              "after it (an API error, or served and billed at standard) and the source. The engine never sends a "
              "retired model fast, so a rule that picks such a model by name quietly stops mattering.",
              "Decide on `model.fast_available` (and `model.fast_retires_in_days`), and move the test to a current "
              "model or pin its `now:` to the date it is about."),
    "PE223": ("`request.model` is compared with a literal (`==`, `in`, `startsWith`) where a model feature would "
              "say the same. Model names go stale: a new model is missed, a retired one is still named.",
              "Say what the rule needs of the model: `model.fast_available`, `model.family == 'opus'`, "
              "`model.fast_multiplier <= 2.0`, `has(model.fast_retires_in_days)`."),
    "PE224": ("A price block in a catalog file has no `source` or no `as_of`. A price is only as good as its source, "
              "and the catalog keeps both with every figure.",
              "Add `source: <the page, contract or invoice>` and `as_of: YYYY-MM-DD` to the block."),
    "PE230": ("A budget key can be the empty string or fail to evaluate (an optional context field or "
              "label that is absent); every such request then shares one `<key-error>` bucket.",
              "Guard optional fields: `has(context.tenant) ? context.tenant : 'untagged'`."),
    "PE240": ("A variable is defined but no rule, key or other variable uses it.",
              "Remove it, or use it as `vars.<name>`."),
    "PE250": ("The policy opts out of the money guarantee: `on_invalid_context: allow_unmetered` sends requests "
              "with an invalid context unreserved and unsettled, `on_unpriced_model: allow_unmetered` settles "
              "unpriced models at $0, and `on_incomplete_stream: observed` settles a stream cut short at what the "
              "client read. In each case the ledger can count less than what is billed (README, \"What is guaranteed\").",
              "Remove the key to get the metered default, or keep it deliberately and suppress the warning with "
              "`# policy-engine: ignore[PE250]` on its line."),
    "PE251": ("`on_unpriced_model: {price_as: ...}` names a model the catalog does not price at standard speed, "
              "so the fallback price itself is unknown.", "Name a model the catalog prices, or state a `rate:`."),
    "PE290": ("The policy has so many rules that the unreachable-rule analysis reached its comparison budget "
              "(`check.MAX_IMPLICATION_CHECKS`): the rules after the one named were not checked for PE202.",
              "Split the policy into smaller files, or merge rules that share a condition; the decision itself "
              "is unaffected."),
    "PE301": ("The policy has no tests, so nothing checks that it decides what its author intends.",
              "Add a `tests:` section (or a `<name>_test.yaml` file beside it); `policy-engine test` runs it."),
    "PE302": ("No test case is decided by this rule, so a change that breaks it goes unnoticed.",
              "Add a test case this rule decides; `policy-engine test --coverage` lists what is missing."),
    "PE303": ("A test expects a rule, guardrail or budget the policy does not have.",
              "Use one of the names the hint suggests; the test can never pass as written."),
    "PE304": ("A test case's request or context is invalid, so no decision can be made for it.",
              "Fix the request (Messages API parameters) or context the message names."),
    "PE305": ("A test case's decision is not what it expects: the policy (or the test) is wrong.",
              "Run `policy-engine test` on the file to see the expectation against the decision "
              "(`-` expected, `+` got), then fix the rule or the expectation."),
    "PE401": ("A `# policy-engine: ignore[CODE]` comment silences nothing: no finding with that code is on "
              "its line or rule (the finding was fixed, or the comment is in the wrong place), or the code "
              "does not exist.", "Remove the comment, or move it to the line of the finding."),
    "PE402": ("A suppression comment names no code. Silencing every finding on a line would also hide the "
              "ones nobody has read.", "Name the codes: `# policy-engine: ignore[PE302]`."),
}
"""Code -> (full description, help in markdown)."""


@functools.lru_cache(maxsize=1)
def readme_uri() -> str:
    """The published README: the installed distribution's Documentation URL, else README_URL."""
    try:
        from importlib.metadata import PackageNotFoundError, metadata

        for entry in metadata("policy-engine").get_all("Project-URL") or ():
            label, _, url = entry.partition(",")
            if label.strip().lower() in ("documentation", "docs"):
                return str(url).strip()
    except PackageNotFoundError:  # running from a source tree that is not installed
        pass
    return README_URL


def help_uri(code: str) -> str:
    """The README's entry for a code (its row in "Diagnostic codes")."""
    return f"{readme_uri()}#{code.lower()}"


def codes_markdown() -> str:
    """The README's table of every code (between the diagnostic-codes markers)."""
    from .check import CODES

    rows = ["| code | severity | finding | what to do |", "|---|---|---|---|"]
    for code, (severity, summary) in CODES.items():
        full, fix = (text.replace("|", "\\|") for text in HELP.get(code, (summary + ".", "")))
        rows.append(f'| <a id="{code.lower()}"></a>{code} | {severity} | {full} | {fix} |')
    return "\n".join(rows) + "\n"


START, END = "<!-- diagnostic-codes:start -->\n", "<!-- diagnostic-codes:end -->"


def update_readme(path: str) -> bool:
    """Rewrite the table between the README's diagnostic-codes markers; True when it changed."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    updated = head + START + codes_markdown() + END + tail
    if updated != text:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(updated)
    return updated != text


if __name__ == "__main__":  # python -m policy_engine.diagnostic_help README.md
    import sys

    print("updated" if update_readme(sys.argv[1] if len(sys.argv) > 1 else "README.md") else "up to date")
