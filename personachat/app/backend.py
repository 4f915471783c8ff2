"""What the chat app shares between sessions, behind one facade: models, store, chat engines.

``Backend(default_model, store_path)`` loads nothing when built. The first request for a model
loads it (``ModelCache``: once, under a lock; other sessions wait for the same load) and reads
its persona vectors and neuron sets from the store into a ``ChatEngine`` (``Catalog``).
``refresh()`` drops the cached catalog so personas registered (or removed) by a script show up
without a restart.

Per-session values never live here: every call takes the session's ``Settings`` and returns
plain results (``Step``, ``Readout``, ``AnalysisView``), so sessions cannot see each other's
steering. Replies take the path of the app's ``Serving`` (``personachat.app.serving``: by
default one shared scheduler per model), at most ``Serving.max_requests`` at once across the
page and the API. ``analyze(model_id)`` runs the persona analysis of a model once
(``Analyses``) and keeps the result for every session until the store's vectors of that model
change. The parts live in their own modules; the methods here only pick the model's engine and
pass it on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from personachat.app import browse, calibration, extraction, space, summary
from personachat.app.analysis import Analyses, AnalysisView, Progress
from personachat.app.catalog import Catalog
from personachat.app.generation import Step, generate
from personachat.app.library import needs_library
from personachat.app.models import ModelCache, is_demo
from personachat.app.public import Access
from personachat.app.serving import Serving
from personachat.app.settings import Limits, Settings

log = logging.getLogger(__name__)


class Backend:
    """Models, store and chat engines shared by every session of one app."""

    def __init__(
        self,
        default_model: str,
        store_path: str | Path,
        *,
        models: Any = None,
        dtype: str = "auto",
        device: str = "auto",
        hold_message: str | None = None,
        serving: Serving | None = None,
        access: Access | None = None,
    ) -> None:
        self.default_model = default_model
        self.hold_message = hold_message  # a test aid: see personachat.app.hold
        self.store_path = Path(store_path)
        lock = threading.RLock()  # one lock for models, store and engines
        self.access = access or Access()  # what visitors may do (personachat.app.public)
        self.models = ModelCache(lock, models, dtype=dtype, device=device)
        self.models.check = self.access.check_model
        self.serving = serving or Serving()
        self.catalog = Catalog(self.models, self.store_path, lock, self.serving)
        self.analyses = Analyses(self.catalog)

    # -- loading ------------------------------------------------------------------------------

    @needs_library
    def lm(self, model_id: str) -> Any:
        """The loaded model ``model_id`` (loaded on first use, shared by all sessions)."""
        return self.models.get(model_id)

    @needs_library
    def store(self) -> Any:
        """The persona store, read-only (opened on first use; it follows other writers)."""
        return self.catalog.store()

    @needs_library
    def engine(self, model_id: str, positions: str = "") -> Any:
        """The chat engine of ``model_id`` over its vectors read from ``positions``."""
        return self.catalog.engine(model_id, positions)

    @needs_library
    def store_id(self, model_id: str) -> str:
        """The id the store files ``model_id`` under."""
        return self.catalog.store_id(model_id)

    @needs_library
    def problems(self, model_id: str, positions: str = "") -> list[str]:
        """The vectors and neuron sets of ``model_id`` left out as unreadable, in words."""
        return self.catalog.problems(model_id, positions)

    @needs_library
    def vector_kinds(self, model_id: str) -> list[str]:
        """The positions kinds this model has vectors for, preferred first."""
        return self.catalog.vector_kinds(model_id)

    @needs_library
    def refresh(self) -> None:
        """Re-read the store now (it also re-reads by itself when another process wrote)."""
        self.catalog.refresh()

    def close(self) -> None:
        """Close the store connection (models stay loaded until the backend is dropped)."""
        self.catalog.close()

    def warm_up(self) -> threading.Thread:
        """Load the default model and its catalog in the background (the page is already up)."""

        def load() -> None:
            try:
                self.engine(self.default_model)
            except Exception as err:  # the page shows the error when it asks for the model
                log.warning("warm-up of %s failed: %s", self.default_model, err)

        thread = threading.Thread(target=load, name="personachat-warm-up", daemon=True)
        thread.start()
        return thread

    def is_demo(self, model_id: str) -> bool:
        """Whether ``model_id`` is the bundled demo model (its own corpus extracts best)."""
        return is_demo(model_id)

    def can_extract(self, model_id: str) -> bool:
        try:
            import personachat.pipeline  # noqa: F401
        except ImportError:
            return False
        return True

    @needs_library
    def extract(
        self,
        model_id: str,
        dataset: str = "personas",
        positions: str = "question_span",
        personas: Sequence[str] = (),
        neurons: bool = False,
        neuron_personas: Sequence[str] = (),
    ) -> str:
        """Extract vectors (and neurons) from a built-in dataset and register them."""
        return extraction.extract(
            self.catalog, model_id, dataset, positions, personas, neurons, neuron_personas
        )

    @needs_library
    def register_axis(self, model_id: str, dataset: str = "personas") -> str:
        """Read the model's assistant axis from a built-in dataset and register it (a store
        write, like ``extract``)."""
        return extraction.register_axis(self.catalog, model_id, dataset)

    @needs_library
    def axis(self, model_id: str) -> Any:
        """The model's assistant axis from the store (None when it has none)."""
        return calibration.axis_vector(self.catalog, model_id)

    @needs_library
    def register_demo(self) -> str | None:
        """First start with the demo model: register its vectors and neurons (None if done)."""
        return extraction.register_demo(self.catalog, self.default_model)

    # -- what the page shows ------------------------------------------------------------------

    @needs_library
    def limits(self, model_id: str, kind: str = "") -> Limits:
        engine = self.engine(model_id, kind)
        info = engine.lm.info
        return Limits(
            n_layers=info.n_layers,
            mlp_width=info.mlp_width,
            personas=tuple(sorted(engine.vectors)),
            neuron_sets=tuple(sorted(engine.neuron_sets)),
            best_layers=browse.best_layers(engine),
            norms=browse.norms(engine),
        )

    @needs_library
    def persona_names(self, model_id: str, kind: str = "") -> list[str]:
        return sorted(self.engine(model_id, kind).vectors)

    @needs_library
    def neuron_set_names(self, model_id: str) -> list[str]:
        return sorted(self.engine(model_id).neuron_sets)

    @needs_library
    def describe(self, model_id: str) -> str:
        engine = self.engine(model_id)
        return summary.describe(engine, self.vector_kinds(model_id), self.store_path)

    @needs_library
    def best_layer(self, model_id: str, personas: Sequence[str], kind: str = "") -> int:
        """The best layer (highest AUC) of the first picked persona; the middle layer if none."""
        return browse.best_layer(self.engine(model_id, kind), personas)

    @needs_library
    def blend_summary(self, model_id: str, settings: Settings) -> str:
        """The blend as a formula plus the runtime's interference warnings."""
        return summary.blend_summary(self.engine(model_id, settings.vectors_from), settings)

    @needs_library
    def settings_summary(self, model_id: str, settings: Settings) -> str:
        """What this turn does to the model, in words for the status line."""
        return summary.settings_summary(self.engine(model_id, settings.vectors_from), settings)

    @needs_library
    def layer_metrics(
        self, model_id: str, personas: Sequence[str], kind: str = ""
    ) -> dict[str, browse.LayerCurves]:
        """``{persona: LayerCurves}`` (AUC, separation, held-out AUC) of registered vectors."""
        return browse.layer_metrics(self.engine(model_id, kind), model_id, personas)

    @needs_library
    def tables(self, model_id: str) -> tuple[Any, Any, Any, Any]:
        """The store browser: personas, models, metrics at the best layer, neuron sets."""
        store = self.store()
        return browse.tables(store, self.store_id(model_id))

    @needs_library
    def persona_space(
        self, model_id: str, messages: Sequence[dict[str, Any]], layer: int, kind: str = ""
    ) -> tuple[list[str], np.ndarray, np.ndarray | None]:
        """Registered vectors at ``layer`` and the conversation's point in their space."""
        return space.persona_space(self.catalog, model_id, messages, layer, kind)

    @needs_library
    def reference(
        self, model_id: str, personas: Sequence[str], kind: str = ""
    ) -> np.ndarray | None:
        """[2, layers, personas]: the baseline's and each persona's mean on its vector."""
        return space.reference(self.catalog, model_id, personas, kind)

    # -- analysis and generation --------------------------------------------------------------

    @needs_library
    def analyze(
        self, model_id: str, progress: Progress | None = None, personas: Sequence[str] = ()
    ) -> AnalysisView:
        """The persona analysis of ``model_id``, computed once and shared by every session."""
        return self.analyses.run(model_id, progress, personas)

    @needs_library
    def generate(
        self,
        model_id: str,
        settings: Settings,
        messages: Sequence[dict[str, Any]],
        stop: threading.Event | None = None,
        hold: bool = False,
    ) -> Iterator[Step]:
        """Check the request now (raising before anything runs), then return an iterator that
        streams the reply to ``messages`` under ``settings`` (``hold``: see ``app.hold``); it
        waits for a slot among ``Serving.max_requests`` when it starts (a ``stop`` set while it
        waits ends it with no step)."""
        steps = generate(self.catalog, model_id, settings, messages, stop, hold)
        return self.serving.gate.through(steps, stop)
