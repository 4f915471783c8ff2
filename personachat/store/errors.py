"""The store's errors: each message says what is wrong and what to do."""

from __future__ import annotations


class StoreError(RuntimeError):
    """Something about the store is wrong; the message says what and what to do."""


class StoreLockedError(StoreError):
    """Another process held the catalog lock for longer than ``lock_timeout``."""


class IntegrityError(StoreError):
    """A file does not match its catalog row (checksum, shape or missing)."""


class UnknownError(StoreError, LookupError):
    """A model, persona, vector or neuron set is not in the store; the message lists what is."""
