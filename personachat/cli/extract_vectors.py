"""Extract persona vectors (difference of mean activations per layer) and register them.

    python scripts/extract_vectors.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset personas \\
        --positions response_avg,question_span --baseline default --out runs/qwen05

    accelerate launch --multi_gpu --num_processes 2 scripts/extract_vectors.py ...(same flags)

(``--multi_gpu`` also works on CPU-only machines: torchrun + gloo; ``--cpu`` needs mpirun.)

Missing responses are generated with the model under each persona's prompt and cached. Results
go to the store (``--store``, default ``$PERSONACHAT_STORE`` or ``store/``; ``--no-store`` to
skip) and, with ``--out``, to a folder: summary table, vectors, plots. Under
``accelerate launch`` the samples are split across processes and only the main process writes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

from personachat.activations import Dist
from personachat.pipeline import (
    RunOptions,
    add_model_args,
    add_run_args,
    check_layers,
    extract_vectors,
    format_summary,
    load,
    model_configs,
    parse_layers,
    parse_list,
    register_results,
    run_options,
    save_results,
    select_personas,
)
from personachat.prompts import load_dataset
from personachat.records import MEAN_BASELINE, POSITIONS


@dataclass(frozen=True)
class Config:
    dataset: str
    personas: list[str] | None
    positions: list[str]
    baseline: str
    layers: list[int] | None
    run: RunOptions


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--dataset", default="personas", help="built-in name or .json/.jsonl file")
    p.add_argument("--personas", help="comma-separated persona names (default: all)")
    p.add_argument("--positions", default="response_avg", help=f"comma list of {POSITIONS}")
    p.add_argument("--baseline", default="default", help=f"a persona name or {MEAN_BASELINE!r}")
    p.add_argument("--layers", default="all", help="'all', '12', '0-5' or '0-5,9'")
    add_run_args(p, out_help="folder for the summary, vectors and plots")
    return p


def config(args: argparse.Namespace) -> Config:
    return Config(
        dataset=args.dataset,
        personas=parse_list(args.personas),
        positions=parse_list(args.positions) or ["response_avg"],
        baseline=args.baseline,
        layers=parse_layers(args.layers),
        run=run_options(args),
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        cfg, models = config(args), model_configs(args)
        dataset = load_dataset(cfg.dataset)
        select_personas(dataset, cfg.personas, cfg.baseline)  # fail before loading the model
        dist = Dist.from_env()
        lm = load(models[0], dist)
        check_layers(lm, cfg.layers)
        result = extract_vectors(
            lm,
            dataset,
            cfg.personas,
            cfg.positions,
            cfg.baseline,
            cfg.layers,
            cfg.run.batch_size,
            cfg.run.progress,
            generation=cfg.run.generation,
            cache_dir=cfg.run.cache_dir,
            dist=dist,
        )
    except (ValueError, LookupError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not dist.is_main:
        return 0
    print(format_summary(result.summary))
    if cfg.run.out is not None:
        for path in save_results(result, dataset, cfg.run.out, lm.info.model_id):
            print(f"wrote {path}")
    if cfg.run.store is not None:
        from personachat.store import Store

        with Store(cfg.run.store) as store:
            register_results(store, lm, dataset.select(result.personas).personas, result)
        print(f"registered {len(result.vectors)} vectors in {cfg.run.store}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
