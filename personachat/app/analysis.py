"""The analysis tab's backend: a model's persona analysis (``personachat.analysis``), run
once and shared by every session.

This is the app's only use of ``personachat.analysis``: which questions a model is
analysed on, the analyses themselves, their figures and findings. ``Analyses.run`` computes an
``AnalysisView`` once per model, persona list and set of stored vectors; other sessions asking
meanwhile wait for the running analysis and then get the same view.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from personachat.app.analysis_figures import analysis_figures
from personachat.app.catalog import Catalog
from personachat.app.figures import plot_json
from personachat.app.models import is_demo

Progress = Callable[[float, str], None]

# The analysis tab's figures: (``report_figures`` key, label); two persona pairs patched
ANALYSIS_FIGURES = (
    ("collapse", "Persona collapse per preference question"),
    ("probe", "Persona probe accuracy by layer and token group"),
    ("persona_space", "Persona space: cosine similarity and PCA"),
    ("assistant_axis", "Personas on the assistant axis"),
    ("patching_0", "Activation patching, first persona pair"),
    ("heads_0", "Per-head patching, first persona pair"),
    ("patching_1", "Activation patching, second persona pair"),
    ("heads_1", "Per-head patching, second persona pair"),
    ("contrasts", "Controlled contrasts"),
)


@dataclass(frozen=True, eq=False)
class AnalysisView:
    """A model's persona analysis as the page shows it: findings and rendered figures."""

    model_id: str
    dataset: str
    personas: tuple[str, ...]
    findings: tuple[str, ...]
    figures: dict[str, str]  # figure key -> Plotly JSON
    seconds: float  # how long the analysis took when it ran
    plain: tuple[str, ...] = ()  # three findings in plain words, first on the page


def plain_findings(result: Any) -> list[str]:
    """The analysis in three sentences for someone new to it: do personas collapse, is the
    persona still inside, and where does it enter the answer."""
    c = result.collapse
    collapsed = [q for q in c.questions if q.collapsed]
    example = collapsed[0] if collapsed else None
    first = (
        f"Different personas often give the same answer: on {len(collapsed)} of "
        f"{len(c.questions)} 'favourite X' questions at least half of the {len(c.personas)} "
        "personas answer alike"
        + (f" (favourite {example.key}: {example.modal_answer!r})." if example else ".")
    )
    probe = result.probe
    best = float(np.nanmax(probe.accuracy)) if probe.accuracy.size else float("nan")
    second = (
        "Yet the persona is still there inside: a simple probe reads which persona is "
        f"speaking from the model's activations with accuracy up to {best:.2f} "
        f"(chance {probe.chance:.2f}), so the answer ignores it rather than losing it."
    )
    return [first, second, _where(result)]


def _where(result: Any) -> str:
    """Where the persona enters the answer, from the circuit or the patching."""
    if result.circuit is not None:
        nodes = [n for n in result.circuit.nodes if n != "input"]
        return (
            f"A few parts carry it into the answer: patching {', '.join(nodes)} (a = attention "
            f"head, m = MLP, by layer) from one persona into another moves "
            f"{result.circuit.restored:.0%} of the way to the other persona's answer."
        )
    if result.patching:
        return (
            "No small set of attention heads or MLPs carries it alone: the persona reaches the "
            "answer through many parts (see the patching figures)."
        )
    return "Where it enters the answer was not measured (no persona pair to patch)."


class Analyses:
    """Persona analyses by (model, personas, vectors), computed one at a time."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._views: dict[tuple[Any, ...], AnalysisView] = {}
        self._lock = threading.Lock()

    def run(
        self, model_id: str, progress: Progress | None = None, personas: Sequence[str] = ()
    ) -> AnalysisView:
        """The persona analysis of ``model_id`` (collapse, probe, patching, persona space) on the
        personas and questions ``scripts/analyze.py`` picks for it (``personas`` narrows them),
        with the store's vectors of the model. Computed once and shared by every session until
        the store's vectors of the model change; other sessions wait for a running analysis."""
        from personachat.analysis.findings import findings
        from personachat.analysis.inputs import analysis_inputs, default_dataset, stored_vectors
        from personachat.analysis.run import analyze_model

        say = progress or (lambda fraction, text: None)
        say(0.0, f"loading {model_id}")
        lm = self.catalog.models.get(model_id)
        store_id = self.catalog.store_id(model_id)
        dataset = "demo" if is_demo(model_id) else default_dataset(model_id)
        inputs = analysis_inputs(dataset, list(personas) or None)
        if len(inputs.personas) < 2:
            raise ValueError(
                f"the analysis compares personas: {len(inputs.personas)} given, pick at least 2"
            )
        names = [p.name for p in inputs.personas]
        key = (model_id, tuple(names), self.catalog.signature(store_id, ""))
        with self._lock:
            cached = self._views.get(key)
            if cached is not None:
                say(1.0, "done (computed earlier)")
                return cached
            say(0.05, f"analysing {len(names)} personas of {store_id} ({dataset} questions)")
            start = time.perf_counter()
            vectors = stored_vectors(self.catalog.store(), [store_id], names)
            result = analyze_model(
                lm,
                inputs.personas,
                inputs.items,
                vectors=vectors,
                patch_items=inputs.patch_items,
                dataset=dataset,
            )
            say(0.9, "drawing the figures")
            figures = {k: plot_json(f) for k, f in analysis_figures(result).items()}
            view = AnalysisView(
                model_id=store_id,
                dataset=dataset,
                personas=tuple(names),
                findings=tuple(findings(result)),
                figures=figures,
                seconds=time.perf_counter() - start,
                plain=tuple(plain_findings(result)),
            )
            self._views[key] = view
            say(1.0, "done")
            return view
