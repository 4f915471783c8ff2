"""The store as the app reads it, and one chat engine per model and kind of vectors.

``Catalog.store()`` opens the persona store read-only on first use (it follows other writers).
``Catalog.engine(model_id, positions)`` builds a ``ChatEngine`` over the model's registered
vectors read from ``positions`` (the preferred kind when empty) and its neuron sets, and builds it
again when the store's catalog of that model changed. ``refresh()`` drops the engines so personas
registered (or removed) by a script show up without a restart. The engines come from the app's
``Serving`` (``personachat.app.serving``): by default every engine over one model shares its
scheduler.

An engine holds one version of the catalog: when another process writes while the vectors are
read, they are read again. A vector or neuron set whose file is missing or damaged is left out
of the engine alone: ``problems`` names each one and how to repair it, and everything else keeps
working.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from personachat.app.models import ModelCache, folder
from personachat.app.serving import Serving

log = logging.getLogger(__name__)

READS = 3  # reads of a model's vectors while other processes keep writing, before giving up
REPAIR = "repair the store with `python scripts/store.py verify --repair`, or register it again"

# Which vectors steer by default: on the demo model, vectors read from the question span steered
# where reply-average ones did not.
PREFERRED_POSITIONS = ("question_span", "prompt_last", "response_avg", "prompt_avg")


class Catalog:
    """The read-only store and the chat engines built from it, shared by every session."""

    def __init__(
        self,
        models: ModelCache,
        store_path: Path,
        lock: threading.RLock,
        serving: Serving | None = None,
    ) -> None:
        self.models = models
        self.serving = serving or Serving()
        self.store_path = store_path
        self._lock = lock
        self._store: Any = None
        # (model id, positions kind) -> (catalog signature, ChatEngine)
        self._engines: dict[tuple[str, str], tuple[Any, Any]] = {}
        # (model id, positions kind) -> what was left out of its engine, in words
        self._problems: dict[tuple[str, str], list[str]] = {}
        models.on_drop(self._forget)

    def store(self) -> Any:
        """The persona store, read-only (opened on first use; it follows other writers)."""
        with self._lock:
            if self._store is None:
                from personachat.store import Store

                self._store = Store(self.store_path, read_only=True)
            return self._store

    def engine(self, model_id: str, positions: str = "") -> Any:
        """The chat engine of ``model_id`` over its registered vectors read from ``positions``
        (the preferred kind when empty) and its neuron sets; rebuilt when the catalog changed."""
        with self._lock:
            lm = self.models.get(model_id)
            store_id = self.store_id(model_id)
            kind = self._kind(store_id, positions)
            key = (model_id, kind)
            signature = self.signature(store_id, kind)
            cached = self._engines.get(key)
            if cached is None or cached[0] != signature:
                signature, vectors, sets, problems = self._read(store_id, kind, lm, signature)
                engine = self.serving.engine(model_id, lm, vectors, sets)
                self._engines[key] = (signature, engine)
                self._problems[key] = problems
            return self._engines[key][1]

    def _read(
        self, store_id: str, kind: str, lm: Any, signature: tuple[Any, ...]
    ) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, Any], list[str]]:
        """The model's vectors of ``kind`` and neuron sets, all from one version of the
        catalog: read again (up to ``READS`` times) while another process writes under the
        reading. Returns (the signature read under, vectors, neuron sets, problems); a
        signature the catalog already left makes the next ``engine`` call read again."""
        for attempt in range(READS):
            problems: list[str] = []
            vectors = self._vectors(store_id, kind, lm.info.hidden_size, problems)
            sets = self._neuron_sets(store_id, problems)
            now = self.signature(store_id, kind)
            if now == signature or attempt == READS - 1:
                break
            log.info("the store changed while %s was read; reading it again", store_id)
            signature = now
        return signature, vectors, sets, problems

    def problems(self, model_id: str, positions: str = "") -> list[str]:
        """What the engine of ``model_id`` (vectors read from ``positions``) left out: each
        vector or neuron set that could not be read, why, and how to repair it."""
        with self._lock:
            self.engine(model_id, positions)
            kind = self._kind(self.store_id(model_id), positions)
            return list(self._problems.get((model_id, kind), []))

    def refresh(self) -> None:
        """Re-read the store now (it also re-reads by itself when another process wrote)."""
        with self._lock:
            self._engines.clear()
            if self._store is not None:
                self._store.refresh(force=True)

    def close(self) -> None:
        """Close the store connection (models stay loaded)."""
        with self._lock:
            self._engines.clear()
            if self._store is not None:
                self._store.close()
                self._store = None

    def store_id(self, model_id: str) -> str:
        """The id the store files ``model_id`` under: the loaded id, or a stored id naming the
        same folder (``store/models/demo`` vs its absolute path)."""
        own = str(self.models.get(model_id).info.model_id)
        stored = [m.model_id for m in self.store().models()]
        if own in stored:
            return own
        target = folder(own)
        for other in stored:
            if target is not None and folder(other) == target:
                return str(other)
        return own

    def vector_kinds(self, model_id: str) -> list[str]:
        """The positions kinds this model has vectors for, preferred first."""
        have = {e.positions for e in self.store().vectors(self.store_id(model_id))}
        return [k for k in PREFERRED_POSITIONS if k in have] + sorted(
            have - set(PREFERRED_POSITIONS)
        )

    def signature(self, store_id: str, kind: str) -> tuple[Any, ...]:
        """What identifies the model's catalog: its vectors of ``kind`` (every kind when empty)
        with their hashes, and its neuron sets."""
        store = self.store()
        vectors = tuple(
            (e.vector_id, e.sha256) for e in store.vectors(store_id, positions=kind or None)
        )
        return vectors, tuple(e.set_id for e in store.neuron_sets(store_id))

    def _kind(self, store_id: str, positions: str) -> str:
        have = {e.positions for e in self.store().vectors(store_id)}
        if positions:
            if have and positions not in have:
                raise ValueError(
                    f"no vectors read from {positions!r} for {store_id}; stored kinds: "
                    f"{', '.join(sorted(have))}"
                )
            return positions
        return next((k for k in PREFERRED_POSITIONS if k in have), sorted(have)[0] if have else "")

    def _vectors(
        self, store_id: str, kind: str, hidden_size: int, problems: list[str]
    ) -> dict[str, Any]:
        """The model's vectors of ``kind``; those that cannot be read go to ``problems``."""
        store = self.store()
        names = dict.fromkeys(e.persona for e in store.vectors(store_id, positions=kind or None))
        vectors = {}
        for name in names:
            what = f"the {kind} vector of {name!r}" if kind else f"the vector of {name!r}"
            try:
                vectors[name] = store.load_vector(
                    store_id, name, positions=kind or None, hidden_size=hidden_size
                )
            except Exception as err:
                problems.append(_left_out(what, err))
        return vectors

    def _neuron_sets(self, store_id: str, problems: list[str]) -> dict[str, Any]:
        """The model's neuron sets; those that cannot be read go to ``problems``."""
        store = self.store()
        sets = {}
        for entry in store.neuron_sets(store_id):
            try:
                sets[entry.label] = store.load_neurons(store_id, entry.label)
            except Exception as err:
                problems.append(_left_out(f"the neuron set {entry.label!r}", err))
        return sets

    def _forget(self, model_id: str) -> None:
        """Drop the engines built on ``model_id`` (the model itself was dropped)."""
        with self._lock:
            for key in [k for k in self._engines if k[0] == model_id]:
                self._engines.pop(key)
            self.serving.forget(model_id)


def _left_out(what: str, err: Exception) -> str:
    """Why ``what`` is not offered, and what to do: gone (another process removed it while it
    was read) or damaged (its file is missing or does not match the catalog)."""
    from personachat.store import IntegrityError, UnknownError
    from personachat.store.errors import MissingFileError

    log.warning("left out %s: %s", what, err)
    if isinstance(err, UnknownError):
        return f"{what} was removed from the store while it was read; re-read the store."
    if isinstance(err, MissingFileError):
        reason = "its file is missing"
    elif isinstance(err, IntegrityError):
        reason = "its file does not match the catalog (changed or damaged)"
    else:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"{what} is disabled: {reason}. To use it, {REPAIR}."
