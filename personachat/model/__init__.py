"""The model: load any causal LM and find its sites (layers, MLP units, gates, heads)."""

from __future__ import annotations

from personachat.model.load import (
    LoadedModel,
    ModelLoadError,
    load_model,
    pick_dtype,
    wrap_model,
)
from personachat.model.sites import (
    ModelSites,
    SiteError,
    SiteTemplates,
    resolve_sites,
    templates_from_args,
    text_config,
)

__all__ = [
    "LoadedModel",
    "ModelLoadError",
    "ModelSites",
    "SiteError",
    "SiteTemplates",
    "load_model",
    "pick_dtype",
    "resolve_sites",
    "templates_from_args",
    "text_config",
    "wrap_model",
]
