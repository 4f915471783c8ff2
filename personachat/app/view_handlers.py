"""The page's views of the model's inside: per-token projections and their heatmap (from the
session's ``Readout``, no model needed), quality by layer, the persona map, the store browser and
the persona analysis. The plots are interactive (Plotly through ``gr.Plot``)."""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr
from gradio.components.plot import PlotData

from personachat.app import figures, views
from personachat.app.analysis import ANALYSIS_FIGURES, AnalysisView
from personachat.app.handler_base import HandlerBase, Messages
from personachat.app.limits import check_history
from personachat.app.readout import ALL_PERSONAS, Readout, readout_html

log = logging.getLogger(__name__)


def plot(fig: Any) -> PlotData:
    """A Plotly figure as ``gr.Plot`` shows it, with the page's Plotly config."""
    return PlotData(type="plotly", plot=figures.plot_json(fig))


class ViewHandlers(HandlerBase):
    """Tokens, heatmap, layer plot, persona map, store tables and analysis."""

    def tokens(self, readout: Readout | None, layer: float, persona: str | None = None) -> str:
        """Coloured per-token projections of the last exchange at ``layer`` (one row each)."""
        return readout_html(readout, layer, persona)

    def heatmap(self, readout: Readout | None, persona: str | None = None) -> PlotData | None:
        """A token x layer heatmap of the projection on ``persona`` (the first picked one by
        default), values on hover."""
        if readout is None or readout.projections is None or not readout.personas:
            return None
        return plot(figures.heatmap_figure(readout, persona))

    def view_personas(self, readout: Readout | None, current: str | None) -> Any:
        """The tokens view's persona choices after a reply: the personas read out, and all of
        them at once; the current choice kept when it is still there."""
        names = list(readout.personas) if readout is not None else []
        choices = [*names, ALL_PERSONAS] if len(names) > 1 else names
        picked = list(readout.picked) if readout is not None else []
        default = picked[0] if len(picked) == 1 else (ALL_PERSONAS if picked else None)
        value = current if current in names else default or (names[0] if names else None)
        return gr.update(choices=choices, value=value)

    def layer_plot(
        self, model_id: str | None, personas: list[str] | None, vectors_from: str | None = None
    ) -> PlotData | None:
        """AUC and separation by layer of the picked personas (the first six when none)."""
        model_id = self.model_id(model_id)
        kind = vectors_from or ""
        try:
            names = list(personas or []) or self.backend.persona_names(model_id, kind)[:6]
            metrics = self.backend.layer_metrics(model_id, names, kind)
        except Exception as err:  # an unknown persona or layer, or a model that cannot load
            gr.Warning(str(err).strip("'\""))
            return None
        return plot(figures.layers_figure(metrics))

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
    ) -> PlotData:
        """PCA of the registered persona vectors at ``layer`` with this conversation's position;
        a bad request (the history's shape or size, the layer, a model that cannot load) is a
        ``gr.Error`` that says what is wrong (the plot stays as it was)."""
        model_id = self.model_id(model_id)
        at = int(layer or 0)
        try:
            check_history([] if history is None else history)
            names, vectors, point = self.backend.persona_space(
                model_id, history or [], at, vectors_from or ""
            )
        except Exception as err:  # an unknown persona or layer, or a model that cannot load
            raise gr.Error(self.backend.access.error(err).strip("'\"")) from None
        title = f"Persona space at layer {at} ({len(names)} vectors; ★ = this conversation)"
        return plot(figures.map_figure(names, vectors, point, title, tuple(personas or ())))

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
        view.model_id, view.dataset, view.personas, view.findings, view.seconds, view.plain
    )


def _analysis_images(view: AnalysisView) -> list[Any]:
    return [
        gr.update(
            value=PlotData(type="plotly", plot=view.figures[key]) if key in view.figures else None,
            visible=key in view.figures,
        )
        for key, _ in ANALYSIS_FIGURES
    ]
