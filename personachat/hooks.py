"""The one owner of hooks into a model: attach in ``try``, remove in ``finally``, scope per request.

No other module in PersonaChat calls ``register_forward_hook``, its siblings, or replaces a
module's ``forward``. Everything that reads or changes a model's internals goes through
``intervene``:

    with intervene(sites, [steer, ablate, readout]):
        model.generate(...)

``intervene`` attaches the handlers at each site they ask for and detaches every one of them
when the block exits, normally, by an exception, or by a cancelled generation; the model is left
as it was. A site's module gets one dispatching ``forward`` (an instance attribute over the
class's method, restored when its last attachment goes) rather than a PyTorch forward hook: a
module with hooks takes PyTorch's slow call path, which on a dispatch-bound model costs several
times more per call (``scripts/bench_runtime.py`` prints both side by side). Since the
handlers run inside the module's call, transformers' ``output_hidden_states`` (recorded by its
own hooks around that call) includes what they changed.

Attachments are global to a module, so each ``intervene`` call makes a fresh token and adds it
to a ``ContextVar``: a handler acts only when the forward pass runs in a context holding its
token (nested blocks add theirs, so both act). Two chat sessions generating in two threads on
one shared model therefore never see each other's settings. Work handed to a worker thread must
carry its context (``contextvars.copy_context().run``), as the chat engine does.

Shared forwards: the chat scheduler runs the requests of many sessions as rows of ONE batched
forward. It attaches each request's handlers with ``attached`` (a token that no context holds)
and publishes, around each shared forward, a ``RowMap``: which rows of the batch each token owns.
A token's handlers then see only their own rows (``x[rows]``, as if the batch held those rows
alone) and their result goes back into those rows; other rows pass through untouched. A handler
that raises inside a shared forward fails its own owner only: the error is kept in the row map,
its rows are left as they were, and the forward goes on for the others. A token mapped to
``ALL_ROWS`` sees the whole batch (handlers built for every row at once, such as
``personachat.interventions.shared``'s stacked ones), and its errors propagate.

``registered`` is the plain PyTorch-hook helper, for raw one-off captures (tests use it).
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from personachat.model import ModelSites

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


Detach = Callable[[], None]

_ACTIVE: contextvars.ContextVar[frozenset[object]] = contextvars.ContextVar(
    "personachat_active_interventions", default=frozenset()
)

ALL_ROWS = slice(None)  # a row map owner that sees the whole batch


class RowMap:
    """Which rows of a shared forward each attachment token owns (a slice of the batch).

    ``errors`` collects, per token, the exception its handlers raised in this forward (the rows
    of that token were left as they were); tokens mapped to ``ALL_ROWS`` never land here, their
    errors propagate.
    """

    __slots__ = ("errors", "owners")

    def __init__(self, owners: Mapping[object, slice]) -> None:
        self.owners = dict(owners)
        self.errors: dict[object, Exception] = {}


_ROWS: contextvars.ContextVar[RowMap | None] = contextvars.ContextVar(
    "personachat_row_map", default=None
)


@contextmanager
def shared_rows(rows: RowMap) -> Iterator[RowMap]:
    """Run the block's forwards with ``rows`` published: attached tokens act on their rows."""
    reset = _ROWS.set(rows)
    try:
        yield rows
    finally:
        _ROWS.reset(reset)


def hook_count(model: nn.Module) -> int:
    """Hooks and attached interventions on ``model`` and its submodules (a leak check).

    Counts PyTorch forward and forward-pre hooks, ``intervene``'s attachments, and 1 for a
    module whose forward is still replaced with no attachment left (which should never be).
    """
    total = 0
    for m in model.modules():
        total += len(m._forward_hooks) + len(m._forward_pre_hooks)
        dispatch = m.__dict__.get(_DISPATCH)
        if dispatch is not None:
            total += len(dispatch) or 1
    return total


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


Attachment = tuple[object, Site, int, tuple[Handler, ...]]  # token, site, layer, handlers


def _run(entries: tuple[Attachment, ...], x: torch.Tensor) -> torch.Tensor | None:
    """Run the handlers of the entries active in this context, or owning rows of this shared
    forward; the new tensor, or None."""
    active = _ACTIVE.get()
    rows = _ROWS.get()
    changed = None
    for token, site, layer, chain in entries:
        if token in active:
            for handler in chain:
                new = handler(site, layer, x)
                if new is not None:
                    x = changed = new
        elif rows is not None and token in rows.owners:
            new = _run_rows(rows, token, site, layer, chain, x)
            if new is not None:
                x = changed = new
    return changed


