"""Where things live inside a model: decoder layers, MLP hidden units and gates, per architecture.

Layer convention (kept in the store as ``LAYER_CONVENTION``): layer ``i`` is the output of decoder
block ``i`` (0-based), i.e. ``hidden_states[i + 1]`` in transformers' terms, where
``hidden_states[0]`` is the embeddings. transformers applies the final norm to the last entry of
``hidden_states``; our layer ``n_layers - 1`` is the block's raw output, before that norm.

Canonical sites:
- ``residual``: the output of decoder block ``i`` (the residual stream after the block).
- ``mlp_hidden``: the MLP hidden activations, i.e. the *input* of the MLP's output projection
  (``down_proj``; GPT-2's ``c_proj``).
- ``gate``: the output of the gate projection of gated MLPs (``gate_proj``).
- ``attn_heads``: the input of the attention output projection (``self_attn.o_proj``; GPT-2's
  ``attn.c_proj``), ``[B, T, n_heads * head_dim]``: head ``h`` is the slice
  ``h * head_dim:(h + 1) * head_dim``, so patching a slice patches one head's output.

Known architectures map to attribute paths through templates; anything else gets a guess, and a
failed guess raises ``SiteError`` naming the ``SiteTemplates`` fields to set.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace

from torch import nn

log = logging.getLogger(__name__)


class SiteError(ValueError):
    """The model's layers or MLP modules could not be found."""


@dataclass(frozen=True)
class SiteTemplates:
    """Attribute paths (dotted, relative to the causal LM) of a model's sites.

    ``layers`` names the list of decoder blocks; ``mlp_down``, ``gate`` and ``attn_out`` are
    relative to one block. ``gate`` is ``None`` for ungated MLPs (GPT-2) and fused gates (Phi-3).
    ``attn_out`` (the attention output projection) is guessed when ``None``.
    """

    layers: str
    mlp_down: str
    gate: str | None = None
    base: str = "model"
    attn_out: str | None = None

    def describe(self) -> str:
        return (
            f"layers={self.layers!r}, mlp_down={self.mlp_down!r}, gate={self.gate!r}, "
            f"attn_out={self.attn_out!r}"
        )


_LLAMA_LIKE = SiteTemplates(
    layers="model.layers",
    mlp_down="mlp.down_proj",
    gate="mlp.gate_proj",
    attn_out="self_attn.o_proj",
)

KNOWN_TEMPLATES: dict[str, SiteTemplates] = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "phi3": replace(_LLAMA_LIKE, gate=None),
    "gpt2": SiteTemplates(
        layers="transformer.h", mlp_down="mlp.c_proj", base="transformer", attn_out="attn.c_proj"
    ),
}

_DOWN_NAMES = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2", "fc_out", "proj_out")
_GATE_NAMES = ("gate_proj", "w1")
_ATTN_OUT_NAMES = ("o_proj", "out_proj", "c_proj", "dense", "wo")
_ATTN_PARENTS = ("attn", "attention")


def get_path(root: nn.Module, path: str) -> nn.Module:
    """Resolve a dotted attribute path (``"model.layers"``) below ``root``."""
    obj: object = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)  # type: ignore[index]
    if not isinstance(obj, nn.Module):
        raise SiteError(f"{path!r} is a {type(obj).__name__}, not a torch module")
    return obj


def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() == 2:
        # transformers' Conv1D (GPT-2) stores weight as [in, out].
        return int(weight.shape[0])
    raise SiteError(f"cannot tell the input width of {type(module).__name__}")


def _guess_templates(model: nn.Module, n_layers: int) -> SiteTemplates:
    layers_path = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            layers_path = name
            break
    if layers_path is None:
        raise SiteError(
            f"found no list of {n_layers} decoder blocks in {type(model).__name__}; pass "
            "SiteTemplates(layers=..., mlp_down=..., gate=...) (CLI: --layers-path, "
            "--mlp-down-path, --gate-path)"
        )
    block = get_path(model, layers_path)[0]  # type: ignore[index]
    names = dict(block.named_modules())
    down = next((n for n in names if n.split(".")[-1] in _DOWN_NAMES and "attn" not in n), None)
    if down is None:
        raise SiteError(
            f"found the decoder blocks at {layers_path!r} but no MLP output projection among "
            f"{sorted(names)[:20]}; pass SiteTemplates(mlp_down=...) (CLI: --mlp-down-path)"
        )
    gate = next((n for n in names if n.split(".")[-1] in _GATE_NAMES), None)
    base = layers_path.rsplit(".", 1)[0] if "." in layers_path else ""
    return SiteTemplates(
        layers=layers_path, mlp_down=down, gate=gate, base=base, attn_out=guess_attn_out(block)
    )


def guess_attn_out(block: nn.Module) -> str | None:
    """Path (relative to ``block``) of the attention output projection: a module named like
    ``o_proj``/``out_proj``/``c_proj``/``dense`` under an attention-named child; else ``None``."""
    for name, module in block.named_modules():
        parts = name.split(".")
        if len(parts) < 2 or parts[-1] not in _ATTN_OUT_NAMES:
            continue
        under_attention = any(k in part.lower() for part in parts[:-1] for k in _ATTN_PARENTS)
        if under_attention and getattr(module, "weight", None) is not None:
            return name
    return None


