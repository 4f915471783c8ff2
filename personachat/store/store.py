"""The persona store's facade: catalog, tensor files and registries.

Layout under the store root (``default_store_root()``: ``$PERSONACHAT_STORE`` or ``<repo>/store``)::

    catalog.duckdb                      the catalog (tables: schema.py), plain SQL, public
    generation                          replaced after every write: the change marker
    .staging/                           files on their way in, journals of writes (staging.py)
    vectors/<model>/<persona>.<positions>.<method>.<baseline>.<token>.safetensors
    means/<model>/<persona>.<positions>.<token>.safetensors

Usage::

    with Store() as store:                      # writable: opens, migrates, recovers, closes
        store.register_model(loaded.info)
        store.register_vectors(vectors, means, personas)  # one transaction per batch
    app_store = Store(read_only=True)            # the app: never blocks writers for long
    vec = app_store.load_vector(model_id, "pirate")  # sha256 and shape verified

``Store`` is a facade over small parts, one job each:

* ``catalog.py``: no ``Store`` keeps the catalog file open (DuckDB lets no other process open a
  file held for writing). Reads go to an in-memory snapshot, re-copied when another process
  wrote, so a long-lived reader (the app) picks up new personas without a restart and holds the
  file lock only while copying; hot lookups (``vectors(model, persona)``, ``model()``) are dict
  gets. Writes attach the file, run one transaction, move the change marker and detach; a busy
  lock is retried for ``lock_timeout`` seconds, then ``StoreLockedError`` names the process.
* ``files.py`` and ``staging.py``: crash safety (proved by ``tests/test_store_crash.py`` with
  SIGKILL): tensors are staged under ``.staging`` and fsynced before the lock is taken,
  journaled, renamed and committed under it, so a crash leaves at worst files no row names,
  under ``.staging`` or listed in a journal there (``leftovers()``), never a row without its
  file; the next writable open or write of tensors deletes them. A reader sees each batch whole
  or not at all, and re-reads from a fresh snapshot when a concurrent write deleted the file of
  a row it had just looked up. Loading re-hashes the file and checks its shape against the
  catalog, the model and the caller's ``hidden_size``; a mismatch names the file and both values.
* ``schema.py`` (tables, migrations), ``tensorfile.py`` (the safetensors layout), ``prepare.py``
  (checks before a write), and the registries: ``model_registry.py`` (models, personas),
  ``vector_registry.py`` (vectors, means), ``neuron_registry.py`` (neuron sets).
* SQL is parameterised; ``sql()`` runs one user SELECT on the in-memory snapshot, sandboxed
  (``sandbox.py``): no writes, no files outside the catalog, no network, bounded time and rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from personachat.records import ModelInfo, NeuronSet, Persona, PersonaMeans, PersonaVector
from personachat.store.catalog import CATALOG_FILE, Catalog, tensor_files
from personachat.store.files import TensorFiles, default_store_root
from personachat.store.model_registry import ModelRegistry
from personachat.store.neuron_registry import NeuronRegistry
from personachat.store.sandbox import SQL_MAX_ROWS, SQL_TIMEOUT
from personachat.store.schema import MeansEntry, NeuronSetEntry, VectorEntry, migrate
from personachat.store.vector_registry import VectorRegistry


class Store:
    """A persona store at ``root``; see the module docstring. Thread-safe; a context manager."""

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        read_only: bool = False,
        lock_timeout: float = 10.0,
    ) -> None:
        self.root = Path(root) if root is not None else default_store_root()
        self.read_only = read_only
        self.lock_timeout = lock_timeout
        self.catalog = self.root / CATALOG_FILE
        self._catalog = Catalog(self.root, read_only=read_only, lock_timeout=lock_timeout)
        self._files = TensorFiles(self.root)
        self._models = ModelRegistry(self._catalog)
        self._vectors = VectorRegistry(self._catalog, self._files, self._models)
        self._neurons = NeuronRegistry(self._catalog, self._models)
        if not read_only:
            self.root.mkdir(parents=True, exist_ok=True)
            with self._catalog.writing(mark=False) as conn:  # a current store stays as it is
                if migrate(conn, self.catalog, self.root):
                    self._catalog.mark_changed()
                self._files.recover(tensor_files(conn))

    # context manager / lifecycle
    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._catalog.close()

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else "writable"
        return f"Store({str(self.root)!r}, {mode})"

    def refresh(self, *, force: bool = False) -> None:
        """Re-read the catalog if another process changed it (reads call this themselves)."""
        self._catalog.refresh(force=force)

    # --- models and personas -------------------------------------------------------------------

    def register_model(self, info: ModelInfo) -> None:
        """Add or update a model. Changing the shape of a model that has tensors is refused."""
        self._models.register_model(info)

    def models(self) -> list[ModelInfo]:
        return self._models.models()

    def model(self, model_id: str) -> ModelInfo:
        """The registered model, or UnknownError listing the known ones."""
        return self._models.model(model_id)

    def register_personas(self, personas: Iterable[Persona]) -> None:
        """Add or update personas (by name), in one transaction."""
        self._models.register_personas(personas)

    def personas(self, model_id: str | None = None) -> list[Persona]:
        """All personas, or those with a vector or means for ``model_id``."""
        return self._models.personas(model_id)

    def persona(self, name: str) -> Persona:
        return self._models.persona(name)

    # --- vectors and means ---------------------------------------------------------------------

    def register_vectors(
        self,
        vectors: Iterable[PersonaVector],
        means: Iterable[PersonaMeans] = (),
        personas: Iterable[Persona] = (),
        *,
        model: ModelInfo | None = None,
    ) -> list[int]:
        """Store vectors (and raw means, and the personas they belong to) atomically in one
        transaction; returns the vector ids. Readers see the whole batch or none of it.
        ``model`` is registered (as ``register_model``) in the same transaction: a model new to
        the store and its first vectors land together, and a refused batch leaves no model row.

        A vector with the same (model, persona, method, positions, baseline) as a stored one
        replaces it; so do means with the same (model, persona, positions), and personas with
        the same name. Personas not given and not yet registered get a row with an empty
        system prompt.
        """
        return self._vectors.register(vectors, means, personas, model)

    def vectors(
        self,
        model_id: str | None = None,
        persona: str | None = None,
        *,
        method: str | None = None,
        positions: str | None = None,
        baseline: str | None = None,
    ) -> list[VectorEntry]:
        """Catalog rows of the stored vectors matching the given filters, newest first."""
        return self._vectors.vectors(
            model_id, persona, method=method, positions=positions, baseline=baseline
        )

    def layer_metrics(self, vector_id: int) -> list[tuple[Any, ...]]:
        """(layer, auc, separation, norm, resid_norm) rows of one vector."""
        return self._vectors.layer_metrics(vector_id)

    def means(self, model_id: str | None = None, persona: str | None = None) -> list[MeansEntry]:
        return self._vectors.means(model_id, persona)

    def load_vector(
        self,
        model_id: str,
        persona: str,
        *,
        positions: str | None = None,
        method: str | None = None,
        baseline: str | None = None,
        hidden_size: int | None = None,
    ) -> PersonaVector:
        """Load one vector (the newest if several match), verifying sha256 and shape."""
        filters = {"positions": positions, "method": method, "baseline": baseline}
        return self._vectors.load_vector(model_id, persona, filters, hidden_size)

    def load_means(
        self, model_id: str, persona: str, *, positions: str = "response_avg"
    ) -> PersonaMeans:
        """Load the raw per-layer mean activations of a persona, verifying sha256 and shape."""
        return self._vectors.load_means(model_id, persona, positions)

    def remove_vector(
        self,
        model_id: str,
        persona: str,
        *,
        method: str | None = None,
        positions: str | None = None,
        baseline: str | None = None,
    ) -> int:
        """Remove matching vectors (all if no filter); returns how many. Files go after commit."""
        filters = {"method": method, "positions": positions, "baseline": baseline}
        return self._vectors.remove_vector(model_id, persona, filters)

    def remove_persona(self, name: str, model_id: str | None = None) -> int:
        """Remove a persona's vectors and means (for one model, or everywhere together with the
        persona row); returns the number of vectors and means removed."""
        return self._vectors.remove_persona(name, model_id)

    # --- neuron sets ---------------------------------------------------------------------------

    def register_neurons(
        self, sets: Iterable[NeuronSet], *, model: ModelInfo | None = None
    ) -> list[int]:
        """Store neuron sets in one transaction (same (model, label) replaces); returns set ids.
        ``model`` is registered (as ``register_model``) in the same transaction."""
        return self._neurons.register(sets, model)

    def neuron_sets(self, model_id: str | None = None) -> list[NeuronSetEntry]:
        return self._neurons.neuron_sets(model_id)

    def load_neurons(self, model_id: str, label: str) -> NeuronSet:
        return self._neurons.load(model_id, label)

    def remove_neurons(self, model_id: str, label: str) -> None:
        self._neurons.remove(model_id, label)

    # --- user SQL and checks -------------------------------------------------------------------

    def query(
        self,
        query: str,
        params: Sequence[Any] = (),
        *,
        timeout: float = SQL_TIMEOUT,
        max_rows: int = SQL_MAX_ROWS,
    ) -> tuple[list[str], list[tuple]]:
        """Run one read-only SELECT (or EXPLAIN) on the catalog's tables; returns (column names,
        rows). It runs sandboxed on the in-memory snapshot: anything else (writes, files,
        ATTACH, extensions, SET), a query running past ``timeout`` seconds or returning more
        than ``max_rows`` rows raises ``QueryRefusedError``."""
        return self._catalog.query(query, params, timeout=timeout, max_rows=max_rows)

    def sql(
        self,
        query: str,
        params: Sequence[Any] = (),
        *,
        timeout: float = SQL_TIMEOUT,
        max_rows: int = SQL_MAX_ROWS,
    ) -> list[tuple]:
        """Rows of one read-only query on the catalog (see ``query``)."""
        return self.query(query, params, timeout=timeout, max_rows=max_rows)[1]

    def verify(self) -> list[str]:
        """Problems found: rows whose file is missing or altered, and files no row references
        (except those a write in flight or an interrupted one journaled: see ``leftovers``)."""
        for _ in range(3):  # a write that lands during the check can make it see both states
            self._catalog.refresh()
            rows = [(e.file, e.sha256) for e in self.vectors()] + [
                (e.file, e.sha256) for e in self.means()
            ]
            problems = self._files.verify(rows)
            if not problems or not self._catalog.changed():
                break
        return problems

    def repair(self) -> list[str]:
        """Remove the rows whose file is missing or altered (their vectors can then be
        registered again) and the files no row or journal references; returns what went, in
        words. Writable stores only."""
        done = [f"removed the row of damaged file {f}" for f in self._vectors.remove_damaged()]
        for problem in self.verify():
            if problem.startswith("unreferenced file "):
                Path(problem.removeprefix("unreferenced file ")).unlink(missing_ok=True)
                done.append(f"deleted {problem}")
        return done

    def leftovers(self) -> list[str]:
        """Files an interrupted (killed) write left, relative to the root: its staged files and
        journal under ``.staging``, and the files its journal lists that no row references. No
        reader loads them and ``verify`` does not count them as problems; the next writable
        ``Store`` to open, or the next write of vectors or means, deletes them."""
        referenced = {e.file for e in self.vectors()} | {e.file for e in self.means()}
        return self._files.leftovers(referenced)
