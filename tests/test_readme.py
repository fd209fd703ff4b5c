"""The README's reference tables are the ones the code generates, so the docs cannot drift."""

from __future__ import annotations

from pathlib import Path

from policy_engine.schemas import policy_reference_markdown

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")


def between(start: str, end: str) -> str:
    assert start in README and end in README, f"README lacks the {start} ... {end} markers"
    return README.split(start, 1)[1].split(end, 1)[0].strip("\n")


def test_policy_reference_is_generated_from_the_models() -> None:
    assert between("<!-- policy-reference:start -->", "<!-- policy-reference:end -->") == policy_reference_markdown().strip("\n")


def test_readme_documents_the_two_commands() -> None:
    assert "make demo" in README and "make test" in README
