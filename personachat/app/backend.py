"""What the chat app shares between sessions: loaded models, the store, one chat engine per model.

``Backend(default_model, store_path)`` loads nothing when built. The first request for a model
loads it (once, under a lock; other sessions wait for the same load) and reads its persona
vectors and neuron sets from the store into a ``ChatEngine``. ``refresh()`` drops the cached
catalog so personas registered (or removed) by a script show up without a restart.

Per-session values never live here: every call takes the session's ``Settings`` and returns
plain results (``Step``, ``Readout``, ``AnalysisView``), so sessions cannot see each other's
steering. ``analyze(model_id)`` runs the persona analysis (``personachat.report``) of a model once
and keeps the result for every session until the store's vectors of that model change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from personachat.app.settings import (
    LAST_PROMPT_TOKEN,
    Limits,
    Settings,
    format_layer_spec,
    format_layers,
    meant_positions,
    patching_sets,
)

log = logging.getLogger(__name__)

MAX_READOUT_PERSONAS = 12
MAX_CACHED_MODELS = 2
# Which vectors steer by default: on the demo model, vectors read from the question span steered
# where reply-average ones did not (issue 6 pilot).
PREFERRED_POSITIONS = ("question_span", "prompt_last", "response_avg", "prompt_avg")


REPO = Path(__file__).resolve().parents[2]
DEMO_ID = "store/models/demo"  # the bundled demo model's id in the store (relative to the repo)
DEMO_NEURON_PERSONAS: tuple[str, ...] = ()  # first start: persona neurons of every pair
DEMO_POSITIONS = "question_span,response_avg,prompt_last"  # the kinds registered on first start


def _folder(model_id: str) -> Path | None:
    """The folder a model id names (relative ids also tried from the repo root), or None."""
    for path in (Path(model_id).expanduser(), REPO / model_id):
        if path.is_dir():
            return path.resolve()
    return None


@dataclass(frozen=True, eq=False)
class Readout:
    """Per-token projections of the last exchange (prompt then reply) for the inside view."""

    personas: tuple[str, ...]
    tokens: tuple[str, ...]
    n_prompt: int
    projections: np.ndarray  # [tokens, layers, personas]; the last reply token is 0 (never fed)
    # [2, layers, personas]: the projections of the baseline mean (0) and of the persona's own
    # mean (1) from the store, so a token reads as "how far from baseline towards the persona";
    # None when the store has no raw means
    reference: np.ndarray | None = None


@dataclass(frozen=True)
class Step:
    """The reply so far; ``readout`` and ``warnings`` come with the last step."""

    text: str
    side_text: str | None = None
    done: bool = False
    stopped: bool = False
    readout: Readout | None = None
    warnings: tuple[str, ...] = field(default=())
    dropped: int = 0  # oldest turns left out so the conversation fits the model's context


@dataclass(frozen=True, eq=False)
class AnalysisView:
    """A model's persona analysis as the page shows it: findings and rendered figures."""

    model_id: str
    dataset: str
    personas: tuple[str, ...]
    findings: tuple[str, ...]
    figures: dict[str, np.ndarray]  # file stem (``report.report_figures``) -> RGB image
    seconds: float  # how long the analysis took when it ran


Progress = Callable[[float, str], None]


def _tokens(positions: str) -> str:
    """The status' words for where an ablation acts: nothing for all tokens."""
    if positions == LAST_PROMPT_TOKEN:
        return f" ({positions})"
    return "" if positions == "all" else f" ({positions} tokens)"


def _window(positions: str) -> tuple[str, int | None]:
    """The runtime's (positions, last_n) for a page choice of where to ablate neurons."""
    return ("prompt", 1) if positions == LAST_PROMPT_TOKEN else (positions, None)


def unit_name(units: str) -> str:
    """The runtime's name for the page's units."""
    return "calibrated" if units == "x residual norm" else "raw"


