"""The package reads as the data flows: every import runs down the flow, no file cycle, small parts.

Sizes are counted on the syntax tree (a definition's first to last line, docstring included).
``python -m tests.test_layout`` prints the tree with its line counts.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "personachat"

# The stages of the data flow, first to last: a module may import from its own stage's
# subpackage and from earlier stages only. Names on one line are siblings that do not import
# each other.
FLOW: tuple[tuple[str, ...], ...] = (
    ("records",),
    ("prompts",),
    ("model",),
    ("hooks",),
    ("activations",),
    ("vectors", "neurons"),
    ("store",),
    ("interventions",),
    ("chat",),
    ("pipeline",),
    ("analysis",),
    ("cli", "app"),
)
STAGE = {name: i for i, names in enumerate(FLOW) for name in names}

MAX_MODULE = 500
MAX_CLASS = 400
MAX_FUNCTION = 60
# A declarative page layout, one builder per panel, may be longer.
MAX_PANEL_BUILDER = 100


def package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def top(module: str) -> str | None:
    """The subpackage (or top module) of ``personachat.x.y``: ``x``; None for the package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(line, module, names) of every personachat import in ``path``, at any depth."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "personachat" or node.module.startswith("personachat."):
                yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("personachat."):
                    yield node.lineno, alias.name, []


def known_modules() -> set[str]:
    return {module_name(p) for p in package_files()}


def targets(module: str, names: list[str], known: set[str]) -> list[str]:
    """The files an import reaches: a submodule named in ``from pkg import sub``, else the
    module itself."""
    out = [f"{module}.{n}" for n in names if f"{module}.{n}" in known]
    if len(out) < len(names) or not names:
        out.append(module)
    return out


def test_every_import_runs_down_the_flow() -> None:
    wrong = []
    for path in package_files():
        here = module_name(path)
        mine = top(here)
        if mine is None:
            continue  # the package's lazy front door names everything
        assert mine in STAGE, f"{here}: subpackage {mine!r} has no place in FLOW"
        for line, module, _ in imports(path):
            theirs = top(module)
            if theirs is None or theirs == mine:
                continue
            if STAGE.get(theirs, -1) >= STAGE[mine]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({mine}) imports {module}")
    assert not wrong, "imports that run back up the flow:\n" + "\n".join(wrong)


def test_no_import_cycle_between_files() -> None:
    known = known_modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for path in package_files():
        here = module_name(path)
        for _, module, names in imports(path):
            for target in targets(module, names, known):
                if target in known and target != here and target != "personachat":
                    graph[here].add(target)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


@dataclass(frozen=True)
class Size:
    where: str
    kind: str
    name: str
    lines: int
    limit: int


def sizes(path: Path) -> Iterator[Size]:
    text = path.read_text()
    rel = str(path.relative_to(ROOT))
    yield Size(rel, "module", path.name, len(text.splitlines()), MAX_MODULE)
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            yield Size(rel, "class", node.name, n, MAX_CLASS)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            panel = node.name.endswith("_panel") and "personachat/app/" in rel
            yield Size(rel, "function", node.name, n, MAX_PANEL_BUILDER if panel else MAX_FUNCTION)


def checked_files() -> list[Path]:
    return [*package_files(), *sorted((ROOT / "scripts").glob("*.py")), ROOT / "app.py"]


def test_modules_classes_and_functions_stay_small() -> None:
    over = [s for path in checked_files() for s in sizes(path) if s.lines > s.limit]
    lines = [f"{s.where}: {s.kind} {s.name} has {s.lines} lines (bound {s.limit})" for s in over]
    assert not over, "too long to read in one sitting:\n" + "\n".join(lines)


def test_every_subpackage_says_its_job_in_one_line() -> None:
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        first = doc.split("\n")[0]
        assert first.endswith("."), f"{init.relative_to(ROOT)}: no one-line docstring"


def tree() -> str:
    """The package and scripts with their line counts, one line per file."""
    rows = []
    for path in checked_files():
        n = len(path.read_text().splitlines())
        rows.append(f"{n:6d}  {path.relative_to(ROOT)}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(tree() + "\n")
