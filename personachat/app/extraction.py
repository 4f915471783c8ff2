"""Extraction from the page: persona vectors (and persona neurons) of a model from a built-in
dataset, registered in the store; the model's assistant axis (as scripts/register_axis.py
registers it); and the demo model's first start, which registers its own.

The store is opened for writing only for the registration, then the ``Catalog`` re-reads it so
every session sees the new personas.
"""

from __future__ import annotations

from collections.abc import Sequence

from personachat.app.catalog import Catalog
from personachat.app.models import DEMO_ID, is_demo

DEMO_DATASET = "demo"
DEMO_NEURON_PERSONAS: tuple[str, ...] = ()  # first start: persona neurons of every pair
DEMO_POSITIONS = "question_span,response_avg,prompt_last"  # the kinds registered on first start
# the assistant axis the page registers: read at the last prompt token (on the demo model the
# one that holds the personas; the question span's holds none), neutral mean minus roles' mean
AXIS_POSITIONS = "prompt_last"
AXIS_METHOD = "axis_means"


def extract(
    catalog: Catalog,
    model_id: str,
    dataset: str = "personas",
    positions: str = "question_span",
    personas: Sequence[str] = (),
    neurons: bool = False,
    neuron_personas: Sequence[str] = (),
) -> str:
    """Extract vectors for ``model_id`` from a built-in dataset (all its personas, or the
    ``personas`` named plus the baseline) and register them in the store; with ``neurons``,
    also the top-32 MLP units of each contrast pair (attribution patching) of those personas.
    ``neuron_personas`` narrows the pairs to those of the personas named. ``demo`` is the
    bundled demo model's own corpus (planted replies: no generation)."""
    from personachat.pipeline import extract_vectors, find_neurons, register_results
    from personachat.prompts import DatasetError, builtin_names, load_dataset
    from personachat.records import MEAN_BASELINE
    from personachat.store import Store

    lm = catalog.models.get(model_id)
    if dataset not in builtin_names():  # the page offers built-in sets, never server paths
        raise DatasetError(f"no built-in dataset {dataset!r}; built-in: {builtin_names()}")
    data = load_dataset(dataset)
    baseline = "default" if "default" in data.persona_names else MEAN_BASELINE
    chosen = list(personas) or None
    kinds = tuple(k for k in positions.split(",") if k)
    result = extract_vectors(lm, data, chosen, positions=kinds, baseline=baseline, progress=True)
    sets = []
    wanted = list(neuron_personas) or chosen
    pairs = [p for p in data.pairs if wanted is None or p.high in wanted or p.low in wanted]
    if neurons and pairs:
        sets = find_neurons(lm, pairs, method="patching", k=32, dataset=data)
    with Store(catalog.store_path) as store:
        register_results(store, lm, data.personas, result, sets)
    catalog.refresh()
    found = f" and {len(sets)} neuron sets" if sets else ""
    best = ", ".join(f"{r.persona} L{r.best_layer} AUC {r.auc:.2f}" for r in result.summary[:6])
    return f"Registered {len(result.vectors)} vectors{found} for `{lm.info.model_id}` ({best}, …)."


def register_axis(
    catalog: Catalog,
    model_id: str,
    dataset: str = "personas",
    positions: str = AXIS_POSITIONS,
    method: str = AXIS_METHOD,
) -> str:
    """Read ``model_id``'s assistant axis from a built-in dataset's prompts
    (``personachat.pipeline.extract_axis``) and register it with its role personas' mean,
    as ``scripts/register_axis.py`` does (persona ``assistant_axis``, baseline ``roles``)."""
    from personachat.pipeline import extract_axis, register_results
    from personachat.pipeline.axis import axis_personas
    from personachat.pipeline.vectors import ExtractionResult
    from personachat.prompts import DatasetError, builtin_names, load_dataset
    from personachat.store import Store

    lm = catalog.models.get(model_id)
    if dataset not in builtin_names():  # the page offers built-in sets, never server paths
        raise DatasetError(f"no built-in dataset {dataset!r}; built-in: {builtin_names()}")
    data = load_dataset(dataset)
    vector, role_mean = extract_axis(lm, data, positions=positions, method=method, progress=True)
    result = ExtractionResult([vector], [role_mean], [], personas=[vector.persona])
    with Store(catalog.store_path) as store:
        register_results(store, lm, axis_personas(data.name), result)
    catalog.refresh()
    assert vector.metrics is not None
    best = vector.metrics.best_layer
    return (
        f"Registered the assistant axis of `{lm.info.model_id}` ({method}, read from "
        f"{positions}, dataset {data.name}): best layer {best}, AUC "
        f"{float(vector.metrics.auc[best]):.2f}, {vector.n_samples} neutral samples."
    )


def register_demo(catalog: Catalog, model_id: str) -> str | None:
    """On the first start with the bundled demo model and a store without its vectors:
    extract and register them (the ``DEMO_POSITIONS`` kinds) with the persona neurons of
    every pair (attribution patching; progress bars on the terminal). None when ``model_id``
    is another model or nothing was needed."""
    if not is_demo(model_id):
        return None
    if catalog.store().vectors(DEMO_ID) and catalog.store().neuron_sets(DEMO_ID):
        return None
    return extract(
        catalog,
        model_id,
        DEMO_DATASET,
        DEMO_POSITIONS,
        neurons=True,
        neuron_personas=DEMO_NEURON_PERSONAS,
    )
