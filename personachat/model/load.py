"""Load any Hugging Face causal LM by hub name or local path; nothing loads at import time.

``load_model("Qwen/Qwen2.5-0.5B-Instruct")`` or ``load_model("store/models/demo")`` returns a
``LoadedModel``: the model in eval mode, its tokenizer, its resolved sites and a ``ModelInfo``
(the identity the store keeps). Dtype and device default sensibly: float32 on CPU; bfloat16 (or
float16 where bf16 is unsupported) with ``device_map="auto"`` when a CUDA GPU is present.
Offline (``HF_HUB_OFFLINE=1``, or no network), a hub name that is not in the local cache fails
fast with a message that says how to point at a local path instead.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from personachat.model.sites import ModelSites, SiteTemplates, resolve_sites
from personachat.records import ModelInfo

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to do."""


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model ready for hooks: eval mode, tokenizer with a pad token, resolved sites."""

    model: Any  # a transformers PreTrainedModel with a causal LM head
    tokenizer: PreTrainedTokenizerBase
    sites: ModelSites
    info: ModelInfo

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def pick_dtype(dtype: str | torch.dtype = "auto", device: str = "auto") -> torch.dtype:
    """float32 on CPU; bfloat16 on a GPU that supports it, else float16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        value = getattr(torch, dtype, None)
        if not isinstance(value, torch.dtype):
            raise ModelLoadError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        return value
    if torch.cuda.is_available() and device != "cpu":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def check_device(device: str) -> None:
    """A clear error for a GPU asked for on a machine without one."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device {device!r} was asked for but no CUDA GPU is available here; use "
            "--device cpu (or auto)"
        )


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _local_or_cached(name_or_path: str, revision: str | None) -> bool:
    if Path(name_or_path).is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
    except Exception:  # an invalid repo id raises; treat as not cached
        return False
    return isinstance(hit, str)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) answers a TCP connection quickly."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "huggingface.co", port), timeout):
            return True
    except OSError:
        return False


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make batching possible: a pad token (the EOS token when the model has none)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def model_info(model: Any, sites: ModelSites, model_id: str, revision: str | None) -> ModelInfo:
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    return ModelInfo(
        model_id=model_id,
        revision=revision or commit,
        architecture=sites.architecture,
        n_layers=sites.n_layers,
        hidden_size=sites.hidden_size,
        mlp_width=sites.mlp_width,
    )


def wrap_model(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    model_id: str,
    *,
    revision: str | None = None,
    templates: SiteTemplates | None = None,
) -> LoadedModel:
    """Wrap an already-built model (tests build tiny random ones) as a ``LoadedModel``."""
    model.eval()
    sites = resolve_sites(model, templates)
    return LoadedModel(
        model=model,
        tokenizer=prepare_tokenizer(tokenizer),
        sites=sites,
        info=model_info(model, sites, model_id, revision),
    )


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    revision: str | None = None,
    templates: SiteTemplates | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer by hub name or local path."""
    if not _local_or_cached(name_or_path, revision):
        why = "HF_HUB_OFFLINE is set" if is_offline() else None
        if why is None and not hub_reachable():
            why = "the Hugging Face hub cannot be reached (no network)"
        if why is not None:
            raise ModelLoadError(
                f"{name_or_path!r} is neither a local folder nor in the Hugging Face cache, and "
                f"{why}, so it cannot be downloaded. Point at a local path (a folder with "
                "config.json and weights), e.g. --model store/models/demo, or download it on a "
                "machine with network first (hf download NAME)."
            )
    check_device(device)
    torch_dtype = pick_dtype(dtype, device)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "revision": revision}
    if device == "auto" and torch.cuda.is_available():
        kwargs["device_map"] = "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except OSError as err:
        raise ModelLoadError(
            f"could not load {name_or_path!r}: {err}. With no network, pass a local path "
            "(--model /path/to/model) or set HF_HUB_OFFLINE=1 after caching it."
        ) from err
    if device not in {"auto", ""} and "device_map" not in kwargs:
        model.to(device)  # type: ignore[arg-type]
    log.info("loaded %s (%s, %s)", name_or_path, type(model).__name__, torch_dtype)
    return wrap_model(model, tokenizer, str(name_or_path), revision=revision, templates=templates)
