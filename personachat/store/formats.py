"""Import and export persona vectors in other tools' file formats.

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

Neuron index lists are read by ``index_lists.py``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as st_save

from personachat.records import (
    MAX_VECTOR_VALUES,
    POSITIONS,
    ModelInfo,
    PersonaVector,
    check_model_sizes,
)
from personachat.store.errors import FormatError, IntegrityError
from personachat.store.tensorfile import (
    VECTOR_FORMAT,
    parse_safetensors,
    vector_from_tensors,
    vector_metadata,
    vector_tensors,
)

log = logging.getLogger(__name__)

VECTOR_SUFFIXES = (".safetensors", ".npz", ".pt", ".gguf")
EXPORT_SUFFIXES = (".safetensors", ".pt", ".gguf")
MAX_IMPORT_BYTES = 1 << 30  # a file to import, unpacked (the largest vector is 128 MiB)


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
    except Exception as err:  # a damaged pickle can stop the unpickler with any error
        raise FormatError(
            f"cannot read {path} as a torch tensor file: {damage(err)}; it is truncated, "
            "damaged or not made by torch.save. Save the tensor again, or as .safetensors"
        ) from err


def one_line(err: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(err).split()) or type(err).__name__


def damage(err: BaseException) -> str:
    """What a parser said about a damaged file, on one line with the error's kind (a bare
    ``KeyError: 1`` or ``IndexError`` says little without it)."""
    if isinstance(err, (OSError, ValueError, EOFError, zipfile.BadZipFile, RuntimeError)):
        return one_line(err)
    return f"{type(err).__name__}: {one_line(err)}"


def check_import(path: Path, info: ModelInfo) -> None:
    """Refuse, before reading anything, a model whose sizes are absurd, a file too large to be
    a persona vector, or an archive (.npz, .pt) that unpacks to more than that."""
    try:
        check_model_sizes(info)
    except ValueError as err:
        raise FormatError(f"cannot import {path}: {err}") from err
    size = path.stat().st_size
    if size > MAX_IMPORT_BYTES:
        raise FormatError(
            f"{path} is {size} bytes; a persona vector file is at most {MAX_IMPORT_BYTES}"
        )
    try:
        is_zip = zipfile.is_zipfile(path)
    except Exception as err:  # e.g. a zip64 end record that names several disks
        raise FormatError(f"{path} is a damaged zip archive: {damage(err)}") from err
    if path.suffix.lower() == ".npz" and not is_zip:
        raise FormatError(f"{path} is not an .npz (zip) archive; it is truncated or damaged")
    if not is_zip:
        return
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(item.file_size for item in archive.infolist())
    except Exception as err:  # e.g. a zip version this Python cannot read
        raise FormatError(f"{path} is a damaged zip archive: {damage(err)}") from err
    if unpacked > MAX_IMPORT_BYTES:
        raise FormatError(
            f"{path} unpacks to {unpacked} bytes; a persona vector file is at most "
            f"{MAX_IMPORT_BYTES}"
        )


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
    A damaged or forged file, or one too large for ``info``, is a one-line ``FormatError``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VECTOR_SUFFIXES:
        raise FormatError(f"cannot import {path}: use one of {VECTOR_SUFFIXES}")
    if not path.is_file():
        what = "it is a folder; pass the files in it" if path.is_dir() else "no such file"
        raise FormatError(f"cannot import {path}: {what}")
    check_import(path, info)
    if suffix == ".safetensors":
        tensors, meta = parse_safetensors(path.read_bytes(), str(path), FormatError)
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
    try:
        vec = vector_from_tensors(tensors, meta, source=source)
    except IntegrityError as err:
        raise FormatError(str(err)) from err
    if vec.model_id != info.model_id:
        log.warning("%s was made for %r, imported for %r", path, vec.model_id, info.model_id)
    _stack_rows(vec.vector, info, source, None)  # shape check only
    vec.model_id = info.model_id
    if persona is not None:
        vec.persona = persona
    return vec


def _npy_shapes(path: Path) -> None:
    """Refuse an .npz whose arrays' headers declare more values than a persona vector holds
    (numpy allocates what a header declares before reading a byte of data)."""
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                with archive.open(name) as member:
                    version = np.lib.format.read_magic(member)
                    if version == (1, 0):
                        shape, _, _ = np.lib.format.read_array_header_1_0(member)
                    else:
                        shape, _, _ = np.lib.format.read_array_header_2_0(member)
                if math.prod(shape) > MAX_VECTOR_VALUES:
                    raise FormatError(
                        f"{path}: array {name!r} declares shape {shape}, more than the "
                        f"{MAX_VECTOR_VALUES} values a persona vector may hold"
                    )
    except FormatError:
        raise
    except Exception as err:  # a damaged archive or header can fail with any error
        raise FormatError(f"{path} is not a readable .npz archive: {damage(err)}") from err


def _read_npz(path: Path, info: ModelInfo, layer: int | None, layer_offset: int) -> torch.Tensor:
    _npy_shapes(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: torch.from_numpy(np.asarray(npz[k], dtype=np.float32)) for k in npz}
    except ValueError as err:
        if "pickle" not in str(err):
            raise FormatError(f"{path} is not a readable .npz archive: {one_line(err)}") from err
        raise FormatError(f"refusing {path}: it needs pickle to load ({one_line(err)})") from err
    except Exception as err:  # e.g. a member packed with a method zipfile cannot unpack
        raise FormatError(f"{path} is not a readable .npz archive: {damage(err)}") from err
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

    by_layer: dict[int, torch.Tensor] = {}
    try:
        for tensor in GGUFReader(path).tensors:
            number = _layer_of(tensor.name) if tensor.name.startswith("direction.") else None
            if number is not None:
                by_layer[number] = torch.from_numpy(np.array(tensor.data, dtype=np.float32))
    except Exception as err:  # a damaged header can fail the reader with any error
        raise FormatError(f"{path} is not a readable GGUF file: {damage(err)}") from err
    if not by_layer:
        raise FormatError(f"{path} has no direction.<layer> tensors; not a control vector")
    if 0 in by_layer:
        raise FormatError(
            f"{path} holds direction.0, which llama.cpp rejects: its control-vector layers "
            "start at 1 (direction.<i> is added to the output of decoder block i), so this file "
            "was not written for llama.cpp and which block each direction belongs to is "
            "unknown. Export it again without layer 0, or save one array per layer as .npz "
            "and import that with the right --layer-offset"
        )
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
