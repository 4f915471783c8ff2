"""Check vectors and means against their model; build their files.

Every check runs before anything is written: names, method and positions, a 2-D float tensor of
the model's [n_layers, hidden_size], finite values, and metrics of one value per layer. A check
that fails names the persona, the model and the expected and actual values.
"""

from __future__ import annotations

import secrets

import torch

from personachat.records import (
    METHODS,
    POSITIONS,
    ModelInfo,
    PersonaMeans,
    PersonaVector,
    check_name,
)
from personachat.store.catalog import Catalog
from personachat.store.errors import UnknownError
from personachat.store.files import TensorFiles, model_slug
from personachat.store.staging import Pending
from personachat.store.tensorfile import (
    METRIC_FIELDS,
    means_metadata,
    means_tensors,
    vector_metadata,
    vector_tensors,
)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_unique_keys(vectors: list[PersonaVector], means: list[PersonaMeans]) -> None:
    """Refuse a batch that holds two vectors, or two means, for the same row."""
    keys = [(v.model_id, v.persona, v.method, v.positions, v.baseline) for v in vectors]
    mkeys = [(m.model_id, m.persona, m.positions) for m in means]
    for kind, ks in (("vector", keys), ("means", mkeys)):
        if len(set(ks)) != len(ks):
            dup = sorted({k for k in ks if ks.count(k) > 1})  # type: ignore[arg-type]
            raise ValueError(f"register_vectors got two {kind} with the same key: {dup}")


def check_finite(kind: str, tensor: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        where = ""
        if tensor.dim() == 2:
            where = f" at layers {sorted(set(torch.nonzero(bad)[:, 0].tolist()))}"
        raise ValueError(f"{kind} of {what} contains NaN or Inf{where}; not stored")


def check_tensor(
    catalog: Catalog,
    kind: str,
    what: str,
    tensor: torch.Tensor,
    info: ModelInfo | None,
    model_id: str,
) -> None:
    """A registered model, and a finite float tensor of its [n_layers, hidden_size]."""
    if info is None:
        raise UnknownError(
            f"{kind} of {what}: model {model_id!r} is not registered in {catalog.root}; "
            f"known models: {sorted(catalog.model_map())}. Call register_model(info) first"
        )
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor)
        raise ValueError(f"{kind} of {what} must be a 2-D tensor [n_layers, hidden], not {shape}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{kind} of {what} has dtype {tensor.dtype}; use a float dtype")
    n_layers, hidden = tensor.shape
    if hidden != info.hidden_size:
        raise ValueError(
            f"{kind} of {what} has {hidden} dims per layer but model {model_id!r} has hidden "
            f"size {info.hidden_size}; was it extracted from another model?"
        )
    if n_layers != info.n_layers:
        raise ValueError(
            f"{kind} of {what} has {n_layers} layers but model {model_id!r} has "
            f"{info.n_layers}; store one row per decoder layer ({info.layer_convention})"
        )
    check_finite(kind, tensor, what)


def prepare_vector(
    v: PersonaVector, models: dict[str, ModelInfo], catalog: Catalog, files: TensorFiles
) -> Pending:
    """The checked file of a persona vector, named ``vectors/<model>/<persona>...safetensors``."""
    what = f"persona {v.persona!r} (model {v.model_id!r})"
    check_name(v.persona, "persona name")
    check_name(v.baseline, "baseline")
    if v.method not in METHODS:
        raise ValueError(f"vector of {what}: method {v.method!r} is not one of {METHODS}")
    if v.positions not in POSITIONS:
        raise ValueError(f"vector of {what}: positions {v.positions!r} not one of {POSITIONS}")
    if v.n_samples < 0:
        raise ValueError(f"vector of {what}: n_samples is {v.n_samples}")
    info = models.get(v.model_id)
    check_tensor(catalog, "vector", what, v.vector, info, v.model_id)
    assert info is not None
    if v.metrics is not None:
        for name in METRIC_FIELDS:
            t = getattr(v.metrics, name)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (info.n_layers,):
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)
                raise ValueError(
                    f"metrics.{name} of {what} has shape {shape}; expected ({info.n_layers},)"
                )
            check_finite(f"metrics.{name}", t, what)
    token = secrets.token_hex(4)
    rel = (
        f"vectors/{model_slug(v.model_id)}/"
        f"{v.persona}.{v.positions}.{v.method}.{v.baseline}.{token}.safetensors"
    )
    return files.pending(rel, vector_tensors(v, info), vector_metadata(v, info))


def prepare_means(
    m: PersonaMeans, models: dict[str, ModelInfo], catalog: Catalog, files: TensorFiles
) -> Pending:
    """The checked file of a persona's raw means, named ``means/<model>/<persona>...``."""
    what = f"persona {m.persona!r} (model {m.model_id!r})"
    check_name(m.persona, "persona name")
    if m.positions not in POSITIONS:
        raise ValueError(f"means of {what}: positions {m.positions!r} not one of {POSITIONS}")
    info = models.get(m.model_id)
    check_tensor(catalog, "means", what, m.mean, info, m.model_id)
    assert info is not None
    meta = means_metadata(m, info)
    rel = f"means/{model_slug(m.model_id)}/{m.persona}.{m.positions}.{secrets.token_hex(4)}"
    return files.pending(rel + ".safetensors", means_tensors(m), meta)