def _run_rows(
    rows: RowMap, token: object, site: Site, layer: int, chain: tuple[Handler, ...], x: torch.Tensor
) -> torch.Tensor | None:
    """``chain`` on the rows ``token`` owns; the whole batch with those rows replaced, or None."""
    span = rows.owners[token]
    if span == ALL_ROWS:
        changed = None
        for handler in chain:
            new = handler(site, layer, x)
            if new is not None:
                x = changed = new
        return changed
    if token in rows.errors:
        return None  # this owner already failed in this forward
    part = x[span]
    touched = False
    try:
        for handler in chain:
            new = handler(site, layer, part)
            if new is not None:
                part, touched = new, True
    except Exception as err:  # kept for the owner; the other rows go on
        rows.errors[token] = err
        return None
    if not touched:
        return None
    return torch.cat([x[: span.start], part, x[span.stop :]])


class _Dispatch:
    """A module's ``forward`` while interventions are attached to it.

    It calls the forward it replaced and, for each attachment whose token is active in the
    calling context, runs that attachment's handlers on the input (``before``) or the output
    (``after``), in the order attached. Attachments are tuples swapped whole under ``_LOCK``, so
    a forward pass in one thread never sees a half-updated list from another.
    """

    __slots__ = ("after", "before", "had_own", "original")

    def __init__(self, module: nn.Module) -> None:
        self.had_own = "forward" in module.__dict__  # someone else's wrapper (accelerate's)
        self.original: Callable[..., Any] = module.forward
        self.before: tuple[Attachment, ...] = ()
        self.after: tuple[Attachment, ...] = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.before:
            new = _run(self.before, args[0])
            if new is not None:
                args = (new, *args[1:])
        out = self.original(*args, **kwargs)
        if self.after:
            new = _run(self.after, residual_of(out))
            if new is not None:
                out = with_residual(out, new)
        return out

    def __len__(self) -> int:
        return len(self.before) + len(self.after)


_LOCK = threading.Lock()
_DISPATCH = "_personachat_dispatch"  # the module attribute holding its _Dispatch


def _attach(module: nn.Module, entry: Attachment, first: bool = False) -> Detach:
    """Run ``entry``'s handlers at ``module``'s input or output (before the others already there
    when ``first``); returns the undo function."""
    site = entry[1]
    with _LOCK:
        found: _Dispatch | None = module.__dict__.get(_DISPATCH)
        dispatch = found if found is not None else _Dispatch(module)
        if found is None:
            module.__dict__[_DISPATCH] = dispatch
            module.__dict__["forward"] = dispatch
        if site in _INPUT_SITES:
            dispatch.before = (entry, *dispatch.before) if first else (*dispatch.before, entry)
        else:
            dispatch.after = (entry, *dispatch.after) if first else (*dispatch.after, entry)

    def detach() -> None:  # idempotent, like a RemovableHandle
        with _LOCK:
            dispatch.before = tuple(e for e in dispatch.before if e is not entry)
            dispatch.after = tuple(e for e in dispatch.after if e is not entry)
            if len(dispatch) or module.__dict__.get("forward") is not dispatch:
                return  # still in use, or wrapped again by someone else: stay a pass-through
            if dispatch.had_own:
                module.__dict__["forward"] = dispatch.original
            else:
                del module.__dict__["forward"]
            del module.__dict__[_DISPATCH]

    return detach


@contextmanager
def intervene(sites: ModelSites, handlers: Sequence[Handler]) -> Iterator[None]:
    """Run the block with ``handlers`` active at their sites, for this context only.

    Handlers at the same site run in the order given, each seeing the previous one's result, so
    a readout listed after a steer reads the steered stream.
    """
    token = object()
    detaches: list[Detach] = []
    reset = _ACTIVE.set(_ACTIVE.get() | {token})
    try:
        _attach_all(sites, handlers, token, detaches)
        yield
    finally:
        for detach in reversed(detaches):
            detach()
        try:
            _ACTIVE.reset(reset)
        except ValueError:  # exited from another context (a generator closed elsewhere)
            _ACTIVE.set(_ACTIVE.get() - {token})


@contextmanager
def attached(
    sites: ModelSites, handlers: Sequence[Handler], *, first: bool = False
) -> Iterator[object]:
    """Attach ``handlers`` under a fresh token that no context holds: they act only on the rows
    a ``RowMap`` gives that token, in forwards run inside ``shared_rows``. ``first`` puts them
    before the attachments already at each site. Yields the token; detaches all on exit."""
    token = object()
    detaches: list[Detach] = []
    try:
        _attach_all(sites, handlers, token, detaches, first)
        yield token
    finally:
        for detach in reversed(detaches):
            detach()


def _attach_all(
    sites: ModelSites,
    handlers: Sequence[Handler],
    token: object,
    detaches: list[Detach],
    first: bool = False,
) -> None:
    """Attach ``handlers`` under ``token``, appending each undo to ``detaches`` as it goes (so
    a failure half way still leaves the caller able to remove what was attached)."""
    wanted: dict[tuple[Site, int], list[Handler]] = {}
    for handler in handlers:
        for key in handler.wants():
            wanted.setdefault(key, []).append(handler)
    for (site, layer), chain in sorted(wanted.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        module = _site_module(sites, site, layer)
        detaches.append(_attach(module, (token, site, layer, tuple(chain)), first))
