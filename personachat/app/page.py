"""The Gradio page: layout, per-session state and thin handlers over the PersonaChat library.

``build_ui(backend)`` returns the ``gr.Blocks``; every action is a named endpoint (``api_name``)
so ``gradio_client`` can drive it. Handlers live on ``Handlers`` (plain methods, testable without
a browser): each parses its inputs with ``personachat.session`` and calls the ``Backend``. A bad
input never raises into Gradio: it shows a warning toast and a status line, and the chat goes on.

The ``Backend`` (``personachat.backend``: model + store + runtime) is shared by all sessions:
the model loads once, lazily, on first use. What differs per browser tab (settings, the last
readout) travels in ``gr.State`` or in the inputs themselves; steering is isolated per
request by the runtime (``personachat.hooks`` scopes hooks to the request's context).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from personachat.app import views
from personachat.app.analysis import ANALYSIS_FIGURES, AnalysisView
from personachat.app.backend import Backend
from personachat.app.generation import Step
from personachat.app.readout import Readout, readout_heatmap, readout_html
from personachat.app.settings import (
    ABLATION_MODES,
    ABLATION_POSITIONS,
    DIRECTION_MODES,
    NO_DIRECTION,
    POSITIONS,
    PRESETS,
    UNITS,
    ChatInputs,
    InputError,
    Settings,
    check_message,
    meant_positions,
    parse_number,
    parse_settings,
    patching_sets,
    preset_spec,
)

log = logging.getLogger(__name__)

STREAM_INTERVAL_S = 0.05  # at most 20 page updates a second while a reply streams
CSS = """
.pc-tokens { font-family: ui-monospace, monospace; font-size: 13px; line-height: 1.9; }
.pc-tok { display: inline-block; white-space: pre; padding: 1px 0; border-radius: 2px; }
.pc-reply { font-weight: 700; }
.pc-caption { font-size: 12px; opacity: 0.75; margin: 4px 0; }
"""


def theme() -> gr.themes.Base:
    """The page theme: Gradio's default (local fonts only, so no request leaves the machine)."""
    return gr.themes.Default(primary_hue="orange", secondary_hue="blue")