def _config_int(config: object, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def text_config(config: object) -> object:
    """The text part of a (possibly multimodal) config."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


@dataclass(frozen=True, eq=False)
class ModelSites:
    """The resolved sites of one loaded model. Holds module references, no tensors."""

    templates: SiteTemplates
    architecture: str
    base: nn.Module
    layers: tuple[nn.Module, ...]
    mlp_down: tuple[nn.Module, ...]
    gates: tuple[nn.Module, ...] | None
    hidden_size: int
    mlp_width: int
    attn_out: tuple[nn.Module, ...] | None = None  # attention output projections, per layer
    n_heads: int | None = None
    head_dim: int | None = None

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def head_slice(self, head: int) -> slice:
        """Columns of head ``head`` in the ``attn_heads`` site (the input of ``o_proj``)."""
        if self.attn_out is None or self.n_heads is None or self.head_dim is None:
            raise SiteError(
                f"{self.architecture} has no attention output projection among its sites; set "
                "SiteTemplates(attn_out=...) to its path relative to a decoder block "
                "(e.g. 'self_attn.o_proj')"
            )
        if not 0 <= head < self.n_heads:
            raise SiteError(
                f"head {head} is out of range: the model has {self.n_heads} attention heads "
                f"(0..{self.n_heads - 1})"
            )
        return slice(head * self.head_dim, (head + 1) * self.head_dim)

    def check_layer(self, layer: int) -> int:
        if not 0 <= layer < self.n_layers:
            raise SiteError(
                f"layer {layer} is out of range: the model has {self.n_layers} layers "
                f"(0..{self.n_layers - 1})"
            )
        return layer

    def check_neuron(self, layer: int, index: int) -> None:
        self.check_layer(layer)
        if not 0 <= index < self.mlp_width:
            raise SiteError(
                f"neuron {layer}:{index} is out of range: the MLP width is {self.mlp_width} "
                f"(indices 0..{self.mlp_width - 1})"
            )


def resolve_sites(model: nn.Module, templates: SiteTemplates | None = None) -> ModelSites:
    """Find the sites of ``model``: known templates, then ``templates``, then a guess."""
    config = text_config(getattr(model, "config", None))
    arch = str(getattr(config, "model_type", type(model).__name__))
    n_layers = _config_int(config, "num_hidden_layers", "n_layer", "num_layers")
    if templates is None:
        templates = KNOWN_TEMPLATES.get(arch)
    if templates is None:
        if n_layers is None:
            raise SiteError(f"cannot tell the number of layers of {arch!r}; pass SiteTemplates")
        templates = _guess_templates(model, n_layers)
    try:
        layer_list = get_path(model, templates.layers)
        layers: tuple[nn.Module, ...] = tuple(layer_list)  # type: ignore[arg-type]
        downs = tuple(get_path(layer, templates.mlp_down) for layer in layers)
        gates = (
            tuple(get_path(layer, templates.gate) for layer in layers) if templates.gate else None
        )
        base = get_path(model, templates.base) if templates.base else model
    except (AttributeError, IndexError) as err:
        raise SiteError(
            f"cannot find the sites of {arch!r} ({type(model).__name__}) with "
            f"{templates.describe()}: {err}. Set SiteTemplates fields to the right attribute "
            "paths (CLI: --layers-path, --mlp-down-path, --gate-path)"
        ) from err
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model")
    if hidden is None:
        raise SiteError(f"cannot tell the hidden size of {arch!r} from its config")
    attn_out, n_heads, head_dim = _resolve_heads(layers, templates, config, arch, hidden)
    return ModelSites(
        templates=templates,
        architecture=arch,
        base=base,
        layers=layers,
        mlp_down=downs,
        gates=gates,
        hidden_size=hidden,
        mlp_width=_in_features(downs[0]),
        attn_out=attn_out,
        n_heads=n_heads,
        head_dim=head_dim,
    )


def _resolve_heads(
    layers: tuple[nn.Module, ...], templates: SiteTemplates, config: object, arch: str, hidden: int
) -> tuple[tuple[nn.Module, ...] | None, int | None, int | None]:
    """(attention output projections, n_heads, head_dim), or Nones when they cannot be found.

    The per-head site is optional: a model without it still resolves, and the ``attn_heads``
    site then raises naming the template field to set.
    """
    path = templates.attn_out or guess_attn_out(layers[0])
    n_heads = _config_int(config, "num_attention_heads", "n_head", "num_heads")
    if path is None or n_heads is None:
        log.info("%s: no attention output projection or head count found; no attn_heads", arch)
        return None, None, None
    try:
        outs = tuple(get_path(layer, path) for layer in layers)
        width = _in_features(outs[0])
    except (AttributeError, IndexError, SiteError) as err:
        log.warning("%s: attention output %r not found (%s); no attn_heads", arch, path, err)
        return None, None, None
    head_dim = _config_int(config, "head_dim") or hidden // n_heads
    if n_heads * head_dim != width:
        log.warning(
            "%s: %d heads x head_dim %d != %d inputs of %r; using head_dim %d",
            arch,
            n_heads,
            head_dim,
            width,
            path,
            width // n_heads,
        )
        if width % n_heads:
            return None, None, None
        head_dim = width // n_heads
    return outs, n_heads, head_dim


_SAFE_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def templates_from_args(
    layers: str | None,
    mlp_down: str | None,
    gate: str | None,
    base: str | None = None,
    attn_out: str | None = None,
) -> SiteTemplates | None:
    """Build templates from CLI overrides; ``None`` when nothing was given."""
    if layers is None and mlp_down is None:
        return None
    if layers is None or mlp_down is None:
        raise SiteError("give both --layers-path and --mlp-down-path to override sites")
    for path in (layers, mlp_down, gate, base, attn_out):
        if path is not None and not _SAFE_PATH.match(path):
            raise SiteError(f"{path!r} is not a dotted attribute path")
    base_path = base if base is not None else layers.rsplit(".", 1)[0] if "." in layers else ""
    return SiteTemplates(
        layers=layers, mlp_down=mlp_down, gate=gate, base=base_path, attn_out=attn_out
    )
