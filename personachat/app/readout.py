"""The last reply's per-token readout: the one record the app carries from the model to the page.

When a reply ends, the backend turns the engine's ``personachat.chat.ReplyReadout`` (token ids,
a tensor) into a ``Readout`` (decoded tokens, numpy projections, the store's reference levels,
which personas were picked and which tokens were steered); the last ``Step`` of the reply
carries it, and the session keeps it in ``gr.State`` so the inside view redraws at another
layer or persona without the model. ``readout_html`` draws it with ``personachat.app.views``;
``personachat.app.figures`` draws its heatmap and ``personachat.app.export`` writes its numbers.

A token without a projection (the last reply token, never fed back through the model) stays
NaN all the way: it is drawn uncoloured and written as null.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from personachat.app import views

if TYPE_CHECKING:
    from personachat.chat import ReplyReadout

SCALED_UNIT = "0 = baseline mean, 1 = persona mean"
RAW_UNIT = "raw projection"
ALL_PERSONAS = "all personas"  # the tokens view's choice of every persona read out
CLIP_PERCENTILE = 98.0  # the colour scale's full colour: this percentile of |value|


@dataclass(frozen=True, eq=False)
class Readout:
    """Per-token projections of the last exchange (prompt then reply) on persona vectors."""

    model_id: str = ""
    personas: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()
    n_prompt: int = 0
    # [tokens, layers, personas], raw projections; NaN where the model never saw the token
    projections: np.ndarray | None = None
    # [2, layers, personas]: the projections of the baseline mean (0) and of the persona's own
    # mean (1) from the store, so a token reads as "how far from baseline towards the persona";
    # None when the store has no raw means
    reference: np.ndarray | None = None
    picked: tuple[str, ...] = ()  # the personas the turn steered with (shown by default)
    steered: tuple[int, int] | None = None  # the tokens [first, last) steering was added at
    settings: Mapping[str, Any] = field(default_factory=dict)  # the page's inputs of the turn

    @classmethod
    def from_reply(
        cls,
        model_id: str,
        reply: ReplyReadout,
        decode: Callable[[int], str],
        reference: np.ndarray | None,
        picked: Sequence[str] = (),
        steered: tuple[int, int] | None = None,
    ) -> Readout:
        """The engine's readout with its tokens decoded one by one (NaN rows stay NaN)."""
        values = reply.projections.numpy().astype(np.float32)
        tokens = tuple(decode(t) for t in reply.tokens)
        return cls(
            model_id,
            tuple(reply.personas),
            tokens,
            int(reply.prompt_len),
            values,
            reference,
            tuple(p for p in picked if p in reply.personas),
            steered,
        )

    @property
    def scaled(self) -> bool:
        return self.reference is not None

    @property
    def unit(self) -> str:
        return SCALED_UNIT if self.scaled else RAW_UNIT

    def shown(self, persona: str | None = None) -> list[str]:
        """The personas a view shows: ``persona`` (or all, with ``ALL_PERSONAS``), else the
        picked ones, else the first one read out."""
        if persona in self.personas:
            return [str(persona)]
        if persona == ALL_PERSONAS:
            return list(self.personas)
        return list(self.picked) or list(self.personas[:1])

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

    def colour_limit(self, values: np.ndarray) -> float:
        """Full colour for ``values`` [tokens, ...]: the ``CLIP_PERCENTILE``-th percentile of
        |value| over the tokens steering was not added at (all tokens when it was added at
        every one), at least 1 on the scaled readout (the persona's own mean)."""
        keep = np.ones(values.shape[0], dtype=bool)
        if self.steered is not None:
            keep[self.steered[0] : self.steered[1]] = False
        chosen = values[keep] if keep.any() else values
        finite = np.abs(chosen[np.isfinite(chosen)])
        limit = float(np.percentile(finite, CLIP_PERCENTILE)) if finite.size else 0.0
        if self.scaled:
            limit = max(1.0, limit)
        return limit if limit > 0 else 1.0


def readout_html(readout: Readout | None, layer: float, persona: str | None = None) -> str:
    """Coloured per-token projections at ``layer``, one row per persona shown (the picked ones
    by default; ``persona`` or ``ALL_PERSONAS`` to choose)."""
    if readout is None or readout.projections is None or not readout.personas:
        return views.empty_html("Send a message to see per-token projections.")
    n_layers = readout.projections.shape[1]
    at = min(max(int(layer or 0), 0), n_layers - 1)
    rows = []
    for name in readout.shown(persona):
        values = readout.values(name, at)
        assert values is not None
        scale = readout.colour_limit(values)
        caption = (
            f"{name} at layer {at} ({readout.unit}; red +, blue −, full colour at "
            f"±{scale:.3g}; reply in bold; grey: no projection)"
        )
        rows.append(views.tokens_html(readout.tokens, values, readout.n_prompt, caption, scale))
    return "".join(rows)
