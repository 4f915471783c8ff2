"""Find persona neurons: MLP units that separate contrast pairs, with cross-pair stability.

    python scripts/find_neurons.py --model meta-llama/Llama-2-7b-hf --dataset roles \\
        --layers 15 --site gate --method attribution --k 32 --out runs/llama_neurons

    accelerate launch --multi_gpu --num_processes 2 scripts/find_neurons.py ...(same flags)

(``--multi_gpu`` also works on CPU-only machines: torchrun + gloo; ``--cpu`` needs mpirun.)

Methods: ``effect`` (difference of means over the pooled std across prompts),
``attribution`` (activation x gradient of the log-prob of the persona's own reply),
``patching`` (attribution patching of the first reply token at the last prompt token) and
``exact`` (exact patching there, unit by unit, then a greedy persona-specific set; a forward per
unit, so pick ``--layers`` on large models). See ``personachat.neurons``. Each pair
gets a set labelled ``{pair}.{site}.{method}``; pairs of the same kind (role, gender) also get a
set of the units that rank high across them, with their rank in every pair. Sets go to the store
(``--store``; ``--no-store`` to skip) and, with ``--out``, to ``neurons.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass

from personachat.activations import Dist
from personachat.pipeline import (
    RunOptions,
    add_model_args,
    add_run_args,
    check_layers,
    find_neurons,
    load,
    model_configs,
    parse_layers,
    parse_list,
    register_results,
    run_options,
)
from personachat.prompts import load_dataset
from personachat.records import NEURON_SITES, POSITIONS, NeuronSet


@dataclass(frozen=True)
class Config:
    dataset: str
    pairs: list[str] | None
    layers: list[int] | None
    site: str
    method: str
    k: int
    positions: str
    run: RunOptions


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--dataset", default="roles", help="built-in name or .json/.jsonl with pairs")
    p.add_argument("--pairs", help="comma-separated pair names (default: all)")
    p.add_argument("--layers", default="all", help="'all', '15', '10-20' or '4,8'")
    p.add_argument("--site", default="mlp_hidden", choices=NEURON_SITES)
    p.add_argument(
        "--method", default="effect", choices=("effect", "attribution", "patching", "exact")
    )
    p.add_argument("--k", type=int, default=32, help="units kept per pair")
    p.add_argument("--positions", default="response_avg", choices=POSITIONS, help="for effect")
    add_run_args(p, out_help="folder for neurons.json")
    return p


def config(args: argparse.Namespace) -> Config:
    return Config(
        dataset=args.dataset,
        pairs=parse_list(args.pairs),
        layers=parse_layers(args.layers),
        site=args.site,
        method=args.method,
        k=args.k,
        positions=args.positions,
        run=run_options(args),
    )


def describe(s: NeuronSet, top: int = 5) -> str:
    """``label: layer:index (rank 0 for X, rank 5 for Y)`` for the first units."""
    lines = [f"{s.label} ({len(s)} units)"]
    for j in range(min(top, len(s))):
        ranks = ", ".join(f"rank {r[j]} for {p}" for p, r in s.ranks.items())
        lines.append(f"  {s.layers[j]}:{s.indices[j]:<6} score {s.scores[j]:+.3f}  ({ranks})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        cfg, models = config(args), model_configs(args)
        if cfg.k < 1:
            raise ValueError(f"--k must be >= 1, got {cfg.k}")
        dataset = load_dataset(cfg.dataset)
        pairs = [dataset.pair(n) for n in cfg.pairs] if cfg.pairs else list(dataset.pairs)
        if not pairs:
            raise ValueError(f"dataset {dataset.name!r} has no contrast pairs")
        dist = Dist.from_env()
        lm = load(models[0], dist)
        check_layers(lm, cfg.layers)
        sets = find_neurons(
            lm,
            pairs,
            cfg.layers,
            cfg.site,
            cfg.method,
            cfg.k,
            dataset=dataset,
            positions=cfg.positions,
            batch_size=cfg.run.batch_size,
            progress=cfg.run.progress,
            generation=cfg.run.generation,
            cache_dir=cfg.run.cache_dir,
            dist=dist,
        )
    except (ValueError, LookupError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not dist.is_main:
        return 0
    for s in sets:
        print(describe(s))
    if cfg.run.out is not None:
        cfg.run.out.mkdir(parents=True, exist_ok=True)
        rows = [{**asdict(s), "created_at": str(s.created_at)} for s in sets]
        (cfg.run.out / "neurons.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
        print(f"wrote {cfg.run.out / 'neurons.json'}")
    if cfg.run.store is not None:
        from personachat.store import Store

        names = {n for p in pairs for n in (p.high, p.low)}
        with Store(cfg.run.store) as store:
            personas = [p for p in dataset.personas if p.name in names]
            register_results(store, lm, personas, neurons=sets)
        print(f"registered {len(sets)} neuron sets in {cfg.run.store}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
