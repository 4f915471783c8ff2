"""The extraction scripts' shared command line: which model to load, where results go, and how
lists and layer ranges are written (``"a,b"``, ``"all"``, ``"0-3,8"``).

The options parse once into frozen configs (``ModelConfig``, ``RunOptions``) that the scripts pass
down.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from personachat.activations import Dist
from personachat.interventions import InterventionError, parse_layer_list
from personachat.model import LoadedModel, SiteTemplates, load_model, templates_from_args
from personachat.pipeline.passes import AUTO_BATCH
from personachat.pipeline.responses import GenerationConfig


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and how (built from the scripts' command line)."""

    model: str
    device: str = "auto"
    dtype: str = "auto"
    templates: SiteTemplates | None = None


def add_model_args(parser: argparse.ArgumentParser, *, several: bool = False) -> None:
    """The model options shared by the extraction scripts."""
    help_model = "hub name or local path" + (" (comma-separated for several)" if several else "")
    parser.add_argument("--model", required=True, help=help_model)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--layers-path", help="override: dotted path of the decoder block list")
    parser.add_argument("--mlp-down-path", help="override: MLP output projection, per block")
    parser.add_argument("--gate-path", help="override: MLP gate projection, per block")


def model_configs(args: argparse.Namespace) -> list[ModelConfig]:
    """One config per model named in ``--model``, with the site overrides."""
    templates = templates_from_args(args.layers_path, args.mlp_down_path, args.gate_path)
    names = [m.strip() for m in str(args.model).split(",") if m.strip()]
    return [ModelConfig(n, args.device, args.dtype, templates) for n in names]


def load(cfg: ModelConfig, dist: Dist | None = None) -> LoadedModel:
    """Load the model; under several processes with GPUs each process takes its own GPU."""
    device = cfg.device
    if dist is not None and dist.world > 1 and device == "auto" and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', dist.rank))}"
    return load_model(cfg.model, dtype=cfg.dtype, device=device, templates=cfg.templates)


@dataclass(frozen=True)
class RunOptions:
    """Where the scripts' results go and how the work runs (their shared options)."""

    store: Path | None
    out: Path | None
    batch_size: int | None  # None: chosen for the device (``batch_size_for``)
    generation: GenerationConfig
    cache_dir: Path | None
    progress: bool


def add_run_args(parser: argparse.ArgumentParser, *, out_help: str) -> None:
    """The output and run options shared by the extraction scripts."""
    parser.add_argument(
        "--store", type=Path, help="store folder (default: $PERSONACHAT_STORE or store/)"
    )
    parser.add_argument("--no-store", action="store_true", help="do not register in the store")
    parser.add_argument("--out", type=Path, help=out_help)
    parser.add_argument(
        "--batch-size",
        type=parse_batch_size,
        default=None,
        metavar="N|auto",
        help="rows per forward, capture and generation (default auto: vectors "
        f"{AUTO_BATCH['cpu']} on a CPU, {AUTO_BATCH['cuda']} on a GPU; neuron scores 8)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="for generated responses")
    parser.add_argument("--seed", type=int, default=0, help="for generated responses")
    parser.add_argument(
        "--cache-dir", type=Path, help="response cache (default ~/.cache/personachat)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_options(args: argparse.Namespace) -> RunOptions:
    """The output and run options of the command line."""
    from personachat.store import default_store_root

    return RunOptions(
        store=None if args.no_store else (args.store or default_store_root()),
        out=args.out,
        batch_size=args.batch_size,
        generation=GenerationConfig(
            max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size or 8
        ),
        cache_dir=args.cache_dir,
        progress=not args.quiet,
    )


def parse_batch_size(text: str) -> int | None:
    """``"auto"`` -> None (chosen for the device); otherwise a whole number from 1."""
    if text.strip() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"batch size {text!r}: use a whole number from 1 or auto")
    return value


def parse_list(text: str | None) -> list[str] | None:
    """``"a,b"`` -> ``["a", "b"]``; ``None``/``""``/``"all"`` -> ``None``."""
    if not text or text.strip() == "all":
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_layers(text: str | None) -> list[int] | None:
    """``"all"`` -> ``None``; ``"0-3,8"`` -> ``[0, 1, 2, 3, 8]`` (checked against the model
    once it is loaded: ``check_layers``)."""
    items = parse_list(text)
    if items is None:
        return None
    try:
        return parse_layer_list(",".join(items), None)
    except InterventionError as err:
        raise ValueError(f"bad --layers {text!r}: {err}; use 'all', '5', '0-3' or '0-3,8'") from err
