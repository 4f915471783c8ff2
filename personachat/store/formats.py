"""Import and export persona vectors and neuron index lists in other tools' file formats.

Import (``read_vector``): ``.safetensors`` (ours, with full provenance, or any file with a
``vector`` tensor or per-layer tensors), ``.npz`` (one array per layer, as the Persona Vector
Analysis Toolkit's ``quick_persona_extract.py`` saves; read with ``allow_pickle=False``), ``.pt``
(a tensor ``[n_layers(+1), hidden]`` as safety-research/persona_vectors saves it; read with
``torch.load(weights_only=True)`` so a pickle that carries code is refused) and ``.gguf`` control
vectors.
Export (``write_vector``): ``.safetensors`` (the store's own file layout), ``.pt`` (persona_vectors
layout) and llama.cpp control-vector ``.gguf`` (``direction.<layer>`` tensors, as llama.cpp and
repeng read them).

Layer conventions: ours is "layer i = output of decoder block i = hidden_states[i+1]".
persona_vectors' ``.pt`` rows index ``hidden_states`` (row 0 = embeddings), so a tensor with
``n_layers + 1`` rows loses row 0 on import and gains a zero row 0 on export. llama.cpp's
``direction.<i>`` is added to the output of decoder block i, so it is our layer i; llama.cpp
rejects ``direction.0``, so layer 0 is not exported to GGUF. Per-layer keys in ``.npz`` /
``.safetensors`` files are read as our layer numbers unless ``layer_offset`` says otherwise
(``layer_offset=1`` for keys that count ``hidden_states``).

Neuron index lists (``parse_index_lists``, ``neuron_set_from_index_lists``,
``register_index_lists``) turn published lists of unit indices into ``NeuronSet`` records with
their source, e.g. the Llama-2-7B layer-15 gate_proj lists of the persona-llm-study README
(``SEED_000_LISTS``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load as st_load, save as st_save

from personachat.records import POSITIONS, ModelInfo, NeuronSet, PersonaVector
from personachat.store.tensorfile import (
    VECTOR_FORMAT,
    read_safetensors_metadata,
    vector_from_tensors,
    vector_metadata,
    vector_tensors,
)

if TYPE_CHECKING:
    from personachat.store.store import Store

log = logging.getLogger(__name__)

VECTOR_SUFFIXES = (".safetensors", ".npz", ".pt", ".gguf")
EXPORT_SUFFIXES = (".safetensors", ".pt", ".gguf")

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


class FormatError(ValueError):
    """A file cannot be imported or exported; the message says why and what to do."""


# --- vectors: import ---------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _positions_from_name(name: str) -> str:
    for positions in POSITIONS:
        if positions in name:
            return positions
    return "response_avg"


def _layer_of(key: str) -> int | None:
    match = re.search(r"(\d+)$", key)
    return int(match.group(1)) if match else None


def _stack_rows(
    tensor: torch.Tensor, info: ModelInfo, source: str, layer: int | None
) -> torch.Tensor:
    """[n_layers, hidden] from [n_layers(+1 embeddings row), hidden], or [hidden] + layer."""
    tensor = tensor.detach().to("cpu", torch.float32)
    if tensor.dim() == 1 or (tensor.dim() == 2 and tensor.shape[0] == 1 and layer is not None):
        if layer is None:
            raise FormatError(
                f"{source} holds a single vector of {tensor.shape[-1]} dims; pass the layer it "
                f"belongs to (layer=..., CLI --layer, 0..{info.n_layers - 1})"
            )
        return _place({layer: tensor.reshape(-1)}, info, source)
    if tensor.dim() != 2:
        raise FormatError(f"{source}: expected [n_layers, hidden], got {tuple(tensor.shape)}")
    rows, hidden = tensor.shape
    if hidden != info.hidden_size:
        raise FormatError(
            f"{source} has {hidden} dims per layer but {info.model_id!r} has hidden size "
            f"{info.hidden_size}; was it extracted from another model?"
        )
    if rows == info.n_layers + 1:
        return tensor[1:].clone()  # hidden_states layout: drop the embeddings row
    if rows == info.n_layers:
        return tensor.clone()
    raise FormatError(
        f"{source} has {rows} layers but {info.model_id!r} has {info.n_layers} decoder layers "
        f"(expected {info.n_layers} rows, or {info.n_layers + 1} with the embeddings first)"
    )


def _place(by_layer: dict[int, torch.Tensor], info: ModelInfo, source: str) -> torch.Tensor:
    """Per-layer 1-D vectors into a zero-filled [n_layers, hidden] tensor."""
    out = torch.zeros(info.n_layers, info.hidden_size)
    for layer, vec in sorted(by_layer.items()):
        if not 0 <= layer < info.n_layers:
            raise FormatError(
                f"{source}: layer {layer} is outside 0..{info.n_layers - 1} of {info.model_id!r}"
                " (keys counting hidden_states need layer_offset=1)"
            )
        if vec.numel() != info.hidden_size:
            raise FormatError(
                f"{source}: layer {layer} has {vec.numel()} dims but {info.model_id!r} has "
                f"hidden size {info.hidden_size}"
            )
        out[layer] = vec.reshape(-1).to(torch.float32)
    missing = sorted(set(range(info.n_layers)) - set(by_layer))
    if missing:
        log.warning("%s: no vector for layers %s; they are stored as zeros", source, missing)
    return out


def _from_mapping(
    tensors: dict[str, torch.Tensor],
    info: ModelInfo,
    source: str,
    layer: int | None,
    layer_offset: int,
) -> torch.Tensor:
    for key in ("vector", "vectors", "direction"):
        if key in tensors:
            return _stack_rows(tensors[key], info, source, layer)
    if len(tensors) == 1:
        [(key, value)] = tensors.items()
        if value.dim() == 2 or _layer_of(key) is None:
            return _stack_rows(value, info, source, layer)
    by_layer: dict[int, torch.Tensor] = {}
    for key, value in tensors.items():
        number = _layer_of(key)
        if number is None:
            raise FormatError(
                f"{source}: cannot tell the layer of array {key!r} (keys: {sorted(tensors)}); "
                "expected one array per layer named like 'layer_15', or a 'vector' array"
            )
        by_layer[number - layer_offset] = torch.as_tensor(value).reshape(-1)
    return _place(by_layer, info, source)


def _load_pt(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise FormatError(
            f"refusing to load {path}: it is a pickle that needs more than plain tensors "
            f"(weights_only=True rejected it: {str(err).splitlines()[0]}). It may run code; "
            "convert it to .safetensors in a trusted environment"
        ) from err
    except (RuntimeError, EOFError, ValueError) as err:
        raise FormatError(f"cannot read {path} as a torch tensor file: {err}") from err


def read_vector(
    path: str | Path,
    info: ModelInfo,
    persona: str | None = None,
    *,
    layer: int | None = None,
    layer_offset: int = 0,
    positions: str | None = None,
    baseline: str = "default",
) -> PersonaVector:
    """Read a persona vector for model ``info`` from a .safetensors/.npz/.pt/.gguf file.

    ``persona`` defaults to our own file's metadata or the file name's stem. Vectors from other
    tools get ``method="imported"`` and ``dataset="imported:<file name>"`` with the file's sha256.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VECTOR_SUFFIXES:
        raise FormatError(f"cannot import {path}: use one of {VECTOR_SUFFIXES}")
    if not path.is_file():
        raise FormatError(f"cannot import {path}: no such file")
    if suffix == ".safetensors":
        data = path.read_bytes()
        meta = read_safetensors_metadata(data)
        tensors = st_load(data)
        if meta.get("format") == VECTOR_FORMAT:
            return _read_own(tensors, meta, path, info, persona)
        matrix = _from_mapping(tensors, info, str(path), layer, layer_offset)
    elif suffix == ".npz":
        matrix = _read_npz(path, info, layer, layer_offset)
    elif suffix == ".pt":
        matrix = _read_pt(path, info, layer, layer_offset)
    else:
        matrix = _read_gguf(path, info)
    return PersonaVector(
        model_id=info.model_id,
        persona=persona or path.stem.split(".")[0],
        vector=matrix,
        method="imported",
        positions=positions or _positions_from_name(path.name),
        baseline=baseline,
        dataset=f"imported:{path.name}",
        dataset_sha256=_sha256(path),
    )


