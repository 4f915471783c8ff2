"""Where results go: the store (``register_results``), an output folder (``save_results``:
summary, vectors as safetensors, plots) and the printed summary (``format_summary``: the table;
``format_run``: the time of each phase and how the best layers were chosen)."""

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
    """The summary table: persona, positions, best layer and the figure that chose it, held-out
    AUC and separation (mean ± spread over folds; ``-`` when in-sample only), in-sample AUC and
    separation, norm, samples."""
    head = (
        f"{'persona':<24} {'positions':<14} {'best':>4} {'chosen by':<18} "
        f"{'AUC held out':>14} {'sep held out':>14} {'AUC in':>6} {'sep in':>7} {'norm':>8} "
        f"{'n':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.persona:<24} {r.positions:<14} {r.best_layer:>4} {r.best_by:<18} "
            f"{_spread(r.auc_heldout, r.auc_heldout_std, 3):>14} "
            f"{_spread(r.separation_heldout, r.separation_heldout_std, 2):>14} "
            f"{r.auc:>6.3f} {r.separation:>7.2f} {r.norm:>8.2f} {r.n_samples:>5}"
        )
    return "\n".join(lines)


def _spread(mean: float | None, std: float | None, digits: int) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {std or 0.0:.{digits}f}"


def format_run(result: ExtractionResult) -> str:
    """What the table does not say: the time of each phase, how best layers were chosen and any
    fallback (in-sample only)."""
    phases = ", ".join(f"{name} {sec:.1f} s" for name, sec in result.seconds.items())
    chosen = sorted({r.best_by for r in result.summary})
    lines = [f"time: {phases or '-'} (total {sum(result.seconds.values()):.1f} s)"]
    lines.append("best layers chosen by: " + (", ".join(chosen) or "-") + _why(chosen))
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)


def _why(chosen: Sequence[str]) -> str:
    parts = []
    if any(c.startswith("separation") for c in chosen):
        parts.append("separation where AUC tied at the top (saturated) across layers")
    if any(not c.endswith("_heldout") for c in chosen):
        parts.append("in-sample figures where held-out ones could not be computed")
    return f" ({'; '.join(parts)})" if parts else ""


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
    text = f"{title}\n{format_summary(result.summary)}\n{format_run(result)}\n"
    (out / "summary.txt").write_text(text, "utf-8")
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
