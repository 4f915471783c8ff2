"""The one recording handler: keep what a forward pass computes at chosen sites, change nothing.

    rec = Recorder.at("residual", range(3), stop=True)
    with intervene(lm.sites, [rec]):
        forward(lm, batch)          # ends after layer 2's block
    rec.get(1)                      # [B, T, hidden] at layer 1, float32

By default each activation is kept as a float32 copy, detached from the graph, and only the last
forward's (``every=True`` keeps each forward's, in order, e.g. every step of a generation).
``grad=True`` keeps the tensors in the autograd graph instead, so gradients can be taken with
respect to them; a site reached before anything requires grad (frozen weights) becomes a leaf
that does. ``stop=True`` ends the forward (``StopForward``) once the last wanted site has run.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from personachat.hooks import Site, StopForward

# Where each site sits inside a decoder block, in the order a forward reaches them.
_ORDER: dict[str, int] = {"attn_heads": 0, "gate": 1, "mlp_hidden": 2, "residual": 3}

Key = tuple[Site, int]


class Recorder:
    """Keeps the activation at every wanted ``(site, layer)`` of a forward (see the module)."""

    def __init__(
        self, keys: Iterable[Key], *, stop: bool = False, grad: bool = False, every: bool = False
    ) -> None:
        self.keys: list[Key] = list(dict.fromkeys(keys))
        self.stop, self.grad, self.every = stop, grad, every
        order = sorted(self.keys, key=lambda k: (k[1], _ORDER.get(k[0], 9)))
        self.final: Key | None = order[-1] if order else None
        self.acts: dict[Key, torch.Tensor] = {}
        self.history: dict[Key, list[torch.Tensor]] = {k: [] for k in self.keys}

    @classmethod
    def at(
        cls, site: Site, layers: Iterable[int], *, stop: bool = False, grad: bool = False
    ) -> Recorder:
        """A recorder of one site at ``layers``."""
        return cls([(site, layer) for layer in layers], stop=stop, grad=grad)

    def wants(self) -> Iterable[Key]:
        return self.keys

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        key = (site, layer)
        replaced = None
        if not self.grad:
            kept = x.detach().to(torch.float32, copy=True)
        elif x.requires_grad:
            kept = x
        else:
            kept = replaced = x.detach().requires_grad_(True)
        self.acts[key] = kept
        if self.every:
            self.history[key].append(kept)
        if self.stop and key == self.final:
            raise StopForward
        return replaced

    def get(self, layer: int, site: Site | None = None) -> torch.Tensor:
        """The activation at ``layer`` (of ``site``, or of the one site recorded)."""
        if site is None:
            sites = {s for s, _ in self.keys}
            if len(sites) != 1:
                raise ValueError(f"this recorder keeps sites {sorted(sites)}; name one")
            return self.acts[(next(iter(sites)), layer)]
        return self.acts[(site, layer)]

    def clear(self) -> None:
        """Forget what was recorded (the next forward starts afresh)."""
        self.acts.clear()
        for seen in self.history.values():
            seen.clear()