def _read_own(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, str],
    path: Path,
    info: ModelInfo,
    persona: str | None,
) -> PersonaVector:
    """A vector in the store's own file layout, with its provenance, imported for ``info``."""
    source = str(path)
    vec = vector_from_tensors(tensors, meta, source=source)
    if vec.model_id != info.model_id:
        log.warning("%s was made for %r, imported for %r", path, vec.model_id, info.model_id)
    _stack_rows(vec.vector, info, source, None)  # shape check only
    vec.model_id = info.model_id
    if persona is not None:
        vec.persona = persona
    return vec


def _read_npz(path: Path, info: ModelInfo, layer: int | None, layer_offset: int) -> torch.Tensor:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: torch.from_numpy(np.asarray(npz[k], dtype=np.float32)) for k in npz}
    except ValueError as err:
        raise FormatError(f"refusing {path}: it needs pickle to load ({err})") from err
    return _from_mapping(arrays, info, str(path), layer, layer_offset)


def _read_pt(path: Path, info: ModelInfo, layer: int | None, layer_offset: int) -> torch.Tensor:
    obj = _load_pt(path)
    if isinstance(obj, torch.Tensor):
        return _stack_rows(obj, info, str(path), layer)
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        tensors = {str(k): v for k, v in obj.items()}
        return _from_mapping(tensors, info, str(path), layer, layer_offset)
    raise FormatError(f"{path} holds a {type(obj).__name__}, not a tensor or dict of them")


