"""`policy-engine catalog show | check | diff`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from policy_engine.cli import main

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "requests.jsonl.gz"


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def test_show_prints_every_figure_with_its_source(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(["catalog", "show", "claude-opus-5-5", "--at", "2026-12-02"], capsys)
    assert status == 0
    assert "fast: fast mode available; no beta header" in out
    assert "standard: above 0: $4 in / $20 out" in out
    assert "fast price: 2x standard, over the full context, cache included" in out
    assert "fast rates above 0 tokens: $8 in, $40 out, $10 / $16 cache writes, $0.4 cache read" in out
    # every block names its source, date and kind
    blocks = [line for line in out.splitlines() if line.startswith("  ") and not line.startswith("    ")
              and ":" in line and "rates" not in line]
    sources = [line for line in out.splitlines() if line.strip().startswith("source:")]
    assert len(sources) == len(blocks) and all("as of 2026-" in s for s in sources)
    status, out, _ = _run(["catalog", "show", "claude-opus-5-5", "--format", "json"], capsys)
    data = json.loads(out)
    assert data["standard"]["source_kind"] == "primary" and data["fast"]["pricing"]["multiplier"] == "2"


def test_show_on_a_platform_and_a_date(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(["catalog", "show", "claude-opus-5-5", "--platform", "foundry"], capsys)
    assert status == 0 and "fast model id claude-opus-5-5-fast, no speed field" in out
    _, out, _ = _run(["catalog", "show", "claude-opus-4-8", "--at", "2026-11-30"], capsys)
    assert "fast: fast mode available; beta header fast-mode-2026-02-01" in out
    _, out, _ = _run(["catalog", "show", "claude-opus-4-8", "--at", "2026-12-01"], capsys)
    assert "fast: fast mode retired (requests error)" in out and "window: from 2026-05-28 to 2026-12-01, then error" in out
    status, _, err = _run(["catalog", "show", "claude-opus-9"], capsys)
    assert status == 2 and "unknown model 'claude-opus-9'" in err
    status, _, err = _run(["catalog", "show", "--platform", "azure"], capsys)
    assert status == 2 and "unknown platform 'azure'" in err


def test_show_without_a_model_lists_every_model(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(["catalog", "show", "--format", "json"], capsys)
    ids = [d["id"] for d in json.loads(out)]
    assert status == 0 and {"claude-opus-5-5", "claude-fable-5-2", "claude-sonnet-4-6"} <= set(ids)


def test_check_validates_a_user_catalog(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("version: 2\nproviders:\n  anthropic:\n    models:\n      claude-opus-5-5:\n        fast:\n"
                    "          supported: true\n          pricing: {multiplier: 3, as_of: 2026-12-02, source: our contract}\n")
    status, out, _ = _run(["catalog", "check", str(good)], capsys)
    assert status == 0 and "ok" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 2\nproviders:\n  anthropic:\n    models:\n      mine:\n        standard:\n"
                   "          tiers: [{above_input_tokens: 0, input: 3, output: 15}]\n")
    status, _, err = _run(["catalog", "check", str(bad)], capsys)
    assert status == 1 and f"{bad}:7:11: error[PE224]" in err and "hint:" in err
    status, _, err = _run(["catalog", "check", str(tmp_path / "missing.yaml")], capsys)
    assert status == 2 and "cannot read catalog" in err


def test_diff_lists_changes_and_replays_their_cost(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dearer = tmp_path / "dearer.yaml"
    dearer.write_text("version: 2\nproviders:\n  anthropic:\n    models:\n      claude-opus-5-5:\n        fast:\n"
                      "          supported: true\n          pricing: {multiplier: 3, as_of: 2026-12-02, source: our contract}\n"
                      "      claude-opus-5:\n        fast: {supported: false, source: gone}\n")
    argv = ["catalog", "diff", "packaged", str(dearer), "--requests", str(SAMPLE), "--policy",
            str(ROOT / "policies" / "default.yaml")]
    status, out, _ = _run([*argv, "--format", "json"], capsys)
    assert status == 0
    data = json.loads(out)
    figures = {(c["model"], c["figure"]): (c["old"], c["new"]) for c in data["changes"]}
    assert figures[("claude-opus-5-5", "fast price")] == ("$8/$40", "$12/$60")
    assert figures[("claude-opus-5", "fast")] == ("available", "unsupported")
    replay = data["replay"]
    assert replay["lines"] == 10_000 and replay["cost_change_micro"] != 0
    assert replay["new_fast"] < replay["old_fast"]  # Opus 5 lost fast mode
    status, out, _ = _run(argv, capsys)
    assert status == 0 and "claude-opus-5-5: fast price: $8/$40 -> $12/$60" in out and "replay of" in out


def test_the_readme_carries_the_generated_catalog_tables() -> None:
    from policy_engine.catalog import load_catalog
    from policy_engine.cli.catalog import reference_markdown

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- catalog:start -->", "<!-- catalog:end -->"
    assert readme.split(start, 1)[1].split(end, 1)[0].strip("\n") == reference_markdown(load_catalog()).strip("\n"), (
        "README.md's catalog tables are stale: paste `policy-engine catalog show --format markdown` between the markers")
    rows = reference_markdown(load_catalog()).splitlines()
    priced = [r for r in rows if "per MTok" in r or "fast price" in r]
    kinds = [r.split(" | ")[4].strip(" |") for r in priced]  # the kind column, before any conflict note
    assert priced and all(k.startswith(("primary", "secondary", "unverified", "assumption", "—")) for k in kinds), kinds


def test_the_readme_override_example_loads(tmp_path: Path) -> None:
    from policy_engine.catalog import load_catalog

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("**Overriding.**", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "prices.yaml"
    path.write_text(example)
    catalog = load_catalog(path)
    assert catalog.model("claude-opus-5-5", platform="foundry").fast_model_id == "opus-55-fast-eastus"
    assert catalog.model("claude-fable-5-2", platform="vertex").rates("standard", 10).input == 8_000_000
