"""The safetensors layout of stored tensors: tensor names, metadata.

A persona-vector file holds ``vector`` [n_layers, hidden] and, with metrics, ``metrics.<field>``
[n_layers] (held-out ones where computed) and, with projection quantiles,
``quantiles.baseline`` and ``quantiles.persona`` [n_layers, levels]; a means file holds ``mean``
[n_layers, hidden]. Both carry string metadata naming the model, the persona and how the tensor
was made (``format`` says which of the two it is; ``render``, how its prompts were rendered).
``personachat.store.formats`` writes and reads the same layout for export and import.
"""

from __future__ import annotations

import json
from datetime import datetime

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from personachat.records import (
    LayerMetrics,
    ModelInfo,
    PersonaMeans,
    PersonaVector,
    ProjectionQuantiles,
)
from personachat.store.errors import IntegrityError
from personachat.store.schema import as_utc

VECTOR_FORMAT = "personachat.persona_vector/1"
MEANS_FORMAT = "personachat.persona_means/1"
METRIC_FIELDS = ("auc", "separation", "norm", "resid_norm")
HELDOUT_FIELDS = ("auc_heldout", "auc_heldout_std", "separation_heldout", "separation_heldout_std")


def vector_tensors(vector: PersonaVector, info: ModelInfo | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a persona-vector file: ``vector`` and, with metrics, ``metrics.<field>``."""
    tensors = {"vector": vector.vector.detach().cpu().contiguous()}
    if vector.metrics is not None:
        for name in (*METRIC_FIELDS, *HELDOUT_FIELDS):
            value = getattr(vector.metrics, name)
            if value is not None:
                tensors[f"metrics.{name}"] = value.detach().cpu().contiguous()
    if vector.quantiles is not None:
        tensors["quantiles.baseline"] = vector.quantiles.baseline.detach().cpu().contiguous()
        tensors["quantiles.persona"] = vector.quantiles.persona.detach().cpu().contiguous()
    return tensors


def vector_metadata(vector: PersonaVector, info: ModelInfo | None = None) -> dict[str, str]:
    """String metadata naming the model and the vector."""
    meta = {
        "format": VECTOR_FORMAT,
        "model_id": vector.model_id,
        "persona": vector.persona,
        "method": vector.method,
        "positions": vector.positions,
        "baseline": vector.baseline,
        "dataset": vector.dataset,
        "dataset_sha256": vector.dataset_sha256,
        "n_samples": str(vector.n_samples),
        "created_at": as_utc(vector.created_at).isoformat(),
    }
    if vector.render:
        meta["render"] = vector.render
    if vector.metrics is not None and vector.metrics.best_by != "auc":
        meta["best_by"] = vector.metrics.best_by
    if vector.quantiles is not None:
        meta["quantiles.n_baseline"] = str(vector.quantiles.n_baseline)
        meta["quantiles.n_persona"] = str(vector.quantiles.n_persona)
    if info is not None:
        meta["model_revision"] = info.revision or ""
        meta["architecture"] = info.architecture
        meta["layer_convention"] = info.layer_convention
    return meta


def read_safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (empty if none)."""
    if len(data) < 8:
        return {}
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def parse_safetensors(
    data: bytes, source: str, error: type[Exception]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of safetensors bytes; ``error`` (one line naming ``source``)
    when they are not a valid file: too short, a header length past the end, a header that is
    not JSON, offsets past the end or backwards, a shape that does not fit its bytes."""
    try:
        tensors = st_load(data)
        meta = read_safetensors_metadata(data)
    except (SafetensorError, ValueError, AttributeError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise error(
            f"{source} is not a valid safetensors file ({len(data)} bytes: {reason}); it is "
            "truncated or damaged"
        ) from err
    return tensors, meta


def _meta_number(meta: dict[str, str], key: str, source: str) -> int:
    text = meta.get(key, "0") or "0"
    try:
        return int(text)
    except ValueError:
        raise IntegrityError(f"{source}: metadata {key} is {text!r}, not a whole number") from None


def vector_from_tensors(
    tensors: dict[str, torch.Tensor], meta: dict[str, str], *, source: str
) -> PersonaVector:
    """Rebuild a PersonaVector from a persona-vector file's tensors and metadata."""
    if "vector" not in tensors:
        raise IntegrityError(f"{source} has no 'vector' tensor (tensors: {sorted(tensors)})")
    metrics = None
    if all(f"metrics.{n}" in tensors for n in METRIC_FIELDS):
        names = [n for n in (*METRIC_FIELDS, *HELDOUT_FIELDS) if f"metrics.{n}" in tensors]
        metrics = LayerMetrics(
            **{n: tensors[f"metrics.{n}"] for n in names}, best_by=meta.get("best_by", "auc")
        )
    quantiles = None
    if "quantiles.baseline" in tensors and "quantiles.persona" in tensors:
        quantiles = ProjectionQuantiles(
            baseline=tensors["quantiles.baseline"],
            persona=tensors["quantiles.persona"],
            n_baseline=_meta_number(meta, "quantiles.n_baseline", source),
            n_persona=_meta_number(meta, "quantiles.n_persona", source),
        )
    created = meta.get("created_at")
    try:
        created_at = datetime.fromisoformat(created) if created else None
    except ValueError:
        raise IntegrityError(
            f"{source}: metadata created_at is {created!r}, not an ISO date and time"
        ) from None
    return PersonaVector(
        model_id=meta.get("model_id", ""),
        persona=meta.get("persona", ""),
        vector=tensors["vector"],
        method=meta.get("method", "imported"),
        positions=meta.get("positions", "response_avg"),
        baseline=meta.get("baseline", "default"),
        dataset=meta.get("dataset", ""),
        dataset_sha256=meta.get("dataset_sha256", ""),
        n_samples=_meta_number(meta, "n_samples", source),
        metrics=metrics,
        created_at=created_at,
        render=meta.get("render", ""),
        quantiles=quantiles,
    )


def means_tensors(means: PersonaMeans) -> dict[str, torch.Tensor]:
    """The tensor of a means file: ``mean``."""
    return {"mean": means.mean.detach().cpu().contiguous()}


def means_metadata(means: PersonaMeans, info: ModelInfo) -> dict[str, str]:
    """String metadata naming the model and the persona whose mean activations these are."""
    return {
        "format": MEANS_FORMAT,
        "model_id": means.model_id,
        "model_revision": info.revision or "",
        "persona": means.persona,
        "positions": means.positions,
        "n_samples": str(means.n_samples),
        "dataset": means.dataset,
        "dataset_sha256": means.dataset_sha256,
        "layer_convention": info.layer_convention,
        **({"render": means.render} if means.render else {}),
    }


def dtype_name(tensor: torch.Tensor) -> str:
    """The dtype as the catalog records it: ``float32``, ``bfloat16``, ..."""
    return str(tensor.dtype).removeprefix("torch.")
