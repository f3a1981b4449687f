"""The project's Python has no unused imports (pyflakes' UnusedImport). A deliberate one, a re-export or an
import for its side effect, is named in `__all__` or marked `# noqa: F401` with the reason after it."""
import ast
import re
from pathlib import Path

import pytest

# in requirements.txt; a bare interpreter (make gpu-check's) may lack it
checker = pytest.importorskip("pyflakes.checker")
messages = pytest.importorskip("pyflakes.messages")

ROOTS = ("contrastmask_ops", "benchmarks", "model", "tests", "tools")
NOQA_WITH_REASON = re.compile(r"#\s*noqa:\s*F401\b\W*\w")


def unused_imports(path: Path) -> list:
    """'file:line: message' for each unused import of one file not marked `# noqa: F401 <reason>`."""
    source = path.read_text()
    tree = ast.parse(source, str(path))
    lines = source.splitlines()
    # pyflakes names an import statement's first line; its noqa may stand on any line of the statement
    statement_lines = {node.lineno: range(node.lineno, node.end_lineno + 1)
                       for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))}
    found = []
    for message in checker.Checker(tree, filename=str(path)).messages:
        if not isinstance(message, messages.UnusedImport):
            continue
        span = statement_lines.get(message.lineno, range(message.lineno, message.lineno + 1))
        if not any(NOQA_WITH_REASON.search(lines[i - 1]) for i in span):
            found.append(f"{path}:{message.lineno}: {message.message % message.message_args}")
    return found


@pytest.mark.parametrize("root", ROOTS)
def test_no_unused_imports(repo, root):
    files = sorted((repo / root).rglob("*.py"))
    assert files, root
    found = [line for path in files for line in unused_imports(path)]
    assert not found, "\n".join(found)


def test_the_check_sees_an_unused_import(tmp_path):
    module = tmp_path / "module.py"
    module.write_text("import os\nimport sys  # noqa: F401 (re-exported)\nimport re  # noqa: F401\n"
                      "from json import (\n    dumps,  # noqa: F401 (re-exported)\n)\n")
    assert [line.split(": ", 1)[1] for line in unused_imports(module)] == ["'os' imported but unused",
                                                                           "'re' imported but unused"]
