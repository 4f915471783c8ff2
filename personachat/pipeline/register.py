"""Where results go: the store (``register_results``), an output folder (``save_results``:
summary, vectors as safetensors, plots) and the printed summary table (``format_summary``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from personachat.model import LoadedModel
from personachat.pipeline.vectors import ExtractionResult, SummaryRow
from personachat.prompts import PersonaDataset
from personachat.records import LAYER_CONVENTION, NeuronSet


def register_results(
    store: Any,
    lm: LoadedModel,
    personas: Sequence[Any] = (),
    result: ExtractionResult | None = None,
    neurons: Sequence[NeuronSet] = (),
) -> None:
    """Write the model, personas, vectors (with raw means) and neuron sets into ``store``."""
    store.register_model(lm.info)
    if result is not None and result.vectors:  # one transaction: readers see all or nothing
        store.register_vectors(result.vectors, means=result.means, personas=list(personas))
    elif personas:
        store.register_personas(list(personas))
    if neurons:
        store.register_neurons(list(neurons))


def format_summary(rows: Sequence[SummaryRow]) -> str:
    """The summary table: persona, positions, best layer, AUC, separation, norm, samples."""
    head = (
        f"{'persona':<24} {'positions':<14} {'best':>4} {'AUC':>6} {'sep':>7} {'norm':>8} {'n':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.persona:<24} {r.positions:<14} {r.best_layer:>4} {r.auc:>6.3f} "
            f"{r.separation:>7.2f} {r.norm:>8.2f} {r.n_samples:>5}"
        )
    return "\n".join(lines)


def save_results(
    result: ExtractionResult, dataset: PersonaDataset, out_dir: str | Path, title: str = ""
) -> list[Path]:
    """summary.json, summary.txt, vectors_<positions>.safetensors and plots in ``out_dir``."""
    from safetensors.torch import save_file

    from personachat.pipeline.plots import plot_all

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in result.summary]
    (out / "summary.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    (out / "summary.txt").write_text(f"{title}\n{format_summary(result.summary)}\n", "utf-8")
    paths = [out / "summary.json", out / "summary.txt"]
    categories = {p.name: p.category for p in dataset.personas}
    for kind in dict.fromkeys(v.positions for v in result.vectors):
        vecs = [v for v in result.vectors if v.positions == kind]
        meta = {
            "model_id": vecs[0].model_id,
            "positions": kind,
            "dataset": dataset.name,
            "dataset_sha256": vecs[0].dataset_sha256,
            "layer_convention": LAYER_CONVENTION,
        }
        tensors = {f"{v.persona}.{v.baseline}": v.vector.contiguous() for v in vecs}
        save_file(tensors, str(out / f"vectors_{kind}.safetensors"), metadata=meta)
        paths.append(out / f"vectors_{kind}.safetensors")
        mns = [m for m in result.means if m.positions == kind]
        paths += plot_all(vecs, mns, categories, out, prefix=f"{kind}_")
    return paths
