"""Size limits that keep the code readable (issue 18): short modules, short step functions."""

from __future__ import annotations

import ast

from tests.support.paths import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "pipeline"
#: Every module under pipeline/ stays below this many lines.
MAX_MODULE_LINES = 500
#: Every function (methods and nested ones included) in pipeline/steps/ is at most this long.
MAX_STEP_FUNCTION_LINES = 80


def test_every_module_stays_under_the_line_limit() -> None:
    too_long = {str(path.relative_to(PROJECT_ROOT)): lines
                for path in sorted(PACKAGE.rglob("*.py"))
                if (lines := len(path.read_text().splitlines())) >= MAX_MODULE_LINES}
    assert not too_long, f"modules of {MAX_MODULE_LINES} lines or more: {too_long}"


def test_no_step_function_is_longer_than_the_limit() -> None:
    too_long: dict[str, int] = {}
    for path in sorted((PACKAGE / "steps").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = (node.end_lineno or node.lineno) - start + 1
                if lines > MAX_STEP_FUNCTION_LINES:
                    too_long[f"{path.name}:{node.name}"] = lines
    assert not too_long, f"functions over {MAX_STEP_FUNCTION_LINES} lines: {too_long}"
