"""Neuron index lists: published lists of MLP unit indices turned into ``NeuronSet`` records.

``parse_index_lists`` reads ``label: [i, j, ...]`` lines, Markdown rows and bullets, or a JSON
object ``{label: [indices]}`` / list ``[indices]``; anything else (a number, nested lists,
non-integers, JSON nested thousands of levels deep) is a ``FormatError`` naming the offending
value. ``neuron_set_from_index_lists`` ranks the units across lists and checks them against the
model's MLP width; ``register_index_lists`` stores the set. ``SEED_000_LISTS`` are the Llama-2-7B
layer-15 gate_proj lists of the persona-llm-study README, registered without weights
(``register_seed_000``); ``KNOWN_MODELS`` are the models such lists may name without loading them.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from personachat.records import ModelInfo, NeuronSet
from personachat.store.errors import FormatError

if TYPE_CHECKING:
    from personachat.store.store import Store

LLAMA2_7B = ModelInfo(
    model_id="meta-llama/Llama-2-7b-hf",
    revision=None,
    architecture="llama",
    n_layers=32,
    hidden_size=4096,
    mlp_width=11008,
)
KNOWN_MODELS: dict[str, ModelInfo] = {LLAMA2_7B.model_id: LLAMA2_7B}

SEED_000_SOURCE = (
    "persona-llm-study README (shared/seeds/000_2cfd62f563e92e35.txt): Llama-2-7B-hf, "
    "layer 15 MLP gate_proj, top-5 units by |mean activation difference| per persona pair"
)
SEED_000_LAYER = 15
SEED_000_LISTS: dict[str, dict[str, list[int]]] = {
    "seed000_teacher_vs_student": {"teacher_vs_student": [8372, 725, 6718, 3575, 4536]},
    "seed000_gender": {
        "a_man_vs_a_woman": [6953, 8595, 8140, 10437, 8195],
        "a_male_doctor_vs_a_female_doctor": [6953, 10878, 2826, 1095, 9542],
        "a_son_vs_a_daughter": [6953, 10283, 6063, 8595, 2400],
    },
}
NO_LIST = "no index list like [12, 34, 56] found in the text"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _indices(label: str, value: Any) -> list[int]:
    """A JSON value as a list of unit indices, or FormatError naming the offending value."""
    if not isinstance(value, list):
        raise FormatError(
            f"list {label!r} is {_short(value)}, not a list of unit indices like [12, 34]"
        )
    for x in value:
        if not isinstance(x, int) or isinstance(x, bool):
            raise FormatError(
                f"list {label!r}: {_short(x)} is not a unit index (a whole number like 12)"
            )
    return list(value)


def _from_json(stripped: str) -> dict[str, list[int]] | None:
    """The lists of a JSON text, or None if it is not JSON (then it is read as lines)."""
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError:
        return None
    except RecursionError:
        raise FormatError(
            "the JSON is nested too deeply to be index lists; expected {label: [12, 34]} or "
            "[12, 34]"
        ) from None
    if isinstance(data, list):
        lists = {"indices": _indices("indices", data)} if data else {}
    elif isinstance(data, dict):
        lists = {_safe_label(str(k)): _indices(str(k), v) for k, v in data.items()}
    else:
        return None
    if not lists or not any(lists.values()):
        raise FormatError(NO_LIST)
    return lists


def parse_index_lists(text: str) -> dict[str, list[int]]:
    """``label: [i, j, ...]`` lines (or a JSON object / list) -> {label: indices}.

    Markdown table rows ``| a man vs a woman | [6953, ...] |`` and bullet lines work too; labels
    become safe names (``a_man_vs_a_woman``). A bare list gets the label ``indices``.
    """
    stripped = text.strip()
    if stripped.startswith(("{", "[")):
        found = _from_json(stripped)
        if found is not None:
            return found
    lists: dict[str, list[int]] = {}
    for line in text.splitlines():
        match = re.search(r"\[(\s*\d+(?:\s*,\s*\d+)*\s*)\]", line)
        if not match:
            continue
        before = line[: match.start()]
        label = re.sub(r"[*`#|:\-]+", " ", before).strip() or f"list{len(lists)}"
        lists[_safe_label(label)] = [int(x) for x in match.group(1).split(",")]
    if not lists:
        near = re.search(r"\[[^\[\]\n]{1,60}\]", text)
        hint = (
            f"; {near.group()!r} is not one: unit indices are whole numbers 0 and up"
            if near
            else ""
        )
        raise FormatError(NO_LIST + hint)
    return lists


def _safe_label(text: str) -> str:
    label = re.sub(r"[^A-Za-z0-9]+", "_", text.strip()).strip("_").lower()
    return label[:100] or "indices"


def neuron_set_from_index_lists(
    info: ModelInfo,
    label: str,
    layer: int,
    lists: dict[str, list[int]],
    *,
    site: str = "gate",
    source: str = "",
) -> NeuronSet:
    """A NeuronSet from ranked index lists (one per contrast pair) at one layer.

    Units are ordered by how many pairs list them, then by mean rank. ``ranks[pair][i]`` is the
    unit's rank in that pair's list (-1 if absent) and ``stability[i]`` the fraction of pairs
    listing it. Scores are unknown (empty). Indices are checked against ``info.mlp_width``.
    """
    for pair, indices in lists.items():
        bad = [i for i in indices if not 0 <= i < info.mlp_width]
        if bad:
            raise FormatError(
                f"list {pair!r}: indices {bad} are outside the MLP width {info.mlp_width} "
                f"of {info.model_id!r}"
            )
    units = list(dict.fromkeys(i for indices in lists.values() for i in indices))
    ranks = {p: [ix.index(u) if u in ix else -1 for u in units] for p, ix in lists.items()}

    def key(pos: int) -> tuple[float, float]:
        found = [r[pos] for r in ranks.values() if r[pos] >= 0]
        return (-len(found), sum(found) / len(found))

    order = sorted(range(len(units)), key=key)
    return NeuronSet(
        model_id=info.model_id,
        label=label,
        site=site,
        layers=[layer] * len(units),
        indices=[units[i] for i in order],
        scores=[],
        method="imported",
        pairs=list(lists),
        ranks={p: [r[i] for i in order] for p, r in ranks.items()},
        stability=[-key(i)[0] / len(lists) for i in order],
        source=source,
    )


def register_index_lists(
    store: Store,
    info: ModelInfo,
    label: str,
    layer: int,
    lists: dict[str, list[int]],
    *,
    site: str = "gate",
    source: str = "",
) -> NeuronSet:
    """Register a neuron set built from index lists, with ``info`` if the store does not know
    it yet (in one transaction: a refused set leaves no model row); returns the set."""
    new = info.model_id not in {m.model_id for m in store.models()}
    neurons = neuron_set_from_index_lists(info, label, layer, lists, site=site, source=source)
    store.register_neurons([neurons], model=info if new else None)
    return neurons


def register_seed_000(store: Store) -> list[NeuronSet]:
    """Register the persona-llm-study README's Llama-2-7B layer-15 gate_proj lists (no weights
    needed)."""
    return [
        register_index_lists(
            store, LLAMA2_7B, label, SEED_000_LAYER, lists, site="gate", source=SEED_000_SOURCE
        )
        for label, lists in SEED_000_LISTS.items()
    ]