def gpu(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``spaces.GPU(fn)`` on a ZeroGPU Space (the ``spaces`` package is there), else ``fn``."""
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        return fn
    return spaces.GPU(fn)  # type: ignore[no-any-return]


Messages = list[dict[str, Any]]


def _text(message: dict[str, Any]) -> str:
    from personachat.prompts import message_text

    return message_text(message)


class Handlers:
    """Every page action as a method; Gradio calls these, tests call them directly."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._stops: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    # -- model and store -------------------------------------------------------------------

    def load(self, model_id: str | None) -> tuple[Any, ...]:
        """(Re)load the page's model view. Returns (model info, persona choices, neuron-set
        choices, extraction offer, layer slider, vector kinds, extraction dataset, direction
        choices, status)."""
        model_id = (model_id or self.backend.default_model).strip()
        try:
            info = self.backend.describe(model_id)
            personas = self.backend.persona_names(model_id)
            sets = self.backend.neuron_set_names(model_id)
            kinds = self.backend.vector_kinds(model_id)
            n_layers = self.backend.limits(model_id).n_layers
        except Exception as err:  # a model that cannot load must not break the page
            log.warning("cannot load %s: %s", model_id, err)
            message = f"⚠ Cannot load `{model_id}`: {err}"
            gr.Warning(message)
            empty = gr.update(choices=[], value=[])
            return (
                message,
                empty,
                empty,
                gr.update(visible=False),
                gr.update(),
                gr.update(),
                gr.update(),
                gr.update(choices=[NO_DIRECTION], value=NO_DIRECTION),
                message,
            )
        offer = not personas and self.backend.can_extract(model_id)
        return (
            info,
            gr.update(choices=personas, value=[]),
            gr.update(choices=sets, value=[]),
            gr.update(visible=offer),
            gr.update(maximum=max(n_layers - 1, 1), value=min(n_layers - 1, n_layers // 2)),
            gr.update(choices=kinds, value=kinds[0] if kinds else None),
            gr.update(value="demo" if self.backend.is_demo(model_id) else "personas"),
            gr.update(choices=[NO_DIRECTION, *personas], value=NO_DIRECTION),
            f"Model `{model_id}` ready: {len(personas)} personas, {len(sets)} neuron sets."
            + (" No persona vectors yet: extract them under 'Model and store'." if offer else ""),
        )

    def refresh(
        self,
        model_id: str | None,
        personas: list[str] | None,
        vectors_from: str | None = None,
        direction: str | None = None,
    ) -> tuple[Any, ...]:
        """Re-read the store (new personas registered by a script, removed ones gone). Returns
        (persona choices, neuron-set choices, direction choices, status)."""
        model_id = (model_id or self.backend.default_model).strip()
        try:
            self.backend.refresh()
            known = self.backend.persona_names(model_id, vectors_from or "")
            sets = self.backend.neuron_set_names(model_id)
        except Exception as err:  # the store or the model failed: say so, keep the page
            gr.Warning(f"Cannot re-read the store: {err}")
            return gr.update(), gr.update(), gr.update(), f"⚠ Cannot re-read the store: {err}"
        kept = [p for p in personas or [] if p in known]
        gone = sorted(set(personas or []) - set(known))
        note = f" No longer in the store: {', '.join(gone)}." if gone else ""
        return (
            gr.update(choices=known, value=kept),
            gr.update(choices=sets),
            gr.update(
                choices=[NO_DIRECTION, *known],
                value=direction if direction in known else NO_DIRECTION,
            ),
            f"Store re-read: {len(known)} personas for `{model_id}`.{note}",
        )

    def extract(
        self,
        model_id: str | None,
        dataset: str = "personas",
        positions: str = "question_span",
        personas: list[str] | None = None,
        neurons: bool = False,
        progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008 - Gradio's idiom
    ) -> tuple[Any, ...]:
        """Extract persona vectors from a built-in dataset (all personas, or those picked) and
        register them; a progress bar shows while it runs, then the page offers the personas."""
        model_id = (model_id or self.backend.default_model).strip()
        try:
            picked = tuple(personas or ())
            summary = self.backend.extract(model_id, dataset, positions, picked, bool(neurons))
        except Exception as err:
            log.exception("extraction failed")
            gr.Warning(f"Extraction failed: {err}")
            return (*[gr.update()] * 8, f"⚠ Extraction failed: {err}")
        loaded = self.load(model_id)
        return (*loaded[:8], summary)

    # -- personas and strength ------------------------------------------------------------

    def preset(
        self,
        model_id: str | None,
        personas: list[str] | None,
        preset: str,
        strength: object,
        vectors_from: str | None = None,
    ) -> tuple[Any, str]:
        """The layer spec of a preset around the first picked persona's best layer."""
        model_id = (model_id or self.backend.default_model).strip()
        if preset not in PRESETS[:3]:
            return gr.update(), "Custom: type strengths per layer."
        try:
            value = parse_number("Preset strength", strength)
            limits = self.backend.limits(model_id, vectors_from or "")
            best = self.backend.best_layer(model_id, tuple(personas or ()), vectors_from or "")
            spec = preset_spec(preset, value, best, limits.n_layers)
        except Exception as err:  # bad input, or a model that cannot load
            gr.Warning(str(err))
            return gr.update(), f"⚠ {err}"
        return spec, f"Preset {preset!r} (best layer {best}): `{spec}`"

    def blend_info(
        self,
        model_id: str | None,
        personas: list[str] | None,
        weights: str | None,
        layer_spec: str | None,
        units: str = "raw",
        vectors_from: str | None = None,
    ) -> str:
        """The blend as a formula, with the interference warning when the vectors overlap."""
        model_id = (model_id or self.backend.default_model).strip()
        try:
            settings = self._settings(
                model_id, personas, weights, layer_spec, units, vectors_from=vectors_from
            )
        except Exception as err:  # bad input, or a model that cannot load
            return f"⚠ {err}"
        if not settings.personas:
            return "No persona picked: the chat is unsteered."
        try:
            return self.backend.blend_summary(model_id, settings)
        except Exception as err:  # e.g. a vector removed meanwhile
            return f"⚠ {err}"

    def _settings(
        self,
        model_id: str,
        personas: Sequence[str] | None,
        weights: str | None,
        layer_spec: str | None,
        units: str = "raw",
        positions: str = "all",
        system_prompt: str | None = None,
        temperature: float | str = 0.0,
        max_new_tokens: float | str = 64,
        seed: float | str = 0,
        neuron_sets: Sequence[str] | None = None,
        neurons: str | None = None,
        ablation: str = "off",
        side_by_side: bool = False,
        vectors_from: str | None = None,
        last_n: float | str | None = 0,
        direction: str | None = NO_DIRECTION,
        direction_layers: str | None = "all",
        direction_mode: str = "mean",
        direction_positions: str = "all",
        ablation_positions: str = "all",
    ) -> Settings:
        inputs = ChatInputs(
            model_id,
            personas,
            weights,
            layer_spec,
            units,
            positions,
            system_prompt,
            temperature,
            max_new_tokens,
            seed,
            neuron_sets,
            neurons,
            ablation,
            side_by_side,
            vectors_from,
            last_n,
            direction,
            direction_layers,
            direction_mode,
            direction_positions,
            ablation_positions,
        )
        return parse_settings(self.backend.limits(model_id, vectors_from or ""), inputs)

    def neuron_sets_picked(self, sets: list[str] | None) -> tuple[Any, Any, Any]:
        """Picking a set found by patching at the prompt sets up the use it was found for: mean
        ablation at the prompt tokens. Returns (ablation mode, ablation positions, status);
        nothing changes for other sets."""
        found = patching_sets(sets or [])
        if not found:
            return gr.update(), gr.update(), gr.skip()
        where = meant_positions(found[-1])  # the last one picked decides
        words = "prompt tokens" if where == "prompt" else where
        return (
            "mean",
            where,
            f"{', '.join(found)}: found by patching at the prompt, so it is "
            f"ablated by its mean at the {words} (set 'Ablate' to off to stop).",
        )

    # -- chat ----------------------------------------------------------------------------------

    def _stop_event(self, request: gr.Request | None) -> tuple[str, threading.Event]:
        key = getattr(request, "session_hash", None) or uuid.uuid4().hex
        event = threading.Event()
        with self._lock:
            self._stops[key] = event
        log.debug("generation for session %s", key)
        return key, event

    def _forget(self, key: str, event: threading.Event) -> None:
        with self._lock:
            if self._stops.get(key) is event:
                del self._stops[key]

    def stop(self, request: gr.Request | None = None) -> str:
        """Stop this session's running generation; the partial reply is kept."""
        key = getattr(request, "session_hash", None)
        with self._lock:
            if key is None:  # an API call without a session: stop every generation
                events = list(self._stops.values())
            else:
                events = [self._stops[key]] if key in self._stops else []
        for event in events:
            event.set()
        log.debug("stop for session %s: %d generation(s)", key, len(events))
        return "Stopping…" if events else "Nothing is generating."

    def chat(
        self,
        message: str | None,
        history: Messages | None,
        side_history: Messages | None,
        model_id: str | None,
        personas: list[str] | None = None,
        weights: str | None = None,
        layer_spec: str | None = None,
        units: str = "raw",
        positions: str = "all",
        system_prompt: str | None = None,
        temperature: float | str = 0.0,
        max_new_tokens: float | str = 64,
        seed: float | str = 0,
        neuron_sets: list[str] | None = None,
        neurons: str | None = None,
        ablation: str = "off",
        side_by_side: bool = False,
        vectors_from: str | None = None,
        view_layer: float = 0,
        inside: Readout | None = None,
        last_n: float | str | None = 0,
        direction: str | None = NO_DIRECTION,
        direction_layers: str | None = "all",
        direction_mode: str = "mean",
        direction_positions: str = "all",
        ablation_positions: str = "all",
        request: gr.Request | None = None,
    ) -> Iterator[tuple[Any, ...]]:
        """Send ``message`` and stream the (steered) reply; yields
        (history, side_history, message box, status, tokens html, inside state).

        ``last_n`` (0: all) narrows ``positions="prompt"`` to the prompt's last tokens;
        ``direction`` names a persona whose direction is ablated in the residual stream at
        ``direction_layers`` ("none": nothing is), moved to the baseline's level
        (``direction_mode="mean"``) or projected out (``"zero"``), at ``direction_positions``;
        ``ablation_positions`` are the tokens the neuron ablation acts on."""
        history = list(history or [])
        side = list(side_history or [])
        model_id = (model_id or self.backend.default_model).strip()
        try:
            text = check_message(message)
            settings = self._settings(
                model_id,
                personas,
                weights,
                layer_spec,
                units,
                positions,
                system_prompt,
                temperature,
                max_new_tokens,
                seed,
                neuron_sets,
                neurons,
                ablation,
                side_by_side,
                vectors_from,
                last_n,
                direction,
                direction_layers,
                direction_mode,
                direction_positions,
                ablation_positions,
            )
        except Exception as err:
            yield self._refuse(err, history, side, message, inside)
            return
        yield from self._reply(model_id, settings, history, side, text, view_layer, request)

    def retry(
        self,
        history: Messages | None,
        side_history: Messages | None,
        model_id: str | None,
        personas: list[str] | None = None,
        weights: str | None = None,
        layer_spec: str | None = None,
        units: str = "raw",
        positions: str = "all",
        system_prompt: str | None = None,
        temperature: float | str = 0.0,
        max_new_tokens: float | str = 64,
        seed: float | str = 0,
        neuron_sets: list[str] | None = None,
        neurons: str | None = None,
        ablation: str = "off",
        side_by_side: bool = False,
        vectors_from: str | None = None,
        view_layer: float = 0,
        inside: Readout | None = None,
        last_n: float | str | None = 0,
        direction: str | None = NO_DIRECTION,
        direction_layers: str | None = "all",
        direction_mode: str = "mean",
        direction_positions: str = "all",
        ablation_positions: str = "all",
        request: gr.Request | None = None,
    ) -> Iterator[tuple[Any, ...]]:
        """Drop the last reply and generate it again with the current settings."""
        history, side, last = self._pop_turn(history, side_history)
        if last is None:
            yield self._refuse(InputError("Nothing to retry yet."), history, side, "", inside)
            return
        yield from self.chat(
            last,
            history,
            side,
            model_id,
            personas,
            weights,
            layer_spec,
            units,
            positions,
            system_prompt,
            temperature,
            max_new_tokens,
            seed,
            neuron_sets,
            neurons,
            ablation,
            side_by_side,
            vectors_from,
            view_layer,
            inside,
            last_n,
            direction,
            direction_layers,
            direction_mode,
            direction_positions,
            ablation_positions,
            request,
        )

    def undo(
        self, history: Messages | None, side_history: Messages | None
    ) -> tuple[Messages, Messages, str, str]:
        """Remove the last turn; its message goes back into the box."""
        history, side, last = self._pop_turn(history, side_history)
        if last is None:
            return history, side, "", "Nothing to undo."
        return history, side, last, "Last turn removed."

    def clear(self) -> tuple[Messages, Messages, str, str, Readout]:
        """Start a new conversation."""
        return [], [], "Conversation cleared.", views.empty_html("No reply yet."), Readout()

    @staticmethod
    def _pop_turn(
        history: Messages | None, side_history: Messages | None
    ) -> tuple[Messages, Messages, str | None]:
        history, side = list(history or []), list(side_history or [])
        users = [i for i, m in enumerate(history) if m.get("role") == "user"]
        if not users:
            return history, side, None
        last = _text(history[users[-1]])
        side_users = [i for i, m in enumerate(side) if m.get("role") == "user"]
        return history[: users[-1]], side[: side_users[-1]] if side_users else side, last

    def _refuse(
        self,
        err: BaseException,
        history: Messages,
        side: Messages,
        message: str | None,
        inside: Readout | None,
    ) -> tuple[Any, ...]:
        if not isinstance(err, InputError | ValueError | KeyError):
            log.exception("chat failed")
        # a KeyError's str() is its quoted repr; other messages may end in a quote ('zero')
        text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        text = text.strip() or type(err).__name__
        gr.Warning(text)
        return history, side, message or "", f"⚠ {text}", gr.skip(), inside or Readout()

    @gpu
    def _reply(
        self,
        model_id: str,
        settings: Settings,
        history: Messages,
        side: Messages,
        text: str,
        view_layer: float,
        request: gr.Request | None,
    ) -> Iterator[tuple[Any, ...]]:
        key, stop = self._stop_event(request)
        conversation = [*history, {"role": "user", "content": text}]
        try:
            steps = self.backend.generate(model_id, settings, conversation, stop)
        except Exception as err:  # checked before generation: nothing changed
            self._forget(key, stop)
            yield self._refuse(err, history, side, text, None)
            return
        history = [*conversation, {"role": "assistant", "content": ""}]
        side = [*side, {"role": "user", "content": text}]
        side.append({"role": "assistant", "content": "" if settings.side_by_side else "—"})
        status = self.backend.settings_summary(model_id, settings)
        yield history, side, "", f"Generating… {status}".strip(), gr.skip(), gr.skip()
        step: Step | None = None
        try:
            shown = -math.inf  # the first token always shows (monotonic may start near 0)
            for step in steps:
                history[-1] = {"role": "assistant", "content": step.text}
                if settings.side_by_side:
                    side[-1] = {"role": "assistant", "content": step.side_text or ""}
                # a page update per token floods the browser on a fast model (and then the
                # Stop button waits behind the renders): at most one update per interval
                if time.monotonic() - shown >= STREAM_INTERVAL_S or step.done:
                    shown = time.monotonic()
                    yield history, side, "", f"Generating… {status}".strip(), gr.skip(), gr.skip()
        except Exception as err:
            history = history[:-2]
            side = side[:-2]
            yield self._refuse(err, history, side, text, None)
            return
        finally:
            self._forget(key, stop)
        inside = (step.readout if step is not None else None) or Readout(model_id=model_id)
        done = "Stopped: partial reply kept." if stop.is_set() else "Done."
        if step is not None and step.dropped:
            done += f" ({step.dropped} oldest turns left out to fit the model's context.)"
        html = self.tokens(inside, view_layer)
        yield history, side, "", f"{done} {status}".strip(), html, inside

    # -- inside view ----------------------------------------------------------------------

    def tokens(self, inside: Readout | None, layer: float, persona: str | None = None) -> str:
        """Coloured per-token projections of the last exchange at ``layer`` (one row each)."""
        return readout_html(inside, layer, persona)

    def heatmap(self, inside: Readout | None, persona: str | None = None) -> np.ndarray | None:
        """A token x layer heatmap of the projection on ``persona`` (the first one by default)."""
        return readout_heatmap(inside, persona)

    def layer_plot(
        self, model_id: str | None, personas: list[str] | None, vectors_from: str | None = None
    ) -> np.ndarray | None:
        """AUC and separation by layer of the picked personas (the first six when none)."""
        model_id = (model_id or self.backend.default_model).strip()
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
        model_id = (model_id or self.backend.default_model).strip()
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
        model_id = (model_id or self.backend.default_model).strip()
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
        the analysis' tqdm bars: tracking those made it 10x slower (72 s vs 7 s measured)."""
        model_id = (model_id or self.backend.default_model).strip()
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


# -- layout -------------------------------------------------------------------------------------


def build_ui(backend: Backend, *, concurrency: int = 2) -> gr.Blocks:
    """The page. Nothing loads here: the model loads on the first event that needs it."""
    h = Handlers(backend)
    with gr.Blocks(title="PersonaChat", analytics_enabled=False) as demo:
        inside = gr.State(Readout())
        gr.Markdown(
            "# PersonaChat\nChat with a model while steering it with persona vectors, "
            "ablating persona neurons and watching the personas inside it."
        )
        with gr.Row():
            with gr.Column(scale=2, min_width=340):
                with gr.Accordion("Model and store", open=False):
                    model = gr.Dropdown(
                        choices=[backend.default_model],
                        value=backend.default_model,
                        allow_custom_value=True,
                        label="Model (hub name or local path)",
                    )
                    model_info = gr.Markdown(
                        "Loading the model…", label="Model", elem_id="model-info"
                    )
                    vectors_from = gr.Dropdown(
                        [],
                        value=None,
                        allow_custom_value=True,
                        label="Steer with vectors read from",
                        elem_id="vectors-from",
                    )
                    with gr.Group(visible=False) as extract_box:
                        gr.Markdown("This model has no persona vectors in the store yet.")
                        with gr.Row():
                            dataset = gr.Dropdown(_datasets(), value="personas", label="Dataset")
                            extract_positions = gr.Dropdown(
                                ["question_span", "prompt_last", "prompt_avg", "response_avg"],
                                value="question_span",
                                label="Read from",
                            )
                        extract_personas = gr.Dropdown(
                            _dataset_personas("personas"),
                            multiselect=True,
                            allow_custom_value=True,  # choices follow the dataset picked
                            elem_id="extract-personas",
                            label="Only these personas (empty: all; quicker with few)",
                        )
                        extract_neurons = gr.Checkbox(
                            value=False,
                            label="Also find persona neurons (patching, top 32 per pair)",
                            elem_id="extract-neurons",
                        )
                        extract_btn = gr.Button("Extract and register", elem_id="extract")
                    refresh_btn = gr.Button("Refresh from the store", size="sm")
                with gr.Accordion("Personas and strength", open=True):
                    personas = gr.Dropdown(
                        choices=[],
                        multiselect=True,
                        allow_custom_value=True,  # checked against the store by the handlers
                        label="Personas to blend",
                        elem_id="personas",
                    )
                    weights = gr.Textbox(
                        label="Blend weights (negative allowed)",
                        placeholder="1, -0.5   or   pirate=1, cynic=-0.5   (empty: 1 each)",
                        elem_id="weights",
                    )
                    blend = gr.Markdown(
                        "No persona picked: the chat is unsteered.", label="Blend", elem_id="blend"
                    )
                    with gr.Row():
                        preset = gr.Radio(
                            list(PRESETS), value="band", label="Preset", elem_id="preset"
                        )
                        strength = gr.Number(value=2.0, label="Preset strength", elem_id="strength")
                    layer_spec = gr.Textbox(
                        label="Strength per layer",
                        placeholder="layer or range : strength, e.g. 1-3:4, 5:2 (or all:2)",
                        elem_id="layer-spec",
                    )
                    with gr.Row():
                        units = gr.Radio(list(UNITS), value="raw", label="Units")
                        # prompt positions steer the demo model fully with its content kept
                        positions = gr.Radio(
                            list(POSITIONS),
                            value="prompt",
                            label="Add at tokens",
                            elem_id="positions",
                        )
                        last_n = gr.Number(
                            value=0,
                            label="Last n prompt tokens (with 'prompt'; 0 = the whole prompt)",
                            elem_id="last-n",
                        )
                with gr.Accordion("Generation", open=False):
                    system_prompt = gr.Textbox(label="System prompt", lines=2, elem_id="system")
                    with gr.Row():
                        temperature = gr.Number(value=0.0, label="Temperature (0 = greedy)")
                        max_tokens = gr.Number(
                            value=64, label="Max tokens", precision=0, elem_id="max-tokens"
                        )
                        seed = gr.Number(value=0, label="Seed", precision=0)
                    side_by_side = gr.Checkbox(
                        value=False, label="Side by side with the unsteered reply", elem_id="sbs"
                    )
                with gr.Accordion("Neurons", open=False):
                    neuron_sets = gr.Dropdown(
                        choices=[],
                        multiselect=True,
                        allow_custom_value=True,  # checked against the store by the handlers
                        label="Neuron sets",
                        elem_id="neuron-sets",
                    )
                    neurons = gr.Textbox(
                        label="Or type neurons",
                        placeholder="layer:index, e.g. 1:12, 1:40-45",
                        elem_id="neurons",
                    )
                    with gr.Row():
                        ablation = gr.Radio(
                            list(ABLATION_MODES), value="off", label="Ablate", elem_id="ablation"
                        )
                        # sets found by patching switch this (and 'mean') to where they act
                        ablation_positions = gr.Radio(
                            list(ABLATION_POSITIONS),
                            value="all",
                            label="Ablate at tokens",
                            elem_id="ablation-positions",
                        )
                with gr.Accordion("Directional ablation", open=False):
                    with gr.Row():
                        direction = gr.Dropdown(
                            choices=[NO_DIRECTION],
                            value=NO_DIRECTION,
                            allow_custom_value=True,  # checked against the store by the runtime
                            label="Ablate the direction of",
                            elem_id="direction",
                        )
                        direction_layers = gr.Textbox(
                            value="all",
                            label="Direction layers",
                            placeholder="all, or layers and ranges, e.g. 0-2, 5",
                            elem_id="direction-layers",
                        )
                    with gr.Row():
                        direction_mode = gr.Radio(
                            [(words, mode) for mode, words in DIRECTION_MODES.items()],
                            value="mean",
                            label="Move its component",
                            elem_id="direction-mode",
                        )
                        direction_positions = gr.Radio(
                            list(POSITIONS),
                            value="all",
                            label="At tokens",
                            elem_id="direction-positions",
                        )
            with gr.Column(scale=3, min_width=420):
                with gr.Row():
                    chatbot = gr.Chatbot(label="Chat", height=380, elem_id="chat")
                    side_chat = gr.Chatbot(
                        label="Unsteered (same conversation)",
                        height=380,
                        visible=False,
                        elem_id="side-chat",
                    )
                message = gr.Textbox(
                    placeholder="Type a message and press Enter",
                    label="Message",
                    show_label=False,
                    elem_id="message",
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send", min_width=60)
                    stop = gr.Button("Stop", variant="stop", elem_id="stop", min_width=60)
                    retry = gr.Button("Retry", elem_id="retry", min_width=60)
                    undo = gr.Button("Undo", elem_id="undo", min_width=60)
                    clear = gr.Button("Clear", elem_id="clear", min_width=60)
                status = gr.Markdown("", label="Status", elem_id="status")
                with gr.Tabs():
                    with gr.Tab("Tokens"):
                        with gr.Row():
                            view_layer = gr.Slider(
                                0, 1, value=0, step=1, label="Layer", elem_id="view-layer"
                            )
                            view_persona = gr.Dropdown(
                                choices=[], allow_custom_value=True, label="Heatmap persona"
                            )
                        tokens_view = gr.HTML(
                            views.empty_html("No reply yet."),
                            label="Per-token projections",
                            elem_id="tokens",
                        )
                        heatmap = gr.Image(
                            label="Token x layer",
                            interactive=False,
                            type="numpy",
                            elem_id="heatmap",
                        )
                    with gr.Tab("Layers"):
                        layers_btn = gr.Button("Plot AUC / separation by layer", size="sm")
                        layers_plot = gr.Image(label="Per-layer quality", interactive=False)
                    with gr.Tab("Persona map"):
                        map_btn = gr.Button("Map this conversation", size="sm")
                        map_plot = gr.Image(label="Persona space (PCA)", interactive=False)
                    with gr.Tab("Store"):
                        store_btn = gr.Button("Load tables", size="sm")
                        t_personas = gr.Dataframe(label="Personas", interactive=False)
                        t_models = gr.Dataframe(label="Models", interactive=False)
                        t_metrics = gr.Dataframe(label="Vectors (at best layer)", interactive=False)
                        t_neurons = gr.Dataframe(label="Neuron sets", interactive=False)
                    with gr.Tab("Analysis"):
                        with gr.Row():
                            analysis_personas = gr.Dropdown(
                                _dataset_personas(
                                    "demo" if backend.is_demo(backend.default_model) else "personas"
                                ),
                                multiselect=True,
                                allow_custom_value=True,  # checked by the analysis
                                label="Only these personas (empty: all; quicker with few)",
                                elem_id="analysis-personas",
                                scale=3,
                            )
                            analysis_btn = gr.Button(
                                "Run analysis", elem_id="run-analysis", scale=1
                            )
                        analysis_text = gr.Markdown(
                            "Persona collapse, persona probe, activation patching and persona "
                            "space of the current model (as `scripts/analyze.py` reports them). "
                            "It runs once per model; later sessions see the same result.",
                            elem_id="analysis",
                        )
                        analysis_images = [
                            gr.Image(label=label, interactive=False, visible=False, type="numpy")
                            for _, label in ANALYSIS_FIGURES
                        ]

        settings = [
            model,
            personas,
            weights,
            layer_spec,
            units,
            positions,
            system_prompt,
            temperature,
            max_tokens,
            seed,
            neuron_sets,
            neurons,
            ablation,
            side_by_side,
            vectors_from,
            view_layer,
            inside,
            last_n,  # new inputs go last, so API calls by position keep working
            direction,
            direction_layers,
            direction_mode,
            direction_positions,
            ablation_positions,
        ]
        chat_out = [chatbot, side_chat, message, status, tokens_view, inside]
        load_out = [
            model_info,
            personas,
            neuron_sets,
            extract_box,
            view_layer,
            vectors_from,
            dataset,
            direction,
            status,
        ]

        demo.load(h.load, [model], load_out, api_name="load_model")
        model.input(h.load, [model], load_out, api_visibility="private")
        refresh_btn.click(
            h.refresh,
            [model, personas, vectors_from, direction],
            [personas, neuron_sets, direction, status],
            api_name="refresh",
        )
        extract_btn.click(
            h.extract,
            [model, dataset, extract_positions, extract_personas, extract_neurons],
            load_out,
            api_name="extract",
            concurrency_limit=1,
        )
        dataset.change(
            lambda name: gr.update(choices=_dataset_personas(name), value=[]),
            dataset,
            extract_personas,
            api_visibility="private",
        )
        vectors_from.input(
            h.refresh,
            [model, personas, vectors_from, direction],
            [personas, neuron_sets, direction, status],
            api_visibility="private",
        )
        preset_in = [model, personas, preset, strength, vectors_from]
        preset.change(h.preset, preset_in, [layer_spec, blend], api_name="preset")
        strength.submit(h.preset, preset_in, [layer_spec, blend], api_visibility="private")
        blend_in = [model, personas, weights, layer_spec, units, vectors_from]
        # picking personas re-applies the preset around their best layer, then shows the blend
        personas.change(h.preset, preset_in, [layer_spec, blend], api_visibility="private").then(
            h.blend_info, blend_in, blend, api_name="blend_info"
        )
        layer_spec.input(lambda: "custom", None, preset, api_visibility="private")
        for trigger in (weights.change, layer_spec.change, units.change):
            trigger(h.blend_info, blend_in, blend, api_visibility="private", show_progress="hidden")
        side_by_side.change(_visible, side_by_side, side_chat, api_visibility="private")
        neuron_sets.input(
            h.neuron_sets_picked,
            neuron_sets,
            [ablation, ablation_positions, status],
            api_visibility="private",
        )

        run: dict[str, Any] = {"concurrency_limit": concurrency, "concurrency_id": "generate"}
        sent = [
            send.click(
                h.chat, [message, chatbot, side_chat, *settings], chat_out, api_name="chat", **run
            ),
            message.submit(
                h.chat,
                [message, chatbot, side_chat, *settings],
                chat_out,
                api_visibility="private",
                **run,
            ),
            retry.click(
                h.retry, [chatbot, side_chat, *settings], chat_out, api_name="retry", **run
            ),
        ]
        view_persona.input(h.heatmap, [inside, view_persona], heatmap, api_name="heatmap")
        for event in sent:
            event.then(
                _persona_choices, [inside, view_persona], view_persona, api_visibility="private"
            ).then(h.heatmap, [inside, view_persona], heatmap, api_visibility="private")
        # the reply's own last update says "Stopped"; the stop result goes to a hidden box so it
        # cannot arrive after (and overwrite) that status
        stopped = gr.Textbox(visible=False, label="Stop")
        stop.click(h.stop, None, stopped, api_name="stop", concurrency_limit=None, queue=False)
        undo.click(
            h.undo, [chatbot, side_chat], [chatbot, side_chat, message, status], api_name="undo"
        )
        clear.click(
            h.clear, None, [chatbot, side_chat, status, tokens_view, inside], api_name="clear"
        )
        view_layer.change(h.tokens, [inside, view_layer], tokens_view, api_name="tokens")
        layers_btn.click(
            h.layer_plot, [model, personas, vectors_from], layers_plot, api_name="layer_plot"
        )
        map_btn.click(
            h.persona_map,
            [model, chatbot, view_layer, personas, vectors_from],
            map_plot,
            api_name="persona_map",
        )
        store_btn.click(
            h.store_tables,
            [model],
            [t_personas, t_models, t_metrics, t_neurons],
            api_name="store_tables",
        )
        analysis_btn.click(
            h.analysis,
            [model, analysis_personas],
            [analysis_text, *analysis_images],
            api_name="analysis",
            concurrency_limit=1,
            concurrency_id="analysis",
        )
    return demo


def _findings(view: AnalysisView) -> str:
    return views.findings_markdown(
        view.model_id, view.dataset, view.personas, view.findings, view.seconds
    )


def _analysis_images(view: AnalysisView) -> list[Any]:
    return [
        gr.update(value=view.figures.get(key), visible=key in view.figures)
        for key, _ in ANALYSIS_FIGURES
    ]


def _visible(on: bool) -> Any:
    return gr.update(visible=bool(on))


def _persona_choices(inside: Readout | None, current: str | None) -> Any:
    names = list(inside.personas) if inside is not None else []
    return gr.update(
        choices=names, value=current if current in names else (names[0] if names else None)
    )


# The built-in datasets are read as plain JSON here (their documented format), so building the
# page does not import torch through personachat.datasets: the page is up sooner.
DATA_DIR = Path(__file__).resolve().parents[1] / "prompts" / "data"


def _datasets() -> list[str]:
    return ["demo", *sorted(p.stem for p in DATA_DIR.glob("*.json"))]


def _dataset_personas(name: str) -> list[str]:
    path = DATA_DIR / f"{name}.json"
    if name == "demo":  # the bundled demo model's corpus (personachat.demo)
        from personachat.prompts.demo import PERSONA_NAMES

        return list(PERSONA_NAMES)
    if name not in _datasets():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    return [str(p["name"]) for p in data.get("personas", [])]
