"""The README and the scripts document themselves truthfully."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SCRIPTS = sorted(p for p in (ROOT / "scripts").glob("*.py") if not p.name.startswith("bench_"))


def test_space_front_matter() -> None:
    front = README.split("---")[1]
    for line in ("sdk: gradio", "app_file: app.py", 'python_version: "3.11"', "title:"):
        assert line in front
    assert "short_description:" in front


def test_first_screen_has_the_two_commands() -> None:
    first_screen = README[: README.index("## ")]
    assert "pip install -r requirements.txt && python app.py" in first_screen
    assert "pip install -r requirements.txt && pytest" in first_screen


def test_ci_runs_the_readme_test_command() -> None:
    assert "pip install -r requirements.txt -q && pytest" in (ROOT / ".ci" / "run").read_text()


def test_file_tree_lists_every_module_and_script() -> None:
    files = README[README.index("## Files") :]
    tree = files.split("```")[1]  # the first code block: one line per file
    package = ROOT / "personachat"
    modules = [
        p.relative_to(package).as_posix()
        for p in package.rglob("*.py")
        if "__pycache__" not in p.parts and p.relative_to(package).as_posix() != "__init__.py"
    ]
    scripts = [p.name for p in (ROOT / "scripts").glob("*.py")]
    missing = [n for n in modules + scripts if not re.search(rf"(?<![\w/]){re.escape(n)}\b", tree)]
    assert not missing, f"README file tree misses {missing}"
    listed = set(re.findall(r"(?<![\w/])((?:\w+/)?\w+\.py)\b", tree))
    known = [*modules, *scripts, "app.py", "__init__.py"]
    stale = sorted(n for n in listed if n not in known)
    assert not stale, f"README file tree lists files that do not exist: {stale}"


def test_every_module_has_a_docstring() -> None:
    for path in [*(ROOT / "personachat").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]:
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc, f"{path.relative_to(ROOT)} has no module docstring"


@pytest.mark.slow
def test_scripts_docstring_gives_the_command_and_help_works() -> None:
    procs = {}
    for script in SCRIPTS:
        doc = ast.get_docstring(ast.parse(script.read_text())) or ""
        assert f"python scripts/{script.name}" in doc, f"{script.name}: no exact command"
        procs[script.name] = subprocess.Popen(
            [sys.executable, str(script), "--help"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{name} --help failed: {err[-500:]}"
        assert "usage:" in out and len(out.splitlines()) > 3, f"{name} --help says too little"


def test_top_level_is_as_the_product_owner_asked() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    if not tracked:  # not a git checkout (an unpacked archive): nothing to compare
        return
    top = {path.split("/")[0] for path in tracked}
    allowed = {"app.py", "personachat", "store", "scripts", "tests", "requirements.txt"}
    allowed |= {"README.md", ".ci", "pyproject.toml", ".gitignore"}
    assert top <= allowed, f"unexpected top-level entries: {sorted(top - allowed)}"
