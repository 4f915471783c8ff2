"""The store's errors: each message says what is wrong and what to do."""

from __future__ import annotations

import duckdb


class StoreError(RuntimeError):
    """Something about the store is wrong; the message says what and what to do."""


class StoreLockedError(StoreError):
    """Another process held the catalog lock for longer than ``lock_timeout``."""


class IntegrityError(StoreError):
    """A file does not match its catalog row (checksum, shape or missing)."""


class FormatError(ValueError):
    """A file cannot be imported or exported; the message says why and what to do."""


class MissingFileError(IntegrityError):
    """A catalog row names a file that is not there (a reader retries once the catalog moved)."""


class UnknownError(StoreError, LookupError):
    """A model, persona, vector or neuron set is not in the store; the message lists what is."""


class QueryRefusedError(StoreError, duckdb.Error):
    """User SQL tried more than reading the catalog's tables (or ran too long or too far).

    Also a ``duckdb.Error``, as DuckDB's own refusals of writes were before the sandbox."""
