"""The package's public names resolve, and importing it stays cheap."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import personachat

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", personachat.__all__)
def test_public_names_resolve(name: str) -> None:
    assert getattr(personachat, name) is not None


def test_import_loads_nothing_heavy() -> None:
    heavy = "('torch', 'transformers', 'duckdb', 'gradio')"
    code = f"import sys, personachat; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_name_raises() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        personachat.nope  # noqa: B018


@pytest.mark.slow
def test_import_and_console_scripts_work_from_any_folder(tmp_path: Path) -> None:
    code = "import personachat; print(personachat.Store.__module__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "personachat.store.store"
    for command in ("personachat-store", "personachat-extract", "personachat-app"):
        path = shutil.which(command)
        assert path is not None, f"{command} is not installed: pip install -r requirements.txt"
        done = subprocess.run([path, "--help"], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-500:]


@pytest.mark.slow
def test_the_lazy_public_api_is_typed_for_checkers(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import personachat\n"
        "reveal_type(personachat.Store)\n"
        "reveal_type(personachat.steer)\n"
        "reveal_type(personachat.prompt_spans)\n"
    )
    out = subprocess.run(
        # the project's own cache (CI runs mypy before the tests) makes this a quick check
        [sys.executable, "-m", "mypy", str(probe), "--cache-dir", str(ROOT / ".mypy_cache")],
        cwd=ROOT,  # the project's mypy settings, so its cache applies
        capture_output=True,
        text=True,
    )
    revealed = [line for line in out.stdout.splitlines() if "Revealed type" in line]
    assert len(revealed) == 3, out.stdout[-2000:]
    assert not any('"Any"' in line for line in revealed), revealed
    assert "personachat.store.store.Store" in revealed[0]
