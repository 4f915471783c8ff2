"""Calibrated readouts: which vectors a turn reads out (the picked personas' and the model's
assistant axis), each vector's reference distribution, and the turn pooled the way each vector
was read.

A projection reads three ways:

- raw: the residual stream along the unit vector at that layer;
- scaled: 0 = the baseline's mean, 1 = the persona's mean (the store's raw means);
- percentile (0-100): its rank among the reference samples at that layer
  (``personachat.vectors.percentile_rank`` on the vector's ``ProjectionQuantiles``).

The reference is the samples of the normal assistant: a persona vector's baseline samples (the
``default`` persona's for vectors read against it), but for the assistant axis, whose stored
baseline is the role personas, its ``persona`` side: the neutral, default-assistant samples.
So for both 50 is the typical assistant, and a persona pulling away shows as a rank outside
the normal band. Vectors registered without quantiles read raw and scaled only.

A turn's value pools the readout the way the vector was read (``ReplyReadout.pooled`` by its
positions kind: the question span of the last user turn, the last prompt token, the prompt or
the reply), so it compares like with like with the reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from personachat.app.catalog import Catalog
from personachat.app.readout import AXIS, Readout, Reference

# the assistant axis' kinds, preferred first: the last prompt token's holds the demo model's
# personas; the question span's holds none (its model card)
AXIS_KINDS = ("prompt_last", "question_span", "prompt_avg", "response_avg")
AXIS_METHODS = ("axis_means", "axis_pc1")
NO_AXIS = (
    "the store has no assistant axis for this model: register it (the Store tab's 'Register "
    "the assistant axis', or scripts/register_axis.py)"
)


def is_axis(vector: Any) -> bool:
    return bool(vector.persona == AXIS or vector.method in AXIS_METHODS)


def reference_side(vector: Any) -> str:
    """Which side of ``vector``'s quantiles is the normal assistant: "persona" for the
    assistant axis (its neutral samples), else "baseline"."""
    return "persona" if is_axis(vector) else "baseline"


def reference_words(vector: Any) -> str:
    """Whose samples ``vector``'s percentiles rank among, in words."""
    if is_axis(vector):
        return "the default assistant's own samples (the axis' persona side; its baseline: roles)"
    if vector.baseline == "mean":
        return "the other personas' samples (a vector against the mean of all)"
    return f"{vector.baseline}'s samples"


def reference(vector: Any) -> Reference:
    """``vector``'s calibration: its kind, best layer and reference quantiles (None when it
    was registered without them)."""
    best = vector.metrics.best_layer if vector.metrics is not None else 0
    quantiles = None
    if vector.quantiles is not None:
        side = reference_side(vector)
        table = vector.quantiles.persona if side == "persona" else vector.quantiles.baseline
        quantiles = table.double().numpy()
    return Reference(
        vector.positions, best, quantiles, reference_side(vector), reference_words(vector)
    )


def axis_vector(catalog: Catalog, model_id: str) -> Any:
    """The model's assistant axis from the store (the kind ``AXIS_KINDS`` prefers), or None."""
    store_id = catalog.store_id(model_id)
    have = {e.positions for e in catalog.store().vectors(store_id, AXIS)}
    for kind in [k for k in AXIS_KINDS if k in have] + sorted(have - set(AXIS_KINDS)):
        vector = catalog.engine(model_id, kind).vectors.get(AXIS)
        if vector is not None:
            return vector
    return None


def with_axis(engine: Any, axis: Any) -> Any:
    """``engine``, or an engine for this request whose ``AXIS`` is ``axis`` (the model's own
    assistant axis, when the steering kind's vectors lack it or hold another kind's)."""
    if engine.vectors.get(AXIS) is axis:
        return engine
    return engine.with_vectors({AXIS: axis})  # the same model, sets and shared scheduler


@dataclass(frozen=True)
class Calibrator:
    """What a finished reply's ``Readout`` is calibrated with: one ``Reference`` per vector
    read out, and where the last user turn's question span starts with the prompt's length
    (None: unknown)."""

    references: tuple[Reference, ...]
    question: tuple[int, int] | None

    def __call__(self, readout: Readout, reply: Any) -> Readout:
        """``readout`` with its references and the turn pooled as each vector was read."""
        if len(self.references) != len(readout.personas):
            return readout
        start = None
        if self.question is not None and self.question[1] == reply.prompt_len:
            start = self.question[0]
        columns = []
        for k, ref in enumerate(self.references):
            if ref.positions == "question_span" and start is None:
                columns.append(np.full(len(reply.layers), np.nan))
                continue
            pooled = reply.pooled(ref.positions, start)
            columns.append(pooled[:, k].double().numpy())
        turn = np.stack(columns, axis=1)
        return dataclasses.replace(readout, references=self.references, turn=turn)


def read_vectors(
    catalog: Catalog, model_id: str, engine: Any, names: Sequence[str], lm: Any, messages: Any
) -> tuple[list[Any], Calibrator]:
    """What a turn reads out (``names``, and the model's assistant axis when the store has it)
    and its ``Calibrator`` for the prompt ``messages``. An engine that cannot read out reads
    nothing, not even the axis."""
    if not getattr(engine, "reads_out", True):
        return [], Calibrator((), None)
    axis = axis_vector(catalog, model_id)
    if axis is not None and axis.baseline_mean is None:
        axis = None  # without its baseline's mean it would take the scaled readout away
    chosen: list[Any] = [axis if n == AXIS and axis is not None else n for n in names]
    if axis is not None and AXIS not in names:
        chosen.append(axis)
    records = [engine.vectors[c] if isinstance(c, str) else c for c in chosen]
    return chosen, Calibrator(tuple(reference(r) for r in records), question_span(lm, messages))


def question_span(lm: Any, messages: Any) -> tuple[int, int] | None:
    """(where the last user turn's question span starts, the prompt's length in tokens) for
    the prompt of ``messages``; None when the template's rendering cannot be located."""
    from personachat.prompts import chat_spans

    try:
        spans = chat_spans(lm.tokenizer, messages)
    except ValueError:
        return None
    return int(spans.question[0]), len(spans.input_ids)
