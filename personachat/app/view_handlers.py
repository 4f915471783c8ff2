"""The page's views of the model's inside: per-token projections and their heatmap (from the
session's ``Readout``, no model needed), quality by layer, the persona map, the store browser and
the persona analysis."""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr
import numpy as np

from personachat.app import views
from personachat.app.analysis import ANALYSIS_FIGURES, AnalysisView
from personachat.app.handler_base import HandlerBase, Messages
from personachat.app.readout import Readout, readout_heatmap, readout_html

log = logging.getLogger(__name__)


class ViewHandlers(HandlerBase):
    """Tokens, heatmap, layer plot, persona map, store tables and analysis."""

    def tokens(self, readout: Readout | None, layer: float, persona: str | None = None) -> str:
        """Coloured per-token projections of the last exchange at ``layer`` (one row each)."""
        return readout_html(readout, layer, persona)

    def heatmap(self, readout: Readout | None, persona: str | None = None) -> np.ndarray | None:
        """A token x layer heatmap of the projection on ``persona`` (the first one by default)."""
        return readout_heatmap(readout, persona)

    def layer_plot(
        self, model_id: str | None, personas: list[str] | None, vectors_from: str | None = None
    ) -> np.ndarray | None:
        """AUC and separation by layer of the picked personas (the first six when none)."""
        model_id = self.model_id(model_id)
        kind = vectors_from or ""
        try:
            names = list(personas or []) or self.backend.persona_names(model_id, kind)[:6]
            metrics = self.backend.layer_metrics(model_id, names, kind)
        except Exception as err:  # an unknown persona or layer, or a model that cannot load
            gr.Warning(str(err).strip("'\""))
            return None
        return views.layer_metrics_image(metrics)

    def store_tables(self, model_id: str | None) -> tuple[Any, Any, Any, Any]:
        """The store browser: personas, models, metrics at the best layer and neuron sets."""
        model_id = self.model_id(model_id)
        try:
            return self.backend.tables(model_id)
        except Exception as err:
            gr.Warning(f"Cannot read the store: {err}")
            return gr.update(), gr.update(), gr.update(), gr.update()

    def persona_map(
        self,
        model_id: str | None,
        history: Messages | None,
        layer: float,
        personas: list[str] | None,
        vectors_from: str | None = None,
    ) -> np.ndarray | None:
        """PCA of the registered persona vectors at ``layer`` with this conversation's position."""
        model_id = self.model_id(model_id)
        at = int(layer or 0)
        try:
            names, vectors, point = self.backend.persona_space(
                model_id, history or [], at, vectors_from or ""
            )
        except Exception as err:  # an unknown persona or layer, or a model that cannot load
            gr.Warning(str(err).strip("'\""))
            return None
        title = f"persona space at layer {at} ({len(names)} vectors; ★ = this conversation)"
        return views.pca_map_image(names, vectors, point, title, tuple(personas or ()))

    def analysis(
        self,
        model_id: str | None,
        personas: list[str] | None = None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's idiom
    ) -> tuple[Any, ...]:
        """Run (or reuse) the persona analysis of the current model (of ``personas`` only, when
        given: quicker): findings as Markdown, then one image per ``ANALYSIS_FIGURES`` slot
        (hidden when the model has no such figure). The bar shows the backend's stages, not
        the analysis' tqdm bars: tracking those made it much slower."""
        model_id = self.model_id(model_id)
        try:
            view = self.backend.analyze(
                model_id, lambda f, text: progress(f, desc=text), personas or ()
            )
        except Exception as err:  # a model that cannot load or an analysis that fails
            log.warning("analysis of %s failed: %s", model_id, err, exc_info=True)
            message = f"⚠ The analysis of `{model_id}` failed: {type(err).__name__}: {err}"
            gr.Warning(message)
            return (message, *[gr.update(value=None, visible=False) for _ in ANALYSIS_FIGURES])
        return (_findings(view), *_analysis_images(view))


def _findings(view: AnalysisView) -> str:
    return views.findings_markdown(
        view.model_id, view.dataset, view.personas, view.findings, view.seconds
    )


def _analysis_images(view: AnalysisView) -> list[Any]:
    return [
        gr.update(value=view.figures.get(key), visible=key in view.figures)
        for key, _ in ANALYSIS_FIGURES
    ]
