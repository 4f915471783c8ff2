"""The one layer grammar: per-layer strengths, layer lists and neuron lists, read and written.

- strengths: ``"8-12:4, 13:2"`` (a layer or an inclusive range, colon, strength; a bare layer
  takes the default strength; ``"all:2"`` covers every layer; a later item overrides an earlier
  one), or the same as numbers: ``{8: 4.0, 13: 2.0}``, or layers alone (``range(0, 3)``) at the
  default strength;
- layers: ``"all"`` or ``"0-2, 5"`` (the same grammar without strengths), or numbers;
- neurons: ``"3:12, 3:40-45"`` (layer:index or layer:first-last).

Text is parsed once, into numbers; ``format_layer_spec`` and ``format_layers`` write numbers back
as text for people to read, never to be parsed again on the way to the model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from personachat.interventions.specs import PRESETS, InterventionError, check_finite

_ITEM = re.compile(r"^\s*(\d+|all)\s*(?:-\s*(\d+))?\s*(?::\s*(\S+))?\s*$", re.IGNORECASE)


def parse_layer_spec(spec: str, n_layers: int, default: float = 1.0) -> dict[int, float]:
    """Parse ``"8-12:4, 13:2"`` into ``{8: 4.0, ..., 12: 4.0, 13: 2.0}``.

    A bare ``"5"`` or ``"5-7"`` takes ``default``; ``"all:2"`` covers every layer; a later item
    overrides an earlier one (``"all:1, 5:3"``).
    """
    out: dict[int, float] = {}
    items = [item for item in spec.split(",") if item.strip()]
    if not items:
        raise InterventionError(
            f"empty layer spec {spec!r}; write layers and strengths like '8-12:4, 13:2' or "
            f"use a preset ({', '.join(PRESETS)})"
        )
    for item in items:
        match = _ITEM.match(item)
        if match is None:
            raise InterventionError(
                f"cannot read {item.strip()!r} in layer spec {spec!r}: write LAYER[:STRENGTH] or "
                "FIRST-LAST[:STRENGTH], e.g. '8-12:4, 13:2'"
            )
        first, last, value = match.groups()
        if first.lower() == "all":
            if last is not None:
                raise InterventionError(f"'all' in {spec!r} takes no range; write 'all:2'")
            lo, hi = 0, n_layers - 1
        else:
            lo, hi = int(first), int(last if last is not None else first)
        if lo > hi:
            raise InterventionError(f"range {lo}-{hi} in {spec!r} runs backwards; write {hi}-{lo}")
        if hi >= n_layers:
            raise InterventionError(
                f"layer {hi} in {spec!r} is out of range: the model has {n_layers} layers "
                f"(0..{n_layers - 1})"
            )
        strength = default if value is None else _parse_float(value, item.strip(), spec)
        for layer in range(lo, hi + 1):
            out[layer] = strength
    return out


def _parse_float(text: str, item: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InterventionError(
            f"strength {text!r} in {item!r} (spec {spec!r}) is not a number"
        ) from None
    check_finite(value, f"strength in {item!r}")
    return value


def parse_neurons(spec: str, n_layers: int, mlp_width: int) -> list[tuple[int, int]]:
    """Parse ``"3:12,3:40,5:7"`` (or ``"3:10-19"``) into ``[(layer, index), ...]``."""
    out: list[tuple[int, int]] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        match = re.fullmatch(r"(\d+)\s*:\s*(\d+)(?:\s*-\s*(\d+))?", item)
        if match is None:
            raise InterventionError(
                f"cannot read neuron {item!r} in {spec!r}: write LAYER:INDEX or "
                "LAYER:FIRST-LAST, e.g. '3:12,3:40,5:7'"
            )
        layer, first = int(match[1]), int(match[2])
        last = int(match[3]) if match[3] is not None else first
        for index in range(first, last + 1):
            check_neuron(layer, index, n_layers, mlp_width)
            out.append((layer, index))
    return out


def check_neuron(layer: int, index: int, n_layers: int, mlp_width: int) -> tuple[int, int]:
    if not 0 <= layer < n_layers:
        raise InterventionError(
            f"neuron {layer}:{index}: layer {layer} is out of range: the model has {n_layers} "
            f"layers (0..{n_layers - 1})"
        )
    if not 0 <= index < mlp_width:
        raise InterventionError(
            f"neuron {layer}:{index}: index {index} is beyond the MLP width {mlp_width} "
            f"(indices 0..{mlp_width - 1})"
        )
    return layer, index


def layer_strengths(
    spec: str | Mapping[int, float] | Iterable[int],
    strength: float,
    n_layers: int,
    best: int | None,
    band: int,
) -> dict[int, float]:
    """Per-layer strengths from a preset (``best``, ``band``, ``all``), a layer spec, a mapping
    ``{layer: strength}`` (its values as given, like ``"8:4"``) or layers alone (each at
    ``strength``, like a bare ``"8"``)."""
    if isinstance(spec, Mapping):
        return checked_strengths(spec, n_layers)
    if not isinstance(spec, str):
        return dict.fromkeys(checked_layers(spec, n_layers), strength)
    name = spec.strip().lower()
    if name in ("best", "band"):
        if best is None:
            raise InterventionError(
                f"layer preset {name!r} needs layer metrics (AUC per layer), which this vector "
                "lacks; give layers explicitly, e.g. '8-12:4, 13:2'"
            )
        lo, hi = (best, best) if name == "best" else (best - band, best + band)
        return {layer: strength for layer in range(max(lo, 0), min(hi, n_layers - 1) + 1)}
    if name == "all":
        return dict.fromkeys(range(n_layers), strength)
    return parse_layer_spec(spec, n_layers, default=strength)


def parse_layer_list(text: str, n_layers: int | None) -> list[int]:
    """``"all"`` or ``"0-2, 5"`` -> the layers, sorted; strengths (``"1:2"``) are refused.
    ``n_layers`` None: not yet known ("all" is then refused; ranges are not bounded)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise InterventionError(
            "no layers given: type 'all' or layers and ranges, e.g. '0-2, 5'"
            + (f" (the model has layers 0..{n_layers - 1})" if n_layers else "")
        )
    for item in items:
        if ":" in item:
            raise InterventionError(
                f"{item!r} gives a strength, but only layers are wanted here; list layers "
                "only, e.g. 'all' or '0-2, 5'"
            )
        if not _LAYERS.fullmatch(item):
            raise InterventionError(
                f"cannot read {item!r}; write 'all', a layer or a range, e.g. '0-2, 5'"
            )
    if n_layers is None:
        if any(item.lower() == "all" for item in items):
            raise InterventionError("'all' needs the model's layer count here")
        n_layers = 1 + max(int(n) for item in items for n in re.findall(r"\d+", item))
    return sorted(parse_layer_spec(", ".join(items), n_layers))


