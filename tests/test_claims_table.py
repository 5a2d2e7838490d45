"""Every test that tests/README.md's claim table and docs/threat-model.md name exists: a renamed or deleted test cannot leave a claim pinned by nothing."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# `test_file.py::test_name` (tests/README.md) or `tests/test_file.py::test_name` (docs), a parametrized id allowed
REFERENCE = re.compile(r"(?:tests/)?(test_[A-Za-z0-9_]+\.py)::([A-Za-z_][A-Za-z0-9_]*)(?:\[[^\]]*\])?")
DOCUMENTS = ("tests/README.md", "docs/threat-model.md")


def defined_tests(path: Path) -> set[str]:
    """Names of the test functions (module level or in classes) a test file defines."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_named_test_exists(document: str) -> None:
    """Each `file::test` a document names is a function of that file under tests/."""
    text = (ROOT / document).read_text(encoding="utf-8")
    references = REFERENCE.findall(text)
    assert len(references) >= 10, f"{document} names too few tests for this check to mean anything"
    missing = []
    cache: dict[str, set[str]] = {}
    for file_name, test_name in references:
        path = ROOT / "tests" / file_name
        if file_name not in cache:
            cache[file_name] = defined_tests(path) if path.exists() else set()
        if test_name not in cache[file_name]:
            missing.append(f"{file_name}::{test_name}")
    assert not missing, f"{document} names tests that do not exist: {sorted(set(missing))}"
