"""The one owner of PyTorch hooks: register in ``try``, remove in ``finally``, scope per request.

No other module in PersonaChat calls ``register_forward_hook`` or its siblings. Everything that
reads or changes a model's internals goes through ``intervene``:

    with intervene(sites, [steer, ablate, readout]):
        model.generate(...)

``intervene`` registers one hook per site that a handler asks for and removes every one of them
when the block exits, normally, by an exception, or by a cancelled generation; the model is left
with exactly the hooks it had before. Hooks are global to a module, so each ``intervene`` call
makes a fresh token and adds it to a ``ContextVar``: a hook acts only when the forward pass runs
in a context holding its token (nested blocks add theirs, so both act). Two chat sessions
generating in two threads on one shared model therefore never see each other's settings. Work
handed to a worker thread must carry its context (``contextvars.copy_context().run``), as the
chat engine does.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from personachat.sites import ModelSites

Site = Literal["residual", "mlp_hidden", "gate", "attn_heads"]
SITES: tuple[Site, ...] = ("residual", "mlp_hidden", "gate", "attn_heads")
# Sites read as the *input* of a module (forward-pre hooks); the others are module outputs.
# ``attn_heads`` is the input of the attention output projection, [B, T, n_heads * head_dim]:
# head h is ``sites.head_slice(h)``.
_INPUT_SITES: frozenset[Site] = frozenset({"mlp_hidden", "attn_heads"})


class StopForward(Exception):
    """Raised by a handler to end a forward pass early (after the last layer it needs)."""


class Handler(Protocol):
    """An intervention at some sites. ``__call__`` returns a replacement tensor or ``None``."""

    def wants(self) -> Iterable[tuple[Site, int]]: ...

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> torch.Tensor | None: ...


def residual_of(output: Any) -> torch.Tensor:
    """The hidden states in a decoder block's output, which is a tensor or a tuple."""
    return output if isinstance(output, torch.Tensor) else output[0]


def with_residual(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden states replaced, keeping the tensor-or-tuple shape."""
    if isinstance(output, torch.Tensor):
        return hidden
    return (hidden, *output[1:])


_ACTIVE: contextvars.ContextVar[frozenset[object]] = contextvars.ContextVar(
    "personachat_active_interventions", default=frozenset()
)


def hook_count(model: nn.Module) -> int:
    """Number of forward and forward-pre hooks on ``model`` and all its submodules."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@contextmanager
def registered(
    hooks: Iterable[tuple[nn.Module, Literal["forward", "forward_pre"], Callable[..., Any]]],
) -> Iterator[list[RemovableHandle]]:
    """Register hooks and remove all of them on exit, even if registration itself fails."""
    handles: list[RemovableHandle] = []
    try:
        for module, kind, fn in hooks:
            if kind == "forward":
                handles.append(module.register_forward_hook(fn))
            else:
                handles.append(module.register_forward_pre_hook(fn))
        yield handles
    finally:
        for handle in reversed(handles):
            handle.remove()  # idempotent: removing twice is safe


def _site_module(sites: ModelSites, site: Site, layer: int) -> nn.Module:
    sites.check_layer(layer)
    if site == "residual":
        return sites.layers[layer]
    if site == "mlp_hidden":
        return sites.mlp_down[layer]
    if site == "attn_heads":
        if sites.attn_out is None:
            raise ValueError(
                f"{sites.architecture} has no attention output projection among its sites, so "
                "the 'attn_heads' site is unavailable; set SiteTemplates(attn_out=...) to its "
                f"path relative to a decoder block (e.g. 'self_attn.o_proj'); templates: "
                f"{sites.templates.describe()}"
            )
        return sites.attn_out[layer]
    if site != "gate":
        raise ValueError(f"unknown site {site!r}; known sites: {SITES}")
    if sites.gates is None:
        raise ValueError(
            f"{sites.architecture} has no separate gate projection; use the 'mlp_hidden' site"
        )
    return sites.gates[layer]


def _make_hook(
    token: object, site: Site, layer: int, chain: Sequence[Handler]
) -> tuple[Literal["forward", "forward_pre"], Callable[..., Any]]:
    def apply(x: torch.Tensor) -> torch.Tensor | None:
        changed = None
        for handler in chain:
            new = handler(site, layer, x)
            if new is not None:
                x = changed = new
        return changed

    if site in _INPUT_SITES:

        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if token not in _ACTIVE.get():
                return None
            new = apply(args[0])
            return None if new is None else (new, *args[1:])

        return "forward_pre", pre_hook

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if token not in _ACTIVE.get():
            return None
        new = apply(residual_of(output))
        return None if new is None else with_residual(output, new)

    return "forward", hook


@contextmanager
def intervene(sites: ModelSites, handlers: Sequence[Handler]) -> Iterator[None]:
    """Run the block with ``handlers`` active at their sites, for this context only.

    Handlers at the same site run in the order given, each seeing the previous one's result, so
    a readout listed after a steer reads the steered stream.
    """
    token = object()
    wanted: dict[tuple[Site, int], list[Handler]] = {}
    for handler in handlers:
        for key in handler.wants():
            wanted.setdefault(key, []).append(handler)
    specs = []
    for (site, layer), chain in sorted(wanted.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        kind, fn = _make_hook(token, site, layer, chain)
        specs.append((_site_module(sites, site, layer), kind, fn))
    reset = _ACTIVE.set(_ACTIVE.get() | {token})
    try:
        with registered(specs):
            yield
    finally:
        try:
            _ACTIVE.reset(reset)
        except ValueError:  # exited from another context (a generator closed elsewhere)
            _ACTIVE.set(_ACTIVE.get() - {token})
