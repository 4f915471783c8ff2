"""The persona store: a DuckDB catalog plus safetensors files, crash-safe and queryable."""

from __future__ import annotations

from personachat.store.errors import (
    IntegrityError,
    QueryRefusedError,
    StoreError,
    StoreLockedError,
    UnknownError,
)
from personachat.store.files import default_store_root, model_slug
from personachat.store.schema import SCHEMA_VERSION, MeansEntry, NeuronSetEntry, VectorEntry
from personachat.store.store import Store
from personachat.store.tensorfile import read_safetensors_metadata

__all__ = [
    "SCHEMA_VERSION",
    "IntegrityError",
    "MeansEntry",
    "NeuronSetEntry",
    "QueryRefusedError",
    "Store",
    "StoreError",
    "StoreLockedError",
    "UnknownError",
    "VectorEntry",
    "default_store_root",
    "model_slug",
    "read_safetensors_metadata",
]
