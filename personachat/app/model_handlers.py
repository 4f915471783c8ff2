"""The page's model and store actions: load a model's view, re-read the store, extract vectors."""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from personachat.app import recipes
from personachat.app.handler_base import HandlerBase
from personachat.app.panels import dataset_personas
from personachat.app.public import Access, bearer
from personachat.app.recipes import DEMO_PERSONA
from personachat.app.settings import NO_DIRECTION

log = logging.getLogger(__name__)

LOAD_OUTPUTS = 17  # what ``load`` returns
DIRECTION_KIND = "prompt_last"  # the direction that removes a persona on the demo model


class ModelHandlers(HandlerBase):
    """Load a model's view, re-read the store, extract and register vectors."""

    def load(self, model_id: str | None) -> tuple[Any, ...]:
        """(Re)load the page's model view. Returns (model info, persona choices (the demo model:
        its pirate picked), neuron-set choices, extraction offer, layer slider, vector kinds,
        extraction dataset, direction choices, direction kinds, the note on the model, example
        prompts, the recipes, the analysis' personas, the vector download's personas and kinds,
        side by side (on for the demo model), status)."""
        model_id = self.model_id(model_id)
        try:
            info = self.backend.access.scrub(self.backend.describe(model_id))
            personas = self.backend.persona_names(model_id)
            sets = self.backend.neuron_set_names(model_id)
            kinds = self.backend.vector_kinds(model_id)
            n_layers = self.backend.limits(model_id).n_layers
            problems = self.backend.problems(model_id)
        except Exception as err:  # a model that cannot load must not break the page
            return self._not_loaded(self.backend.access.scrub(model_id), err, self.backend.access)
        demo = self.backend.is_demo(model_id)
        examples = recipes.examples(demo)
        offer = not personas and self.backend.can_extract(model_id)
        picked = [DEMO_PERSONA] if demo and DEMO_PERSONA in personas else []
        steer_kind = kinds[0] if kinds else None
        direction_kind = DIRECTION_KIND if DIRECTION_KIND in kinds else steer_kind
        status = f"Model `{model_id}` ready: {len(personas)} personas, {len(sets)} neuron sets." + (
            " No persona vectors yet: extract them under 'Model and store'." if offer else ""
        )
        if problems:
            gr.Warning(" ".join(problems))
            status += " ⚠ " + " ".join(problems)
        return (
            info,
            gr.update(choices=personas, value=picked),
            gr.update(choices=sets, value=[]),
            gr.update(visible=offer),
            gr.update(maximum=max(n_layers - 1, 1), value=min(n_layers - 1, n_layers // 2)),
            gr.update(choices=kinds, value=steer_kind),
            gr.update(value="demo" if demo else "personas"),
            gr.update(choices=[NO_DIRECTION, *personas], value=NO_DIRECTION),
            gr.update(choices=kinds, value=direction_kind),
            recipes.note(demo),
            gr.update(
                samples=[[text] for text, _ in examples],
                sample_labels=[label for _, label in examples],
                label="Tell me about…" if demo else "Try",
            ),
            gr.update(visible=demo),
            gr.update(choices=dataset_personas("demo" if demo else "personas"), value=[]),
            gr.update(choices=personas, value=picked[0] if picked else None),
            gr.update(choices=kinds, value=steer_kind),
            demo,
            status,
        )

    @staticmethod
    def _not_loaded(model_id: str, err: Exception, access: Access) -> tuple[Any, ...]:
        """``load``'s results for a model that cannot load: the reason, no choices."""
        log.warning("cannot load %s: %s", model_id, err)
        message = f"⚠ Cannot load `{model_id}`: {access.error(err)}"
        gr.Warning(message)
        empty = gr.update(choices=[], value=[])
        direction = gr.update(choices=[NO_DIRECTION], value=NO_DIRECTION)
        hidden = gr.update(visible=False)
        return (
            message,
            empty,
            empty,
            hidden,
            *[gr.update()] * 3,
            direction,
            *[gr.update()] * 8,
            message,
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
        model_id = self.model_id(model_id)
        try:
            self.backend.refresh()
            known = self.backend.persona_names(model_id, vectors_from or "")
            sets = self.backend.neuron_set_names(model_id)
        except Exception as err:  # the store or the model failed: say so, keep the page
            text = self.backend.access.error(err)
            gr.Warning(f"Cannot re-read the store: {text}")
            return gr.update(), gr.update(), gr.update(), f"⚠ Cannot re-read the store: {text}"
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
        admin_token: str = "",
        progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008 - Gradio's idiom
        request: gr.Request | None = None,
    ) -> tuple[Any, ...]:
        """Extract persona vectors from a built-in dataset (all personas, or those picked) and
        register them; a progress bar shows while it runs, then the page offers the personas.
        On a public server it needs the admin token (``admin_token`` or the request's bearer)."""
        model_id = self.model_id(model_id)
        try:
            self.backend.access.check_admin(bearer(request) or admin_token, "Extraction")
            picked = tuple(personas or ())
            summary = self.backend.extract(model_id, dataset, positions, picked, bool(neurons))
        except Exception as err:
            log.exception("extraction failed")
            text = self.backend.access.error(err)
            gr.Warning(f"Extraction failed: {text}")
            return (*[gr.update()] * (LOAD_OUTPUTS - 1), f"⚠ Extraction failed: {text}")
        loaded = self.load(model_id)
        return (*loaded[:-1], summary)