class Backend:
    """Models, store and chat engines shared by every session of one app."""

    def __init__(self, default_model: str, store_path: str | Path, *, models: Any = None) -> None:
        self.default_model = default_model
        self.store_path = Path(store_path)
        self._models: dict[str, Any] = dict(models or {})  # model id -> LoadedModel
        # (model id, positions kind) -> (catalog signature, ChatEngine)
        self._engines: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._store: Any = None
        self._lock = threading.RLock()
        # (model id, personas, vector signature) -> AnalysisView; one analysis runs at a time
        self._analyses: dict[tuple[Any, ...], AnalysisView] = {}
        self._analysis_lock = threading.Lock()

    # -- loading ------------------------------------------------------------------------------

    def lm(self, model_id: str) -> Any:
        """The loaded model ``model_id`` (loaded on first use, shared by all sessions)."""
        with self._lock:
            if model_id not in self._models:
                from personachat.model import load_model

                while len(self._models) >= MAX_CACHED_MODELS:
                    dropped = next(iter(self._models))
                    self._models.pop(dropped)
                    for key in [k for k in self._engines if k[0] == dropped]:
                        self._engines.pop(key)
                log.info("loading model %s", model_id)
                lm = load_model(model_id)
                if self.is_demo(model_id) and lm.info.model_id != DEMO_ID:
                    # the bundled model keeps one id in the store, wherever the app runs from
                    lm = replace(lm, info=replace(lm.info, model_id=DEMO_ID))
                self._models[model_id] = lm
            return self._models[model_id]

    def register_demo(self) -> str | None:
        """On the first start with the bundled demo model and a store without its vectors:
        extract and register them (the ``DEMO_POSITIONS`` kinds) with the persona neurons of
        every pair (attribution patching; progress bars on the terminal; ~20 s on 2 busy CPU
        cores). None when nothing was needed."""
        if not self.is_demo(self.default_model):
            return None
        if self.store().vectors(DEMO_ID) and self.store().neuron_sets(DEMO_ID):
            return None
        return self.extract(
            self.default_model,
            DEMO_DATASET,
            DEMO_POSITIONS,
            neurons=True,
            neuron_personas=DEMO_NEURON_PERSONAS,
        )

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
            lm = self.lm(model_id)
            store_id = self.store_id(model_id)
            kind = self._kind(store_id, positions)
            key = (model_id, kind)
            signature = self._signature(store_id, kind)
            cached = self._engines.get(key)
            if cached is None or cached[0] != signature:
                from personachat.chat import ChatEngine

                vectors = self._vectors(store_id, kind, lm.info.hidden_size)
                sets = self._neuron_sets(store_id)
                self._engines[key] = (signature, ChatEngine(lm, vectors, sets))
            return self._engines[key][1]

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

    def refresh(self) -> None:
        """Re-read the store now (it also re-reads by itself when another process wrote)."""
        with self._lock:
            self._engines.clear()
            if self._store is not None:
                self._store.refresh(force=True)

    def close(self) -> None:
        """Close the store connection (models stay loaded until the backend is dropped)."""
        with self._lock:
            self._engines.clear()
            if self._store is not None:
                self._store.close()
                self._store = None

    # -- store adapters (personachat.store) ---------------------------------------------------

    def store_id(self, model_id: str) -> str:
        """The id the store files ``model_id`` under: the loaded id, or a stored id naming the
        same folder (``store/models/demo`` vs its absolute path)."""
        own = str(self.lm(model_id).info.model_id)
        stored = [m.model_id for m in self.store().models()]
        if own in stored:
            return own
        target = _folder(own)
        for other in stored:
            if target is not None and _folder(other) == target:
                return str(other)
        return own

    def vector_kinds(self, model_id: str) -> list[str]:
        """The positions kinds this model has vectors for, preferred first."""
        have = {e.positions for e in self.store().vectors(self.store_id(model_id))}
        return [k for k in PREFERRED_POSITIONS if k in have] + sorted(
            have - set(PREFERRED_POSITIONS)
        )

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

    def _signature(self, store_id: str, kind: str) -> tuple[Any, ...]:
        store = self.store()
        vectors = tuple(
            (e.vector_id, e.sha256) for e in store.vectors(store_id, positions=kind or None)
        )
        return vectors, tuple(e.set_id for e in store.neuron_sets(store_id))

    def _vectors(self, store_id: str, kind: str, hidden_size: int) -> dict[str, Any]:
        store = self.store()
        names = dict.fromkeys(e.persona for e in store.vectors(store_id, positions=kind or None))
        return {
            name: store.load_vector(store_id, name, positions=kind or None, hidden_size=hidden_size)
            for name in names
        }

    def _neuron_sets(self, store_id: str) -> dict[str, Any]:
        store = self.store()
        return {e.label: store.load_neurons(store_id, e.label) for e in store.neuron_sets(store_id)}

    # -- what the page shows ------------------------------------------------------------------

    def limits(self, model_id: str, kind: str = "") -> Limits:
        engine = self.engine(model_id, kind)
        info = engine.lm.info
        return Limits(
            n_layers=info.n_layers,
            mlp_width=info.mlp_width,
            personas=tuple(sorted(engine.vectors)),
            neuron_sets=tuple(sorted(engine.neuron_sets)),
        )

    def persona_names(self, model_id: str, kind: str = "") -> list[str]:
        return sorted(self.engine(model_id, kind).vectors)

    def neuron_set_names(self, model_id: str) -> list[str]:
        return sorted(self.engine(model_id).neuron_sets)

    def describe(self, model_id: str) -> str:
        engine = self.engine(model_id)
        info = engine.lm.info
        kinds = self.vector_kinds(model_id)
        return (
            f"**Model** `{info.model_id}` · {info.architecture} · {info.n_layers} layers · "
            f"hidden {info.hidden_size} · MLP width {info.mlp_width} · on {engine.lm.device}  \n"
            f"**Store** `{self.store_path}` · {len(engine.vectors)} personas with vectors "
            f"(read from: {', '.join(kinds) or 'none'}) · {len(engine.neuron_sets)} neuron sets"
        )

    def is_demo(self, model_id: str) -> bool:
        """Whether ``model_id`` is the bundled demo model (its own corpus extracts best)."""
        return model_id == DEMO_ID or _folder(model_id) == (REPO / DEMO_ID).resolve()

    def can_extract(self, model_id: str) -> bool:
        try:
            import personachat.pipeline  # noqa: F401
        except ImportError:
            return False
        return True

    def best_layer(self, model_id: str, personas: Sequence[str], kind: str = "") -> int:
        """The best layer (highest AUC) of the first picked persona; the middle layer if none."""
        engine = self.engine(model_id, kind)
        for name in personas:
            vector = engine.vectors.get(name)
            if vector is not None and vector.metrics is not None:
                return int(vector.metrics.best_layer)
        return int(engine.lm.info.n_layers // 2)

    def blend_summary(self, model_id: str, settings: Settings) -> str:
        """The blend as a formula plus the runtime's interference warnings."""
        from personachat.interventions import blend_interference

        engine = self.engine(model_id, settings.vectors_from)
        pairs = list(zip(settings.personas, settings.weights, strict=True))
        terms = " ".join(f"{w:+g}·{p}" for p, w in pairs).lstrip("+")
        layers = [layer for layer, s in settings.layer_strengths if s != 0]
        spec = format_layer_spec(dict(settings.layer_strengths)) or "no layer (unsteered)"
        text = f"Blend {terms} at {spec} ({settings.units})."
        if len(pairs) > 1 and layers:
            terms_v = [(p, w, engine.vectors[p].vector) for p, w in pairs]
            report = blend_interference(terms_v, layers)
            if report.warnings:
                text += " ⚠ Interference: " + "; ".join(report.warnings) + "."
        return text

    def settings_summary(self, model_id: str, settings: Settings) -> str:
        """What this turn does to the model: the blend (with interference), where it is added
        when only the last prompt tokens, the ablated direction and the neuron ablation (with
        a note when a patching set is ablated otherwise than by mean at the prompt)."""
        engine = self.engine(model_id, settings.vectors_from)
        parts = [self.blend_summary(model_id, settings)] if settings.steering else []
        if settings.steering and settings.last_n is not None:
            n = settings.last_n
            parts.append(f"Added at the last {'prompt token' if n == 1 else f'{n} prompt tokens'}.")
        if settings.projecting:
            layers = format_layers(settings.direction_layers)
            where = _tokens(settings.direction_positions)
            if settings.direction_mode == "zero":
                text = f"Projecting {settings.direction}'s direction out at layers {layers}"
            else:
                vector = engine.vectors.get(settings.direction)
                base = f"{vector.baseline}'s" if vector is not None else "the baseline's"
                text = f"Moving {settings.direction}'s direction to {base} level at layers {layers}"
            parts.append(f"{text}{where}.")
        if settings.ablating:
            sets = engine.neuron_sets
            units = sum(len(sets[label]) for label in settings.neuron_sets) + len(settings.neurons)
            named = ", ".join([*settings.neuron_sets, *(["typed"] if settings.neurons else [])])
            where = _tokens(settings.ablation_positions)
            parts.append(f"Ablating {units} MLP units ({named}) by {settings.ablation}{where}.")
            for label in patching_sets(settings.neuron_sets):
                meant = meant_positions(label)
                if (settings.ablation, settings.ablation_positions) != ("mean", meant):
                    parts.append(
                        f"⚠ {label}: found by patching at the prompt, meant for mean ablation "
                        f"at the {meant if meant != 'prompt' else 'prompt tokens'} "
                        f"(ablate 'mean', at '{meant}')."
                    )
        return " ".join(parts)

    def layer_metrics(
        self, model_id: str, personas: Sequence[str], kind: str = ""
    ) -> dict[str, tuple[list[float], list[float]]]:
        """``{persona: (auc per layer, separation per layer)}`` of registered vectors."""
        engine = self.engine(model_id, kind)
        out = {}
        for name in personas:
            vector = engine.vectors.get(name)
            if vector is None:
                raise KeyError(f"persona {name!r} is not registered for {model_id}")
            if vector.metrics is not None:
                out[name] = (vector.metrics.auc.tolist(), vector.metrics.separation.tolist())
        return out

    def tables(self, model_id: str) -> tuple[Any, Any, Any, Any]:
        """The store browser: personas, models, metrics at the best layer, neuron sets."""
        import pandas as pd

        store = self.store()
        store_id = self.store_id(model_id)
        personas = pd.DataFrame(
            [(p.name, p.category, p.description, p.system_prompt) for p in store.personas()],
            columns=["persona", "category", "description", "system prompt"],
        )
        models = pd.DataFrame(
            [
                (m.model_id, m.architecture, m.n_layers, m.hidden_size, m.mlp_width, m.revision)
                for m in store.models()
            ],
            columns=["model", "architecture", "layers", "hidden", "MLP width", "revision"],
        )
        rows = []
        for e in store.vectors(store_id):
            best = e.best_layer
            auc = sep = None
            for layer, a, sp, _norm, _resid in store.layer_metrics(e.vector_id):
                if layer == best:
                    auc, sep = a, sp
            rows.append((e.persona, e.positions, e.baseline, best, auc, sep, e.n_samples))
        metrics = pd.DataFrame(
            rows,
            columns=["persona", "read from", "baseline", "best layer", "AUC", "separation", "n"],
        )
        sets = pd.DataFrame(
            [
                (e.label, e.site, e.method, e.n_units, ", ".join(e.pairs), e.source)
                for e in store.neuron_sets(store_id)
            ],
            columns=["neuron set", "site", "method", "units", "pairs", "source"],
        )
        return personas, models, metrics, sets

    def persona_space(
        self, model_id: str, messages: Sequence[dict[str, Any]], layer: int, kind: str = ""
    ) -> tuple[list[str], np.ndarray, np.ndarray | None]:
        """Registered vectors at ``layer`` [P, H] and the conversation's position in that space:
        its mean residual at ``layer`` minus the vectors' baseline mean (``None`` without means
        in the store or without a conversation)."""
        engine = self.engine(model_id, kind)
        lm = engine.lm
        lm.sites.check_layer(layer)
        names = sorted(engine.vectors)
        if not names:
            raise ValueError(f"no persona vectors for {model_id}; extract or register some first")
        vectors = np.stack([engine.vectors[n].vector[layer].float().numpy() for n in names])
        if not messages:
            return names, vectors, None
        baseline = self._baseline_mean(model_id, engine.vectors[names[0]])
        if baseline is None:
            return names, vectors, None
        return names, vectors, residual_mean(lm, messages, layer) - baseline[layer]

    def _baseline_mean(self, model_id: str, vector: Any) -> np.ndarray | None:
        """The stored mean activation [layers, hidden] of ``vector``'s baseline (the mean of all
        personas' means for the ``mean`` baseline); None when the store has no raw means."""
        from personachat.records import MEAN_BASELINE

        store, store_id = self.store(), self.store_id(model_id)
        kind = vector.positions
        try:
            if vector.baseline == MEAN_BASELINE:
                names = [e.persona for e in store.means(store_id) if e.positions == kind]
                means = [store.load_means(store_id, n, positions=kind).mean for n in names]
                return np.stack([m.float().numpy() for m in means]).mean(0) if means else None
            return store.load_means(store_id, vector.baseline, positions=kind).mean.float().numpy()
        except LookupError:
            return None

    def reference(
        self, model_id: str, personas: Sequence[str], kind: str = ""
    ) -> np.ndarray | None:
        """[2, layers, personas]: projections of the baseline mean and of the persona mean on
        each unit persona vector (persona mean = baseline + vector, so row 1 = row 0 + |v|)."""
        engine = self.engine(model_id, kind)
        rows = []
        for name in personas:
            vector = engine.vectors[name]
            base = self._baseline_mean(model_id, vector)
            if base is None:
                return None
            v = vector.vector.float().numpy()
            norm = np.linalg.norm(v, axis=-1)
            zero = (base * v).sum(-1) / np.maximum(norm, 1e-12)
            rows.append(np.stack([zero, zero + norm]))
        return np.stack(rows, axis=-1) if rows else None

    def extract(
        self,
        model_id: str,
        dataset: str = "personas",
        positions: str = "question_span",
        personas: Sequence[str] = (),
        neurons: bool = False,
        neuron_personas: Sequence[str] = (),
    ) -> str:
        """Extract vectors for ``model_id`` from a built-in dataset (all its personas, or the
        ``personas`` named plus the baseline) and register them in the store; with ``neurons``,
        also the top-32 MLP units of each contrast pair (attribution patching) of those personas.
        ``neuron_personas`` narrows the pairs to those of the personas named. ``demo`` is the
        bundled demo model's own corpus (planted replies: no generation)."""
        from personachat.pipeline import extract_vectors, find_neurons, register_results
        from personachat.prompts import DatasetError, builtin_names, load_dataset
        from personachat.records import MEAN_BASELINE
        from personachat.store import Store

        lm = self.lm(model_id)
        if dataset not in builtin_names():  # the page offers built-in sets, never server paths
            raise DatasetError(f"no built-in dataset {dataset!r}; built-in: {builtin_names()}")
        data = load_dataset(dataset)
        baseline = "default" if "default" in data.persona_names else MEAN_BASELINE
        chosen = list(personas) or None
        kinds = tuple(k for k in positions.split(",") if k)
        result = extract_vectors(
            lm, data, chosen, positions=kinds, baseline=baseline, progress=True
        )
        sets = []
        wanted = list(neuron_personas) or chosen
        pairs = [p for p in data.pairs if wanted is None or p.high in wanted or p.low in wanted]
        if neurons and pairs:
            sets = find_neurons(lm, pairs, method="patching", k=32, dataset=data)
        with Store(self.store_path) as store:
            register_results(store, lm, data.personas, result, sets)
        self.refresh()
        found = f" and {len(sets)} neuron sets" if sets else ""
        best = ", ".join(f"{r.persona} L{r.best_layer} AUC {r.auc:.2f}" for r in result.summary[:6])
        return (
            f"Registered {len(result.vectors)} vectors{found} for `{lm.info.model_id}` ({best}, …)."
        )

    # -- persona analysis (personachat.report) ------------------------------------------------

    def analyze(
        self, model_id: str, progress: Progress | None = None, personas: Sequence[str] = ()
    ) -> AnalysisView:
        """The persona analysis of ``model_id`` (collapse, probe, patching, persona space) on the
        personas and questions ``scripts/analyze.py`` picks for it (``personas`` narrows them),
        with the store's vectors of the model. Computed once and shared by every session until
        the store's vectors of the model change; other sessions wait for a running analysis."""
        from personachat.analysis.figures import report_figures
        from personachat.analysis.findings import findings
        from personachat.analysis.inputs import analysis_inputs, default_dataset, stored_vectors
        from personachat.analysis.run import analyze_model

        say = progress or (lambda fraction, text: None)
        say(0.0, f"loading {model_id}")
        lm = self.lm(model_id)
        store_id = self.store_id(model_id)
        dataset = "demo" if self.is_demo(model_id) else default_dataset(model_id)
        inputs = analysis_inputs(dataset, list(personas) or None)
        if len(inputs.personas) < 2:
            raise ValueError(
                f"the analysis compares personas: {len(inputs.personas)} given, pick at least 2"
            )
        names = [p.name for p in inputs.personas]
        key = (model_id, tuple(names), self._signature(store_id, ""))
        with self._analysis_lock:
            cached = self._analyses.get(key)
            if cached is not None:
                say(1.0, "done (computed earlier)")
                return cached
            say(0.05, f"analysing {len(names)} personas of {store_id} ({dataset} questions)")
            start = time.perf_counter()
            vectors = stored_vectors(self.store(), [store_id], names)
            result = analyze_model(
                lm, inputs.personas, inputs.items, vectors=vectors,
                patch_items=inputs.patch_items, dataset=dataset,
            )  # fmt: skip
            say(0.9, "drawing the figures")
            from personachat.app.views import figure_image

            figures = {k: figure_image(f) for k, f in report_figures(result).items()}
            view = AnalysisView(
                model_id=store_id,
                dataset=dataset,
                personas=tuple(names),
                findings=tuple(findings(result)),
                figures=figures,
                seconds=time.perf_counter() - start,
            )
            self._analyses[key] = view
            say(1.0, "done")
            return view

    # -- generation ---------------------------------------------------------------------------

    def generate(
        self,
        model_id: str,
        settings: Settings,
        messages: Sequence[dict[str, Any]],
        stop: threading.Event | None = None,
    ) -> Iterator[Step]:
        """Check the request now (raising before anything runs), then return an iterator that
        streams the reply to ``messages`` under ``settings``."""
        from personachat.chat import GenerationSettings
        from personachat.interventions import (
            AblationSpec,
            DirectionSpec,
            SteeringSpec,
            build_ablation,
        )

        engine = self.engine(model_id, settings.vectors_from)
        lm = engine.lm
        conversation, dropped = fit_context(lm, messages, settings.max_new_tokens)
        if settings.system_prompt:
            conversation.insert(0, {"role": "system", "content": settings.system_prompt})
        steering = None
        if settings.steering:
            steering = SteeringSpec(
                blend=settings.blend(),
                layers=dict(settings.layer_strengths),
                units=unit_name(settings.units),  # type: ignore[arg-type]
                positions=settings.positions,  # type: ignore[arg-type]
                last_n=settings.last_n,
            )
        direction = None
        if settings.projecting:
            direction = DirectionSpec(
                settings.direction,
                settings.direction_layers,
                mode=settings.direction_mode,
                positions=settings.direction_positions,
            )
        ablation, extra = None, []
        if settings.ablating:
            mode, (where, last_n) = settings.ablation, _window(settings.ablation_positions)
            typed = list(settings.neurons)
            first = settings.neuron_sets[0] if settings.neuron_sets else None
            ablation = AblationSpec(
                first,
                typed,
                mode,  # type: ignore[arg-type]
                positions=where,  # type: ignore[arg-type]
                last_n=last_n,
            )
            rows = [False, True] if settings.side_by_side else None
            # the other sets run as extra handlers; their position window takes the prompt's
            # length from its first forward (the prefill), as the engine's own handlers do
            for label in settings.neuron_sets[1:]:
                spec = AblationSpec(
                    label,
                    mode=mode,  # type: ignore[arg-type]
                    positions=where,  # type: ignore[arg-type]
                    last_n=last_n,
                )
                extra.append(build_ablation(lm, spec, engine.neuron_sets, rows=rows))
        readout = list(settings.personas) or sorted(engine.vectors)[:MAX_READOUT_PERSONAS]
        updates = engine.stream(
            conversation,
            GenerationSettings(
                max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                seed=settings.seed,
            ),
            steering=steering,
            ablation=ablation,
            direction=direction,
            readout=readout,
            side_by_side=settings.side_by_side,
            stop=stop,
            handlers=extra,
        )
        reference = self.reference(model_id, readout, settings.vectors_from)
        return self._steps(lm, updates, reference, dropped)

    def _steps(
        self, lm: Any, updates: Iterator[Any], reference: np.ndarray | None, dropped: int
    ) -> Iterator[Step]:
        for update in updates:
            warnings = tuple(update.interference.warnings) if update.interference else ()
            yield Step(
                text=update.text,
                side_text=update.baseline_text,
                done=update.done,
                stopped=update.stopped,
                readout=self._readout(lm, update.readout, reference) if update.done else None,
                warnings=warnings,
                dropped=dropped,
            )

    @staticmethod
    def _readout(lm: Any, readout: Any, reference: np.ndarray | None) -> Readout | None:
        if readout is None:
            return None
        tokenizer = lm.tokenizer
        tokens = tuple(str(tokenizer.decode([t])) for t in readout.tokens)
        values = np.nan_to_num(readout.projections.numpy().astype(np.float32), nan=0.0)
        personas = tuple(readout.personas)
        return Readout(personas, tokens, int(readout.prompt_len), values, reference)


DEMO_DATASET = "demo"


def context_limit(lm: Any) -> int | None:
    """The model's context length (``max_position_embeddings``), when its config says."""
    from personachat.model import text_config

    value = getattr(text_config(lm.model.config), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def fit_context(
    lm: Any, messages: Sequence[dict[str, Any]], max_new_tokens: int
) -> tuple[list[dict[str, Any]], int]:
    """``messages`` without their oldest turns as far as needed (never the last message) so the
    prompt plus ``max_new_tokens`` fits the model's context; returns them and how many went."""
    from personachat.prompts import format_chat

    kept = list(messages)
    limit = context_limit(lm)
    dropped = 0
    while limit is not None and len(kept) > 1:
        text = format_chat(lm.tokenizer, kept, add_generation_prompt=True)
        n = len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
        if n + max_new_tokens <= limit:
            break
        kept = kept[2:] if len(kept) > 2 else kept[1:]  # a user turn and its reply
        dropped += 1
    return kept, dropped


def residual_mean(lm: Any, messages: Sequence[dict[str, Any]], layer: int) -> np.ndarray:
    """The mean residual stream at ``layer`` over the tokens of ``messages`` (chat template)."""
    import torch

    from personachat.activations import Recorder, pad, run_forward
    from personachat.hooks import intervene
    from personachat.prompts import format_chat

    text = format_chat(lm.tokenizer, messages, add_generation_prompt=False)
    ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    rec = Recorder.at("residual", [layer], stop=True)
    with torch.no_grad(), intervene(lm.sites, [rec]):
        run_forward(lm, pad([ids[0].tolist()], 0, "left", lm.device))
    return rec.get(layer)[0].mean(dim=0).cpu().numpy()