_LAYERS = re.compile(r"all|\d+(\s*-\s*\d+)?", re.IGNORECASE)


def checked_layers(layers: Iterable[int], n_layers: int) -> list[int]:
    """``layers`` sorted and deduplicated, each a whole number in 0..n_layers-1."""
    out = []
    for layer in layers:
        if isinstance(layer, bool) or int(layer) != layer:
            raise InterventionError(f"layer {layer!r} is not a whole number")
        if not 0 <= int(layer) < n_layers:
            raise InterventionError(
                f"layer {layer} is out of range: the model has {n_layers} layers "
                f"(0..{n_layers - 1})"
            )
        out.append(int(layer))
    return sorted(set(out))


def checked_strengths(strengths: Mapping[int, float], n_layers: int) -> dict[int, float]:
    """A ``{layer: strength}`` mapping checked like a parsed spec: layers in range, finite."""
    out: dict[int, float] = {}
    for layer in checked_layers(strengths, n_layers):
        value = float(strengths[layer])
        check_finite(value, f"strength at layer {layer}")
        out[layer] = value
    return out


def format_layer_spec(strengths: Mapping[int, float]) -> str:
    """The compact spec of ``strengths``, merging runs of equal strength: ``"1-3:4, 5:2"``."""
    parts: list[str] = []
    run: list[int] = []
    for layer in sorted(strengths):
        if run and layer == run[-1] + 1 and strengths[layer] == strengths[run[0]]:
            run.append(layer)
            continue
        if run:
            parts.append(_format_run(run, strengths[run[0]]))
        run = [layer]
    if run:
        parts.append(_format_run(run, strengths[run[0]]))
    return ", ".join(parts)


def _format_run(run: list[int], strength: float) -> str:
    layers = str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"
    return f"{layers}:{strength:g}"


def format_layers(layers: Iterable[int]) -> str:
    """The compact spec of a set of layers: ``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    runs = format_layer_spec(dict.fromkeys(layers, 1.0)).split(", ")
    return ", ".join(run.partition(":")[0] for run in runs if run)
