"""The decision: the last prompt token, where the first token of a reply is chosen.

``Decision`` batches every persona's prompts (left-padded, so each prompt ends at -1) and reads
each row's log-odds of opening its reply the way its own persona does, with chosen units set to
fixed values there by ``PatchLast``. ``exact`` patching runs on it; ``patching`` reads the same
place with gradients.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from personachat.activations import Sample, pad_batch
from personachat.hooks import Site
from personachat.model import LoadedModel
from personachat.neurons.head import logits


def by_persona(samples: Sequence[Sample], n_personas: int) -> list[list[Sample]]:
    """``samples`` grouped by persona index, each group in the samples' order."""
    groups: list[list[Sample]] = [[] for _ in range(n_personas)]
    for sample in samples:
        groups[sample.persona].append(sample)
    return groups


def prompt_only(sample: Sample) -> Sample:
    """``sample`` cut at the end of its prompt (no reply, no position spans)."""
    return Sample(sample.persona, sample.ids[: sample.n_prompt], (), sample.n_prompt)


class PatchLast:
    """Sets chosen units at the last position of every row (left-padded prompts) to fixed values
    and keeps the site's activations there; ``units`` is swapped between forwards."""

    def __init__(self, site: Site, layers: Sequence[int]) -> None:
        self.site = site
        self.layers = list(layers)
        self.units: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.seen: dict[int, torch.Tensor] = {}

    def wants(self) -> Iterable[tuple[Site, int]]:
        return [(self.site, layer) for layer in self.layers]

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        self.seen[layer] = x[:, -1].detach()
        patch = self.units.get(layer)
        if patch is None:
            return None
        index, values = patch
        out = x.clone()
        out[:, -1, index] = values.to(out.dtype)
        return out


class Decision:
    """Every persona's prompts in one left-padded batch, and each row's log-odds of opening the
    way its own persona does, with chosen units patched (see ``exact_selection``)."""

    def __init__(
        self,
        lm: LoadedModel,
        by_persona: Sequence[Sequence[Sample]],
        n_questions: int,
        site: Site,
        layers: Sequence[int],
    ) -> None:
        self.lm = lm
        self.layers = list(layers)
        self.n_personas, self.n_questions = len(by_persona), n_questions
        prompts = [prompt_only(s) for group in by_persona for s in group[:n_questions]]
        self.batch = pad_batch(prompts, int(lm.tokenizer.pad_token_id or 0), "left", lm.device)
        vocab = lm.model.get_output_embeddings().weight.shape[0]
        own = torch.zeros((self.n_personas, vocab), dtype=torch.bool, device=lm.device)
        for p, group in enumerate(by_persona):  # the ways each persona opens its replies
            own[p, [s.ids[s.n_prompt] for s in group]] = True
        self.own = own.repeat_interleave(n_questions, 0)  # [rows, V]
        self.patch = PatchLast(site, layers)

    def run(self, units: Sequence[tuple[int, int]], values: torch.Tensor) -> torch.Tensor:
        """Log-odds [personas, questions] with ``units`` (layer slot, index) set to ``values``
        [L, W] at the last prompt token."""
        by_slot: dict[int, list[int]] = {}
        for slot, index in units:
            by_slot.setdefault(slot, []).append(index)
        self.patch.units = {
            self.layers[slot]: (
                torch.tensor(idx, device=values.device),
                values[slot, idx],
            )
            for slot, idx in by_slot.items()
        }
        out = self.lm.sites.base(
            input_ids=self.batch.input_ids,
            attention_mask=self.batch.attention_mask,
            position_ids=self.batch.position_ids,
            use_cache=False,
        )
        logp = torch.log_softmax(logits(self.lm, out.last_hidden_state[:, -1]).double(), -1)
        own = logp.masked_fill(~self.own, -torch.inf).logsumexp(-1)
        rest = logp.masked_fill(self.own, -torch.inf).logsumexp(-1)
        return (own - rest).view(self.n_personas, self.n_questions).cpu()

    def run_units(
        self, grid: Sequence[tuple[int, int]], values: torch.Tensor, picks: Sequence[int]
    ) -> torch.Tensor:
        """``run`` with the units ``grid[i]`` for ``i`` in ``picks``."""
        return self.run([grid[i] for i in picks], values)

    def activations(self) -> torch.Tensor:
        """Mean activation per persona at the last prompt token [P, L, W], unpatched."""
        self.run([], torch.zeros(0))
        seen = torch.stack([self.patch.seen[layer].double().cpu() for layer in self.layers], 1)
        return seen.view(self.n_personas, self.n_questions, *seen.shape[1:]).mean(1)
