"""Where things sit among the registered personas: the stored baseline means, the reference
levels of the inside view, and a conversation's point in persona space.

Every function reads the model's vectors through the ``Catalog`` (its chat engine) and the raw
means the store keeps beside them; a store without means answers None, and the page then shows
raw projections.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from personachat.app.catalog import Catalog
from personachat.app.limits import check_prompt_tokens


def baseline_mean(catalog: Catalog, model_id: str, vector: Any) -> np.ndarray | None:
    """The stored mean activation [layers, hidden] of ``vector``'s baseline (the mean of all
    personas' means for the ``mean`` baseline); None when the store has no raw means."""
    from personachat.records import MEAN_BASELINE

    store, store_id = catalog.store(), catalog.store_id(model_id)
    kind = vector.positions
    try:
        if vector.baseline == MEAN_BASELINE:
            names = [e.persona for e in store.means(store_id) if e.positions == kind]
            means = [store.load_means(store_id, n, positions=kind).mean for n in names]
            return np.stack([m.float().numpy() for m in means]).mean(0) if means else None
        return store.load_means(store_id, vector.baseline, positions=kind).mean.float().numpy()
    except (LookupError, RuntimeError):  # gone, or a StoreError: a missing or damaged file
        return None


def reference(
    catalog: Catalog, model_id: str, personas: Sequence[Any], kind: str = ""
) -> np.ndarray | None:
    """[2, layers, personas]: projections of the baseline mean and of the persona mean on
    each unit persona vector (persona mean = baseline + vector, so row 1 = row 0 + |v|);
    ``personas`` are names of ``kind``'s vectors or vector records."""
    engine = catalog.engine(model_id, kind)
    rows = []
    for name in personas:
        vector = engine.vectors[name] if isinstance(name, str) else name
        base = baseline_mean(catalog, model_id, vector)
        if base is None:
            return None
        v = vector.vector.float().numpy()
        norm = np.linalg.norm(v, axis=-1)
        zero = (base * v).sum(-1) / np.maximum(norm, 1e-12)
        rows.append(np.stack([zero, zero + norm]))
    return np.stack(rows, axis=-1) if rows else None


def persona_space(
    catalog: Catalog,
    model_id: str,
    messages: Sequence[dict[str, Any]],
    layer: int,
    kind: str = "",
) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """Registered vectors at ``layer`` [P, H] and the conversation's position in that space:
    its mean residual at ``layer`` minus the vectors' baseline mean (``None`` without means
    in the store or without a conversation)."""
    engine = catalog.engine(model_id, kind)
    lm = engine.lm
    lm.sites.check_layer(layer)
    names = sorted(engine.vectors)
    if not names:
        raise ValueError(f"no persona vectors for {model_id}; extract or register some first")
    vectors = np.stack([engine.vectors[n].vector[layer].float().numpy() for n in names])
    if not messages:
        return names, vectors, None
    baseline = baseline_mean(catalog, model_id, engine.vectors[names[0]])
    if baseline is None:
        return names, vectors, None
    return names, vectors, residual_mean(lm, messages, layer) - baseline[layer]


def residual_mean(lm: Any, messages: Sequence[dict[str, Any]], layer: int) -> np.ndarray:
    """The mean residual stream at ``layer`` over the tokens of ``messages`` (chat template);
    a conversation past ``BOUNDS.prompt_tokens`` is a ``BoundError``."""
    import torch

    from personachat.activations import Recorder, pad, run_forward
    from personachat.hooks import intervene
    from personachat.prompts import format_chat

    text = format_chat(lm.tokenizer, messages, add_generation_prompt=False)
    ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    check_prompt_tokens(int(ids.shape[1]))
    rec = Recorder.at("residual", [layer], stop=True)
    with torch.no_grad(), intervene(lm.sites, [rec]):
        run_forward(lm, pad([ids[0].tolist()], 0, "left", lm.device))
    return rec.get(layer)[0].mean(dim=0).cpu().numpy()
