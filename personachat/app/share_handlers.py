"""The page's sharing actions: a link to the settings and the settings a link restores, the
conversation as a JSON file, a stored vector as a file, and a readout's numbers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gradio as gr

from personachat.app import export
from personachat.app.handler_base import HandlerBase, Messages
from personachat.app.readout import Readout
from personachat.app.share import SHARED, parse_query, share_query

log = logging.getLogger(__name__)


class ShareHandlers(HandlerBase):
    """Share, restore, download the conversation or a vector, the numbers of a readout."""

    def share(self, *values: Any) -> Any:
        """The query of a link to the settings (``values`` in ``SHARED`` order); the page adds
        its own address in front."""
        return gr.update(value=share_query(dict(zip(SHARED, values, strict=True))), visible=True)

    def restore(self, request: gr.Request | None = None) -> tuple[Any, ...]:
        """The settings the page's link names, in ``SHARED`` order (untouched ones skipped),
        then the status line."""
        params = dict(getattr(request, "query_params", None) or {})
        values = parse_query(params)
        if not values:
            return (*[gr.skip() for _ in SHARED], gr.skip())
        note = f"Settings restored from the link ({len(values)} values)."
        return (*[values.get(name, gr.skip()) for name in SHARED], note)

    def readout_numbers(self, readout: Readout | None) -> dict[str, Any]:
        """The last reply's numbers: tokens, and per persona every token's projection at every
        layer (raw, and scaled when the store has the means); null where the model never saw
        the token."""
        return export.readout_numbers(readout)

    def conversation_file(
        self,
        history: Messages | None,
        side: Messages | None,
        prompted: Messages | None,
        readout: Readout | None,
    ) -> Any:
        """The conversation with its settings and per-token projections as a JSON file (the
        download button's value; disabled while the conversation is empty)."""
        path = export.conversation_file(history or [], side or [], prompted or [], readout)
        return gr.update(value=str(path) if path else None, interactive=path is not None)

    def vector_file(
        self, model_id: str | None, persona: str | None, kind: str | None, suffix: str
    ) -> str | None:
        """A stored vector as a ``.safetensors`` or ``.gguf`` file to download."""
        model_id = self.model_id(model_id)
        try:
            if not persona:
                raise ValueError("pick a persona whose vector to export")
            store_id = self.backend.store_id(model_id)
            path = export.vector_file(self.backend.store(), store_id, persona, kind or "", suffix)
        except Exception as err:  # an unknown persona or kind, a format that cannot hold it
            gr.Warning(f"Cannot export the vector: {err}")
            return None
        return str(Path(path))
