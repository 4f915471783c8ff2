"""The package's public names resolve, and importing it stays cheap."""

from __future__ import annotations

import subprocess
import sys

import pytest

import personachat


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
