"""T16: no regular expression in the code can be made to backtrack catastrophically.

Every pattern in engine/ and server/ (re.* calls and `*PATTERN*` constants, found by parsing the
source) is checked for the shape that backtracks exponentially: a repeat inside a repeat (star height
above one). Each is then run on long adversarial inputs; the time is printed, not asserted.
Stop strings are matched with str.find (engine/tokenizer.py), never compiled into regexes.
"""

from __future__ import annotations

import ast
import re
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RE_FUNCTIONS = {"compile", "match", "fullmatch", "search", "sub", "subn", "split", "findall", "finditer"}
_REPEATS = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}


def patterns_in_source() -> list[tuple[str, str]]:
    """(where, pattern) for every literal pattern in engine/ and server/."""
    found = []
    for path in sorted([*REPO.glob("engine/**/*.py"), *REPO.glob("server/**/*.py")]):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "re"
                and node.func.attr in RE_FUNCTIONS
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                found.append((where, node.args[0].value))
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
                if any("PATTERN" in name for name in names) and isinstance(node.value.value, str):
                    found.append((where, node.value.value))
    return found


def star_height(parsed: object) -> int:
    """The deepest nesting of repeats in a parsed pattern (re._parser's tree)."""
    height = 0
    for op, value in parsed:  # type: ignore[attr-defined]
        name = str(op)
        if name in _REPEATS:
            _, max_count, sub = value
            inner = star_height(sub)
            height = max(height, inner + (1 if max_count > 1 else 0))
        elif name in {"SUBPATTERN", "ATOMIC_GROUP", "ASSERT", "ASSERT_NOT"}:
            height = max(height, star_height(value[-1]))
        elif name == "BRANCH":
            height = max(height, *(star_height(branch) for branch in value[1]))
    return height


def test_the_scan_finds_patterns_and_the_check_can_fail() -> None:
    assert patterns_in_source(), "no pattern found: the scan is broken"
    parse = re._parser.parse  # type: ignore[attr-defined]
    assert star_height(parse(r"(a+)+$")) == 2 and star_height(parse(r"(\w|\d)*x")) == 1


@pytest.mark.parametrize(("where", "pattern"), patterns_in_source())
def test_no_pattern_nests_repeats(where: str, pattern: str) -> None:
    height = star_height(re._parser.parse(pattern))  # type: ignore[attr-defined]
    assert height <= 1, f"{where}: {pattern!r} nests repeats (star height {height})"
    compiled = re.compile(pattern)
    worst = 0.0
    for attack in ("a" * 20_000 + "!", "layers." + "1" * 20_000, "_" * 20_000 + "\x00", "." * 20_000):
        started = time.perf_counter()
        compiled.search(attack)
        worst = max(worst, time.perf_counter() - started)
    print(f"\nT16 {where}: star height {height}, worst of 4 attacks of 20k chars {1000 * worst:.1f} ms")
