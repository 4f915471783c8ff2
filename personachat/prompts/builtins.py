"""The built-in persona datasets by name, and ``load_dataset``: a built-in name or a user file.

Built in: the JSON files in ``personachat/prompts/data/`` and ``demo``, the bundled demo model's
planted corpus, built from code by ``personachat.prompts.demo.planted_dataset``.
"""

from __future__ import annotations

import json
from pathlib import Path

from personachat.prompts.datasets import (
    DATA_DIR,
    DatasetError,
    PersonaDataset,
    from_json,
    load_dataset_file,
)
from personachat.prompts.demo import planted_dataset
from personachat.records import NAME_PATTERN

GENERATED_BUILTINS = ("demo",)  # built from code: the demo model's planted corpus


def builtin_names() -> list[str]:
    return sorted([*(p.stem for p in DATA_DIR.glob("*.json")), *GENERATED_BUILTINS])


def load_builtin(name: str) -> PersonaDataset:
    path = DATA_DIR / f"{name}.json"
    if not NAME_PATTERN.fullmatch(name) or not path.is_file():
        raise DatasetError(f"no built-in dataset {name!r}; built-in: {builtin_names()}")
    data = json.loads(path.read_text(encoding="utf-8"))
    return from_json(data, name=name, source=f"builtin:{name}")


def load_dataset(name_or_path: str | Path) -> PersonaDataset:
    """A built-in dataset by name, or a user file (``.json`` / ``.jsonl``)."""
    text = str(name_or_path)
    if text == "demo":
        return planted_dataset()
    if NAME_PATTERN.fullmatch(text) and (DATA_DIR / f"{text}.json").is_file():
        return load_builtin(text)
    if Path(text).suffix in {".json", ".jsonl"} or Path(text).exists():
        return load_dataset_file(text)
    raise DatasetError(
        f"{text!r} is neither a built-in dataset ({builtin_names()}) nor a .json/.jsonl file"
    )