def _read_gguf(path: Path, info: ModelInfo) -> torch.Tensor:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    by_layer: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        number = _layer_of(tensor.name) if tensor.name.startswith("direction.") else None
        if number is not None:
            by_layer[number] = torch.from_numpy(np.array(tensor.data, dtype=np.float32))
    if not by_layer:
        raise FormatError(f"{path} has no direction.<layer> tensors; not a control vector")
    return _place(by_layer, info, str(path))


# --- vectors: export ---------------------------------------------------------------------------


def write_vector(
    vector: PersonaVector,
    path: str | Path,
    *,
    info: ModelInfo | None = None,
    layers: list[int] | None = None,
    scale: float = 1.0,
) -> Path:
    """Write ``vector`` to ``path`` (format from the suffix); the file appears atomically.

    ``layers`` and ``scale`` apply to GGUF only (default: every layer but 0, scale 1).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EXPORT_SUFFIXES:
        raise FormatError(f"cannot export to {path}: use one of {EXPORT_SUFFIXES}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if suffix == ".safetensors":
            tmp.write_bytes(st_save(vector_tensors(vector), vector_metadata(vector, info)))
        elif suffix == ".pt":
            matrix = vector.vector.detach().cpu()
            rows = torch.cat([torch.zeros_like(matrix[:1]), matrix])  # hidden_states layout
            torch.save(rows.contiguous(), tmp)
        else:
            _write_gguf(vector, tmp, info, layers, scale)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_gguf(
    vector: PersonaVector,
    path: Path,
    info: ModelInfo | None,
    layers: list[int] | None,
    scale: float,
) -> None:
    from gguf import GGUFWriter

    n_layers = vector.n_layers
    chosen = list(range(1, n_layers)) if layers is None else sorted(set(layers))
    if 0 in chosen or any(not 0 < layer < n_layers for layer in chosen):
        raise FormatError(
            f"GGUF control vectors take layers 1..{n_layers - 1} (llama.cpp rejects "
            f"direction.0); got {chosen}"
        )
    writer = GGUFWriter(path, "controlvector")
    writer.add_string("controlvector.model_hint", info.architecture if info else "llama")
    writer.add_uint32("controlvector.layer_count", len(chosen))
    for layer in chosen:
        row = (vector.vector[layer].detach().to("cpu", torch.float32) * scale).numpy()
        writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(row))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --- neuron index lists ------------------------------------------------------------------------


def parse_index_lists(text: str) -> dict[str, list[int]]:
    """``label: [i, j, ...]`` lines (or a JSON object / list) -> {label: indices}.

    Markdown table rows ``| a man vs a woman | [6953, ...] |`` and bullet lines work too; labels
    become safe names (``a_man_vs_a_woman``). A bare list gets the label ``indices``.
    """
    stripped = text.strip()
    if stripped.startswith(("{", "[")):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, list):
            return {"indices": [int(x) for x in data]}
        if isinstance(data, dict):
            return {_safe_label(str(k)): [int(x) for x in v] for k, v in data.items()}
    lists: dict[str, list[int]] = {}
    for line in text.splitlines():
        match = re.search(r"\[(\s*\d+(?:\s*,\s*\d+)*\s*)\]", line)
        if not match:
            continue
        before = line[: match.start()]
        label = re.sub(r"[*`#|:\-]+", " ", before).strip() or f"list{len(lists)}"
        lists[_safe_label(label)] = [int(x) for x in match.group(1).split(",")]
    if not lists:
        raise FormatError("no index list like [12, 34, 56] found in the text")
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
    """Register ``info`` (if new) and a neuron set built from index lists; returns the set."""
    if info.model_id not in {m.model_id for m in store.models()}:
        store.register_model(info)
    neurons = neuron_set_from_index_lists(info, label, layer, lists, site=site, source=source)
    store.register_neurons([neurons])
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
