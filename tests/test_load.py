"""The loader points every problem at file:line:col and never lets a traceback out."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy_engine.errors import PolicyError
from policy_engine.load import MAX_EXPANDED_CHARS, MAX_FILE_BYTES, load_policy, parse_policy, read_yaml

GOOD = """\
version: 1
name: demo
rules:
  - name: opus
    when: request.model == "claude-opus-4-6"
    speed: fast
"""


def problems(tmp_path: Path, text: str | bytes) -> list[tuple[int, int, str, str]]:
    path = tmp_path / "policy.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    for d in info.value.diagnostics:
        assert d.file == str(path)
    assert "Traceback" not in str(info.value)
    return [(d.line, d.col, d.code, d.message) for d in info.value.diagnostics]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def test_good_policy_loads(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(GOOD)
    policy, document = parse_policy(tmp_path / "p.yaml")
    assert policy.name == "demo" and policy.rules[0].speed == "fast"
    assert policy.default == "standard" and policy.on_error == "skip"
    assert document.locate(("rules", 0, "when")) == (5, 11)
    assert document.locate(("rules", 0, "when"), key=True) == (5, 5)


def test_duplicate_key(tmp_path: Path) -> None:
    found = problems(tmp_path, GOOD + "    speed: standard\n")
    assert found == [(7, 5, "PE002", "duplicate key 'speed' (first defined on line 6)")]


def test_unknown_key_with_did_you_mean(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(GOOD + "    resaon: because\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    [d] = info.value.diagnostics
    assert (d.line, d.col, d.code) == (7, 5, "PE010")
    assert d.hint == "did you mean 'reason'?"


def test_wrong_type(tmp_path: Path) -> None:
    text = GOOD + 'budgets:\n  - name: daily\n    window: day\n    limit_usd: "ten"\n'
    [(line, col, code, message)] = problems(tmp_path, text)
    assert (line, col, code) == (10, 16, "PE011")
    assert "budgets[0].limit_usd" in message and "'ten'" in message


def test_missing_rule_name(tmp_path: Path) -> None:
    text = "version: 1\nname: demo\nrules:\n  - when: 'true'\n    speed: fast\n"
    assert problems(tmp_path, text) == [(4, 5, "PE012", "missing required key 'name' in 'rules[0]'")]


def test_two_rules_with_the_same_name(tmp_path: Path) -> None:
    text = GOOD + "  - name: opus\n    when: 'false'\n    speed: standard\n"
    assert problems(tmp_path, text) == [(7, 11, "PE020", "duplicate rule name 'opus' (first used on line 4)")]


def test_yaml_syntax_error(tmp_path: Path) -> None:
    text = "version: 1\nname: demo\nrules:\n  - name: [unclosed\n    speed: fast\n"
    [(line, col, code, message)] = problems(tmp_path, text)
    assert code == "PE001" and message.startswith("YAML syntax error")
    assert (line, col) == (5, 10)


def test_alias_bomb(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 10)}]")
    [(line, col, code, message)] = problems(tmp_path, "\n".join(lines) + "\n")
    assert code == "PE003" and "alias bomb" in message
    assert (line, col) == (5, 1) and message.startswith("'a4' expands")


def test_one_long_string_aliased_into_many_rules(tmp_path: Path) -> None:
    """Few values, but 200 copies of 400 KB: the expanded size is what is limited, at once."""
    big = "x" * 400_000
    rules = "".join(f"  - name: r{i}\n    when: *big\n    speed: fast\n" for i in range(1, 200))
    text = (f"version: 1\nname: demo\nrules:\n  - name: r0\n    when: &big 'request.model != \"{big}\"'\n"
            f"    speed: fast\n{rules}")
    [(line, col, code, message)] = problems(tmp_path, text)
    assert code == "PE003" and (line, col) == (3, 1)
    assert message == f"'rules' expands to more than {MAX_EXPANDED_CHARS:,} characters of text, which looks like an alias bomb"


def test_aliases_within_the_expanded_limit_still_load(tmp_path: Path) -> None:
    text = GOOD + "description: &d " + "y" * 1000 + "\nowner: *d\n"
    policy = load_policy(_write(tmp_path, text))
    assert policy.owner == policy.description == "y" * 1000


def test_recursive_alias(tmp_path: Path) -> None:
    [(_, _, code, message)] = problems(tmp_path, "version: 1\nname: &n [*n]\n")
    assert code == "PE003" and "recursive" in message


def test_not_utf8(tmp_path: Path) -> None:
    text = GOOD.encode() + b"description: caf\xe9\n"
    assert problems(tmp_path, text) == [(7, 17, "PE004", "file is not valid UTF-8: byte 0xe9 cannot be decoded")]


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    assert problems(tmp_path, text) == [(1, 1, "PE005", "file is empty")]


def test_oversized_file(tmp_path: Path) -> None:
    text = GOOD + "description: " + "x" * MAX_FILE_BYTES + "\n"
    [(line, col, code, message)] = problems(tmp_path, text)
    assert (line, col, code) == (1, 1, "PE003") and "limit" in message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    [(line, col, code, _)] = problems(tmp_path, "- just\n- a list\n")
    assert (line, col, code) == (1, 1, "PE011")


def test_every_problem_in_one_pass(tmp_path: Path) -> None:
    text = (
        "version: 2\nname: demo\nrules:\n  - name: a\n    when: x\n    speed: fats\n"
        "  - name: a\n    when: y\n    speed: fast\n    speed: fast\nbogus: 1\n"
    )
    codes = sorted(code for _, _, code, _ in problems(tmp_path, text))
    assert codes == ["PE002", "PE010", "PE011", "PE011", "PE020"]


def test_unknown_timezone_and_bad_duration(tmp_path: Path) -> None:
    text = GOOD + "budgets:\n  - name: d\n    window: day\n    timezone: Mars/Olympus\n    limit_usd: 1\nstickiness:\n  ttl: soon\n"
    found = problems(tmp_path, text)
    assert [(line, code) for line, _, code, _ in found] == [(10, "PE011"), (13, "PE011")]
    assert "Mars/Olympus" in found[0][3] and "duration" in found[1][3]


def test_money_is_decimal_not_float(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(GOOD + "budgets:\n  - name: d\n    window: day\n    limit_usd: 0.1\n")
    policy = load_policy(tmp_path / "p.yaml")
    assert str(policy.budgets[0].limit_usd) == "0.1"


def test_unreadable_file_is_a_diagnostic(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path / "missing.yaml")
    assert info.value.diagnostics[0].code == "PE001"


@pytest.mark.parametrize(
    ("yaml_value", "offset", "expected"),
    [
        ("request.max_tokens > 10", 8, (2, 15)),  # plain scalar: col + offset
        ('"request.max_tokens > 10"', 8, (2, 16)),  # quoted: one more for the quote
        ("|\n  request.model == 'x' &&\n    request.max_tokens > 10", 26, (4, 5)),  # literal block, 2nd line
        (">-\n  request.model == 'x' &&\n  request.max_tokens > 10", 24, (4, 3)),  # folded block
    ],
)
def test_positions_inside_scalars(yaml_value: str, offset: int, expected: tuple[int, int]) -> None:
    text = f"version: 1\nwhen: {yaml_value}\n"
    document = read_yaml("x.yaml", text=text)
    value = document.data["when"]
    assert value[offset] in "rm", value  # the test itself points at 'request'/'max_tokens'
    assert document.locate_in_scalar(("when",), offset) == expected
