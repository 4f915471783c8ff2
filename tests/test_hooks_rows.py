"""Row maps: in a shared forward each attached token acts on its own rows, and on nothing else.

Also: the stacked handlers of ``personachat.interventions.shared`` do to each row of a batch
what that row's own plan does to it alone at a generated token.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from personachat.chat.kvcache import BatchCache
from personachat.hooks import ALL_ROWS, RowMap, Site, attached, hook_count, intervene, shared_rows
from personachat.interventions import AblationSpec, DirectionSpec, SteeringSpec, build_plan
from personachat.interventions.shared import SharedPlan, row_effects
from personachat.model import LoadedModel
from personachat.model.tiny import tiny_model
from personachat.records import PersonaVector

cached_tiny = functools.cache(tiny_model)


class Add:
    """Adds ``value`` at the residual output of ``layer``, and records the rows it saw."""

    def __init__(self, value: float, layer: int = 1, fail: bool = False) -> None:
        self.value, self.layer, self.fail = value, layer, fail
        self.seen: list[torch.Tensor] = []

    def wants(self) -> Iterable[tuple[Site, int]]:
        return [("residual", self.layer)]

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        if self.fail:
            raise KeyError("boom")
        return x + self.value


def block_output(lm: LoadedModel, ids: torch.Tensor, layer: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(ids, output_hidden_states=True).hidden_states[layer + 1]


def test_each_token_changes_its_rows_only_and_a_failure_stays_with_its_owner() -> None:
    lm = cached_tiny("llama")
    ids = torch.tensor([[5, 6, 7, 8]] * 5)
    plain = block_output(lm, ids)
    before = hook_count(lm.model)  # after transformers' own output-capture hooks exist
    a, b, bad = Add(1.0), Add(-2.0), Add(3.0, fail=True)
    with (
        attached(lm.sites, [a]) as ta,
        attached(lm.sites, [b]) as tb,
        attached(lm.sites, [bad]) as tbad,
    ):
        assert block_output(lm, ids).equal(plain)  # no row map: attached tokens do nothing
        rows = RowMap({ta: slice(0, 2), tb: slice(3, 4), tbad: slice(4, 5)})
        with shared_rows(rows):
            out = block_output(lm, ids)
    assert [x.shape[0] for x in a.seen] == [2] and [x.shape[0] for x in b.seen] == [1]
    torch.testing.assert_close(out[0:2], plain[0:2] + 1.0)
    assert out[2].equal(plain[2])
    torch.testing.assert_close(out[3], plain[3] - 2.0)
    assert out[4].equal(plain[4])  # the failing owner's row is left as it was
    assert list(rows.errors) == [tbad] and isinstance(rows.errors[tbad], KeyError)
    assert hook_count(lm.model) == before


def test_all_rows_and_first_put_a_token_before_the_others() -> None:
    lm = cached_tiny("llama")
    ids = torch.tensor([[5, 6, 7]] * 3)
    plain = block_output(lm, ids)
    before = hook_count(lm.model)
    order: list[str] = []

    class Mark(Add):
        def __init__(self, name: str) -> None:
            super().__init__(0.0)
            self.name = name

        def __call__(self, site: Site, layer: int, x: torch.Tensor) -> torch.Tensor:
            order.append(self.name)
            return x * 2.0

    with (
        attached(lm.sites, [Mark("late")]) as late,
        attached(lm.sites, [Mark("first")], first=True) as early,
    ):
        with shared_rows(RowMap({late: slice(1, 2), early: ALL_ROWS})):
            out = block_output(lm, ids)
    assert order == ["first", "late"]
    torch.testing.assert_close(out[1], plain[1] * 4.0)
    torch.testing.assert_close(out[0], plain[0] * 2.0)
    with pytest.raises(KeyError), attached(lm.sites, [Add(0.0, fail=True)]) as token:
        with shared_rows(RowMap({token: ALL_ROWS})):
            block_output(lm, ids)  # a whole-batch owner's error is everyone's
    assert hook_count(lm.model) == before


def test_stacked_effects_equal_each_rows_own_plan_at_a_generated_token() -> None:
    """Four rows, each prefilled alone under its own plan, then ONE decode step with the stacked
    handlers: each row's logits and readout equal its own plan's decode step alone."""
    lm = cached_tiny("llama")
    g = torch.Generator().manual_seed(5)
    shape = (lm.info.n_layers, lm.info.hidden_size)
    vectors = {
        n: PersonaVector(
            lm.info.model_id,
            n,
            torch.randn(shape, generator=g),
            baseline_mean=torch.randn(shape, generator=g),
        )
        for n in ("pirate", "cynic")
    }
    specs: list[dict[str, Any]] = [
        {"steering": SteeringSpec({"pirate": 1.0}, layers="0-2:2"), "readout": ["cynic"]},
        {"readout": ["pirate", "cynic"]},
        {
            "ablation": AblationSpec(neurons="1:3,1:9,2:5"),
            "direction": DirectionSpec("cynic", mode="mean"),
            "readout": ["pirate"],
        },
        {"steering": SteeringSpec({"cynic": 1.0}, layers="1", positions="prompt")},
    ]
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    nxt = torch.tensor([[11]])
    want = []
    for spec in specs:  # each row alone: its prompt, then one generated token
        plan = build_plan(lm, vectors, prompt_len=5, **spec)
        with torch.no_grad(), intervene(lm.sites, plan.handlers):
            cache = DynamicCache(config=lm.model.config)
            lm.model(input_ids=ids, cache=cache, use_cache=True)
            logits = lm.model(input_ids=nxt, cache=cache, use_cache=True).logits[0, -1]
        want.append((logits, None if plan.readout is None else plan.readout.result()[0, -1]))
    batch = BatchCache()
    effects = []
    for spec in specs:  # the shared path: prompts alone, caches joined, one stacked step
        plan = build_plan(lm, vectors, prompt_len=5, **spec)
        with torch.no_grad(), intervene(lm.sites, plan.handlers):
            cache = DynamicCache(config=lm.model.config)
            lm.model(input_ids=ids, cache=cache, use_cache=True)
        batch.add(cache, torch.ones_like(ids))
        effects.append(row_effects(plan, 0))
    shared = SharedPlan(effects)
    with attached(lm.sites, shared.handlers, first=True) as token, torch.no_grad():
        with shared_rows(RowMap({token: ALL_ROWS})):
            out = lm.model(
                input_ids=nxt.repeat(4, 1),
                attention_mask=batch.grow(),
                position_ids=torch.full((4, 1), 5),
                cache=batch.cache,
                use_cache=True,
            )
    assert shared.readout is not None
    readouts = shared.readout.take()
    for row, (logits, readout) in enumerate(want):
        torch.testing.assert_close(out.logits[row, -1], logits, rtol=1e-5, atol=1e-5)
        got = readouts[row]
        assert (got is None) == (readout is None)
        if got is not None:
            torch.testing.assert_close(got[0], readout, rtol=1e-5, atol=1e-5)
