"""The last reply's per-token readout: the one record the app carries from the model to the page.

When a reply ends, the backend turns the engine's ``personachat.chat.ReplyReadout`` (token ids,
a tensor) into a ``Readout`` (decoded tokens, numpy projections, the store's reference levels);
the last ``Step`` of the reply carries it, and the session keeps it in ``gr.State`` so the
inside view redraws at another layer or persona without the model. ``readout_html`` and
``readout_heatmap`` draw it with ``personachat.app.views``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from personachat.app import views

if TYPE_CHECKING:
    from personachat.chat import ReplyReadout

SCALED_UNIT = "0 = baseline mean, 1 = persona mean"
RAW_UNIT = "raw projection"


@dataclass(frozen=True, eq=False)
class Readout:
    """Per-token projections of the last exchange (prompt then reply) on persona vectors."""

    model_id: str = ""
    personas: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()
    n_prompt: int = 0
    # [tokens, layers, personas], raw projections; the last reply token is 0 (never fed back)
    projections: np.ndarray | None = None
    # [2, layers, personas]: the projections of the baseline mean (0) and of the persona's own
    # mean (1) from the store, so a token reads as "how far from baseline towards the persona";
    # None when the store has no raw means
    reference: np.ndarray | None = None

    @classmethod
    def from_reply(
        cls,
        model_id: str,
        reply: ReplyReadout,
        decode: Callable[[int], str],
        reference: np.ndarray | None,
    ) -> Readout:
        """The engine's readout with its tokens decoded one by one (NaN rows read as 0)."""
        values = np.nan_to_num(reply.projections.numpy().astype(np.float32), nan=0.0)
        tokens = tuple(decode(t) for t in reply.tokens)
        return cls(
            model_id, tuple(reply.personas), tokens, int(reply.prompt_len), values, reference
        )

    @property
    def scaled(self) -> bool:
        return self.reference is not None

    def values(self, persona: str | None, layer: int | None = None) -> np.ndarray | None:
        """Projections on ``persona`` [tokens, layers] (or [tokens] at ``layer``), rescaled so
        0 is the baseline persona's mean and 1 this persona's mean when the store has means."""
        if self.projections is None or not self.personas:
            return None
        index = self.personas.index(persona) if persona in self.personas else 0
        grid = self.projections[:, :, index]
        if self.reference is not None:
            zero, one = self.reference[0, :, index], self.reference[1, :, index]
            grid = (grid - zero) / np.maximum(one - zero, 1e-12)
        return grid if layer is None else grid[:, min(max(layer, 0), grid.shape[1] - 1)]


def readout_html(readout: Readout | None, layer: float, persona: str | None = None) -> str:
    """Coloured per-token projections at ``layer``, one row per persona (or ``persona``'s)."""
    if readout is None or readout.projections is None or not readout.personas:
        return views.empty_html("Send a message to see per-token projections.")
    n_layers = readout.projections.shape[1]
    at = min(max(int(layer or 0), 0), n_layers - 1)
    shown = [persona] if persona in readout.personas else list(readout.personas)
    unit = SCALED_UNIT if readout.scaled else RAW_UNIT
    rows = []
    for name in shown:
        values = readout.values(name, at)
        assert values is not None
        # scaled values: full colour at the persona's own mean (1) or beyond it
        scale = max(1.0, float(np.abs(values).max())) if readout.scaled else None
        caption = f"{name} at layer {at} ({unit}; red +, blue −; reply in bold)"
        rows.append(views.tokens_html(readout.tokens, values, readout.n_prompt, caption, scale))
    return "".join(rows)


def readout_heatmap(readout: Readout | None, persona: str | None = None) -> np.ndarray | None:
    """A token x layer heatmap of the projection on ``persona`` (the first one by default)."""
    if readout is None or readout.projections is None or not readout.personas:
        return None
    name = persona if persona in readout.personas else readout.personas[0]
    grid = readout.values(name)
    assert grid is not None
    unit = SCALED_UNIT if readout.scaled else RAW_UNIT
    title = f"{name}: token x layer ({unit}; line: end of prompt)"
    return views.heatmap_image(readout.tokens, grid, readout.n_prompt, title)
