"""Load a command as a module, to call its functions in-process: a script of ``scripts/`` or
the module behind an installed command (``personachat.cli``)."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS_DIR = Path(__file__).resolve().parent.parent / "scripts"


@functools.cache
def load_script(name: str) -> ModuleType:
    """``scripts/{name}.py`` imported once as ``script_{name}``."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def cli_module(name: str) -> ModuleType:
    """``personachat.cli.{name}``: the code behind ``scripts/{name}.py`` and its console script."""
    return importlib.import_module(f"personachat.cli.{name}")
