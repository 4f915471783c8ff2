"""Steering sweeps from the shell: strengths x prompts x personas, one JSONL line per reply.

    python scripts/steer.py --model store/models/demo --personas pirate,philosopher \\
        --prompt "What is the capital of France?" --prompts-file prompts.txt \\
        --strengths=-2,-1,0,1,2 --layers best --out sweep.jsonl

    python scripts/steer.py --tiny llama --personas pirate,cynic --prompt "Hi" --out /tmp/s.jsonl

For every prompt and persona, all strengths run as ONE batched generation (row i steered with
strength i; 0 is the unsteered reply). Vectors come from the store (``--store DIR``, filtered by
``--vector-positions/--method/--baseline``) or from files (``--vector-file pirate.safetensors``,
repeatable). ``--tiny ARCH`` uses a tiny random model and random vectors to try the command
offline. Each line holds the reply, its token ids and pieces, and per reply token the projection
onto each swept persona's unit vector at every layer (``projections[token][layer][persona]``;
``null`` where a token was never fed back through the model).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from personachat.chat import ChatEngine, ChatUpdate, GenerationSettings
from personachat.interventions import POSITION_MODES, UNITS, InterventionError, SteeringSpec
from personachat.model import LoadedModel, load_model
from personachat.prompts import persona_messages
from personachat.records import PersonaVector

log = logging.getLogger("steer")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Sweep steering strengths over prompts and personas; write JSONL.",
        epilog="Example: python scripts/steer.py --tiny llama --personas pirate --prompt Hi",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="hub name or local path of the model")
    src.add_argument("--tiny", metavar="ARCH", help="a tiny random model with random vectors")
    p.add_argument("--personas", required=True, help="comma-separated persona names to sweep")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", type=Path, help="a file with one prompt per line")
    p.add_argument("--system", default="", help="system prompt for every conversation")
    p.add_argument(
        "--strengths", default="-2,-1,0,1,2", help="comma-separated multipliers (default -2..2)"
    )
    p.add_argument(
        "--layers", default="best", help="best | band | all | a spec like '8-12:4, 13:2'"
    )
    p.add_argument("--band", type=int, default=2, help="half-width of the 'band' preset")
    p.add_argument("--units", choices=UNITS, default="raw", help="raw or calibrated units")
    p.add_argument("--positions", choices=POSITION_MODES, default="all", help="where to add")
    p.add_argument("--last-n", type=int, help="with --positions prompt: only its last N tokens")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--store", type=Path, help="store root (default $PERSONACHAT_STORE or store/)")
    p.add_argument("--vector-file", type=Path, action="append", default=[], help="vector file")
    p.add_argument("--vector-positions", help="store filter: positions the vector was read from")
    p.add_argument("--method", help="store filter: extraction method")
    p.add_argument("--baseline", help="store filter: baseline")
    p.add_argument("--include-prompt", action="store_true", help="also write prompt projections")
    p.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    return p.parse_args(argv)


def load_vectors(
    args: argparse.Namespace, lm: LoadedModel, names: list[str]
) -> list[PersonaVector]:
    """Vectors for ``names``: random (tiny), from files, else from the store."""
    if args.tiny:
        g = torch.Generator().manual_seed(args.seed)
        shape = (lm.info.n_layers, lm.info.hidden_size)
        return [PersonaVector(lm.info.model_id, n, torch.randn(shape, generator=g)) for n in names]
    if args.vector_file:
        from personachat.store.formats import read_vector

        return [read_vector(path, lm.info) for path in args.vector_file]
    from personachat.store import Store

    store = Store(args.store, read_only=True)
    return [
        store.load_vector(
            lm.info.model_id,
            name,
            positions=args.vector_positions,
            method=args.method,
            baseline=args.baseline,
        )
        for name in names
    ]


def _floats(values: torch.Tensor) -> Any:
    return [
        [[None if math.isnan(x) else round(x, 5) for x in row] for row in t]
        for t in values.tolist()
    ]


def record(
    lm: LoadedModel,
    update: ChatUpdate,
    *,
    persona: str,
    prompt: str,
    strength: float,
    layers: dict[int, float],
    args: argparse.Namespace,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": lm.info.model_id,
        "persona": persona,
        "prompt": prompt,
        "strength": strength,
        "layers": {str(k): v * strength for k, v in sorted(layers.items())},
        "units": args.units,
        "positions": args.positions,
        "reply": update.text,
        "token_ids": list(update.tokens),
        "tokens": [lm.tokenizer.decode([t]) for t in update.tokens],
    }
    ro = update.readout
    if ro is not None:
        out["readout_personas"] = list(ro.personas)
        out["readout_layers"] = list(ro.layers)
        out["projections"] = _floats(ro.reply)
        if args.include_prompt:
            out["prompt_projections"] = _floats(ro.projections[: ro.prompt_len])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [ln.strip() for ln in args.prompts_file.read_text().splitlines() if ln.strip()]
    if not prompts:
        raise SystemExit("give at least one --prompt or a --prompts-file")
    names = [n.strip() for n in args.personas.split(",") if n.strip()]
    try:
        strengths = [float(s) for s in args.strengths.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(
            f"--strengths {args.strengths!r}: write numbers like -2,-1,0,1,2"
        ) from None
    if args.tiny:
        from personachat.model.tiny import tiny_model

        lm = tiny_model(args.tiny)
    else:
        lm = load_model(args.model)
    engine = ChatEngine(lm, load_vectors(args, lm, names))
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    jobs = [(prompt, name) for prompt in prompts for name in names]
    with args.out.open("w") as sink:
        for prompt, name in tqdm(jobs, desc="sweeps", unit="sweep"):
            spec = SteeringSpec(
                {name: 1.0},
                layers=args.layers,
                units=args.units,
                positions=args.positions,
                last_n=args.last_n,
                band=args.band,
            )
            messages = persona_messages(args.system or None, prompt)
            try:
                rows = engine.sweep(messages, settings, spec, strengths, readout=names)
            except InterventionError as err:
                raise SystemExit(f"error: {err}") from None
            layers = rows[0].steered_layers
            for strength, update in zip(strengths, rows, strict=True):
                line = record(
                    lm,
                    update,
                    persona=name,
                    prompt=prompt,
                    strength=strength,
                    layers=layers,
                    args=args,
                )
                sink.write(json.dumps(line) + "\n")
    log.info("wrote %d lines to %s", len(jobs) * len(strengths), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
