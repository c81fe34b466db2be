"""README's compatibility table names the tests that cover each row: each must exist, with the
parametrization it names, so the table cannot promise coverage that was renamed or removed."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTION = re.compile(r"^## Compatibility\n(.*?)^## ", re.S | re.M)
TEST_ID = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[([^\]]+)\])?`")


def named_tests(readme: str) -> list[tuple[str, str, str | None]]:
    found = SECTION.search(readme)
    assert found, "README has no Compatibility section"
    return [m.groups() for line in found.group(1).splitlines() for m in TEST_ID.finditer(line)]


def _functions(path: Path) -> dict[str, ast.FunctionDef]:
    tree = ast.parse(path.read_text())
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}


def _ids(function: ast.FunctionDef) -> str:
    """The source of the function's decorators: where its parametrization ids come from."""
    return " ".join(ast.unparse(d) for d in function.decorator_list)


def test_the_table_names_tests_at_all() -> None:
    assert len(named_tests((ROOT / "README.md").read_text())) >= 25


@pytest.mark.parametrize(("path", "name", "params"), named_tests((ROOT / "README.md").read_text()))
def test_every_test_the_table_names_exists(path: str, name: str, params: str | None) -> None:
    functions = _functions(ROOT / path)
    assert name in functions, f"{path} has no {name}"
    for part in (params or "").replace("*", "").split("-"):
        assert part in _ids(functions[name]), f"{name} is not parametrized with {part!r}"


def test_the_check_catches_a_renamed_test() -> None:
    bogus = "## Compatibility\n| x | y | `tests/test_canvas.py::test_no_such_thing` |\n## Next\n"
    [(path, name, _)] = named_tests(bogus)
    assert name not in _functions(ROOT / path)
