"""The persona store: a DuckDB catalog plus safetensors files, crash-safe and queryable."""

from __future__ import annotations

from personachat.store.store import (
    SCHEMA_VERSION,
    IntegrityError,
    MeansEntry,
    NeuronSetEntry,
    Store,
    StoreError,
    StoreLockedError,
    UnknownError,
    VectorEntry,
    default_store_root,
    model_slug,
    read_safetensors_metadata,
)

__all__ = [
    "SCHEMA_VERSION",
    "IntegrityError",
    "MeansEntry",
    "NeuronSetEntry",
    "Store",
    "StoreError",
    "StoreLockedError",
    "UnknownError",
    "VectorEntry",
    "default_store_root",
    "model_slug",
    "read_safetensors_metadata",
]
