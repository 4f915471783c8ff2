"""What the page reads about registered vectors: the best layer of a persona, quality by layer,
the norms that size a strength, and the store browser's tables (pandas data frames, as
``gr.Dataframe`` shows them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from personachat.app.strength import Norms


@dataclass(frozen=True)
class LayerCurves:
    """A vector's quality by layer: AUC and separation, and the held-out AUC (mean over folds)
    with its spread when the extraction computed them (None otherwise)."""

    auc: list[float]
    separation: list[float]
    auc_heldout: list[float] | None = None
    auc_heldout_std: list[float] | None = None


def best_layer(engine: Any, personas: Sequence[str]) -> int:
    """The best layer (highest AUC) of the first picked persona; the middle layer if none."""
    for name in personas:
        vector = engine.vectors.get(name)
        if vector is not None and vector.metrics is not None:
            return int(vector.metrics.best_layer)
    return int(engine.lm.info.n_layers // 2)


def best_layers(engine: Any) -> dict[str, int]:
    """Every persona's best layer (of those whose vector has metrics)."""
    return {
        name: int(v.metrics.best_layer)
        for name, v in engine.vectors.items()
        if v.metrics is not None
    }


def norms(engine: Any) -> dict[str, Norms]:
    """Every persona's vector norm and residual norm per layer (of those with metrics)."""
    return {
        name: Norms(
            tuple(float(x) for x in v.metrics.norm), tuple(float(x) for x in v.metrics.resid_norm)
        )
        for name, v in engine.vectors.items()
        if v.metrics is not None
    }


def _listed(values: Any) -> list[float] | None:
    return None if values is None else [float(x) for x in values]


def layer_metrics(engine: Any, model_id: str, personas: Sequence[str]) -> dict[str, LayerCurves]:
    """``{persona: LayerCurves}`` of registered vectors (those with metrics)."""
    out = {}
    for name in personas:
        vector = engine.vectors.get(name)
        if vector is None:
            raise KeyError(f"persona {name!r} is not registered for {model_id}")
        m = vector.metrics
        if m is not None:
            out[name] = LayerCurves(
                [float(x) for x in m.auc],
                [float(x) for x in m.separation],
                _listed(m.auc_heldout),
                _listed(m.auc_heldout_std),
            )
    return out


def tables(store: Any, store_id: str) -> tuple[Any, Any, Any, Any]:
    """The store browser: personas, models, metrics at the best layer, neuron sets."""
    import pandas as pd

    personas = pd.DataFrame(
        [(p.name, p.category, p.description, p.system_prompt) for p in store.personas()],
        columns=["persona", "category", "description", "system prompt"],
    )
    models = pd.DataFrame(
        [
            (m.model_id, m.architecture, m.n_layers, m.hidden_size, m.mlp_width, m.revision)
            for m in store.models()
        ],
        columns=["model", "architecture", "layers", "hidden", "MLP width", "revision"],
    )
    metrics = pd.DataFrame(
        [_best_metrics(store, e) for e in store.vectors(store_id)],
        columns=["persona", "read from", "baseline", "best layer", "AUC", "separation", "n"],
    )
    sets = pd.DataFrame(
        [
            (e.label, e.site, e.method, e.n_units, ", ".join(e.pairs), e.source)
            for e in store.neuron_sets(store_id)
        ],
        columns=["neuron set", "site", "method", "units", "pairs", "source"],
    )
    return personas, models, metrics, sets


def _best_metrics(store: Any, entry: Any) -> tuple[Any, ...]:
    """A vector's row of the metrics table: AUC and separation at its best layer."""
    best = entry.best_layer
    auc = sep = None
    for layer, a, sp, _norm, _resid in store.layer_metrics(entry.vector_id):
        if layer == best:
            auc, sep = a, sp
    return (entry.persona, entry.positions, entry.baseline, best, auc, sep, entry.n_samples)
