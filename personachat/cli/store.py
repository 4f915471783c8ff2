"""Inspect and manage the persona store from the shell: a thin CLI over ``personachat.store``.

    python scripts/store.py list [--model M] [--personas | --models | --neurons]
    python scripts/store.py show PERSONA [--model M]
    python scripts/store.py remove PERSONA [--model M] [--method ...]
    python scripts/store.py remove LABEL --neurons --model M
    python scripts/store.py export PERSONA --model M --out pirate.gguf [--layers 10 12] [--scale 4]
    python scripts/store.py import FILE... --model M [--persona P] [--layer L] [--layer-offset 1]
    python scripts/store.py import lists.txt --neurons --label teacher --layer 15 --model M
    python scripts/store.py sql "SELECT persona, best_layer FROM vectors WHERE model_id = ?" -p M

The store is ``--store DIR``, else ``$PERSONACHAT_STORE``, else ``store/`` at the repo root;
reading commands (list, show, export, sql) refuse a folder that holds no store, only writing
commands (import, remove) create one. Every command has ``--help``. Exit status: 0 on success,
2 when an input is bad (a file, a value, a name, a store path that holds no store), 1 when the
store refuses or fails (unknown persona, a refused query, a busy lock); the error is one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
from tqdm import tqdm

from personachat.records import NEURON_SITES, POSITIONS, ModelInfo, NeuronSet
from personachat.store import IntegrityError, Store, StoreError, default_store_root
from personachat.store.errors import FormatError
from personachat.store.formats import read_vector, write_vector
from personachat.store.index_lists import (
    KNOWN_MODELS,
    neuron_set_from_index_lists,
    parse_index_lists,
)


class NoStoreError(StoreError):
    """A reading command was pointed at a folder that holds no store."""


class OptionsError(ValueError):
    """Options that do not go together, or one missing that another needs (exit 2)."""


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Rows as a plain aligned text table."""
    cells = [[str(c) for c in columns]] + [
        ["" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in row]
        for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def open_store(args: argparse.Namespace, *, write: bool) -> Store:
    """The store of ``--store``; a reading command refuses a folder that holds no store."""
    store = Store(args.store, read_only=not write, lock_timeout=args.lock_timeout)
    if not write and not store.catalog.is_file():
        why = "does not exist" if not store.root.exists() else "has no catalog.duckdb"
        raise NoStoreError(
            f"no store at {store.root}: the folder {why}. Pass --store DIR (or set "
            "PERSONACHAT_STORE) to an existing store; writing commands (import) create one"
        )
    return store


def cmd_list(args: argparse.Namespace) -> int:
    store = open_store(args, write=False)
    rows: list[tuple[Any, ...]]
    if args.models:
        rows = [
            (m.model_id, m.architecture, m.n_layers, m.hidden_size, m.mlp_width, m.revision)
            for m in store.models()
        ]
        print(table(["model", "arch", "layers", "hidden", "mlp_width", "revision"], rows))
    elif args.personas:
        rows = [(p.name, p.category, p.source, p.system_prompt[:60]) for p in store.personas()]
        print(table(["persona", "category", "source", "system prompt"], rows))
    elif args.neurons:
        rows = [
            (s.model_id, s.label, s.site, s.method, s.n_units, ",".join(s.pairs))
            for s in store.neuron_sets(args.model)
        ]
        print(table(["model", "label", "site", "method", "units", "pairs"], rows))
    else:
        rows = [
            (
                *(v.model_id, v.persona, v.method, v.positions, v.baseline, v.best_layer),
                *(v.n_samples, v.created_at.strftime("%Y-%m-%d %H:%M")),
            )
            for v in store.vectors(args.model)
        ]
        cols = ["model", "persona", "method", "positions", "baseline", "best", "n", "created"]
        print(table(cols, rows))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store = open_store(args, write=False)
    persona = store.persona(args.persona)
    print(f"persona: {persona.name}\nsystem prompt: {persona.system_prompt}")
    for key in ("description", "category", "source"):
        if getattr(persona, key):
            print(f"{key}: {getattr(persona, key)}")
    for v in store.vectors(args.model, args.persona):
        print(f"\n{v.model_id}  {v.method} {v.positions} baseline={v.baseline}  id={v.vector_id}")
        print(f"  file {v.file}  sha256 {v.sha256}")
        print(f"  dataset {v.dataset or '-'}  n_samples {v.n_samples}  best layer {v.best_layer}")
        rows = store.layer_metrics(v.vector_id)
        print(table(["layer", "auc", "separation", "norm", "resid_norm"], rows))
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    filters = {"method": args.method, "positions": args.positions, "baseline": args.baseline}
    given = " ".join(f"--{k} {v}" for k, v in filters.items() if v is not None)
    if args.neurons and not args.model:
        raise OptionsError(
            f"remove {args.persona} --neurons needs --model: the model whose neuron set it is"
        )
    if given and args.model is None:
        raise OptionsError(
            f"remove {args.persona} {given} needs --model: these options pick vectors of one "
            "model (without --model and without them, the persona goes from every model)"
        )
    store = open_store(args, write=True)
    if args.neurons:
        store.remove_neurons(args.model, args.persona)
        print(f"removed neuron set {args.persona!r} of {args.model}")
        return 0
    if args.model is None:
        count = store.remove_persona(args.persona)
    elif given:
        count = store.remove_vector(args.model, args.persona, **filters)
    else:
        count = store.remove_persona(args.persona, args.model)
    print(f"removed {count} stored tensor(s) of {args.persona!r}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    store = open_store(args, write=False)
    info = store.model(args.model)
    vector = store.load_vector(
        args.model,
        args.persona,
        positions=args.positions,
        method=args.method,
        baseline=args.baseline,
    )
    path = write_vector(vector, args.out, info=info, layers=args.layers, scale=args.scale)
    print(f"wrote {path}")
    return 0


def model_info(store: Store, args: argparse.Namespace) -> tuple[ModelInfo, bool]:
    """The registered model, a known one, or one described by --n-layers/--hidden-size/...;
    and whether it is new to the store (then it is registered with what is imported for it)."""
    known = {m.model_id: m for m in store.models()}
    if args.model in known:
        return known[args.model], False
    info = KNOWN_MODELS.get(args.model)
    if info is None:
        sizes = (args.n_layers, args.hidden_size, args.mlp_width)
        if None in sizes:
            raise StoreError(
                f"model {args.model!r} is not in the store and not built in "
                f"({sorted(KNOWN_MODELS)}); pass --n-layers, --hidden-size and --mlp-width "
                "(and --architecture) to register it without loading weights"
            )
        info = ModelInfo(args.model, None, args.architecture, *sizes)  # type: ignore[arg-type]
    return info, True


def read_neurons(path: Path, info: ModelInfo, args: argparse.Namespace) -> NeuronSet:
    """The neuron set of one file of index lists, checked against the model, or FormatError
    naming the file."""
    try:
        lists = parse_index_lists(path.read_text(encoding="utf-8"))
        return neuron_set_from_index_lists(
            info, args.label, args.layer, lists, site=args.site, source=args.source or str(path)
        )
    except FormatError as err:
        raise FormatError(f"{path}: {err}") from err
    except UnicodeDecodeError as err:
        raise FormatError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); neuron index lists "
            "are text like 'teacher: [12, 34]' or JSON"
        ) from err


def cmd_import(args: argparse.Namespace) -> int:
    """Every file is read and checked before anything is written; a model new to the store is
    registered in the transaction of its first vectors or neuron set."""
    if args.neurons and (args.layer is None or not args.label):
        raise OptionsError("import --neurons needs --layer and --label")
    store = open_store(args, write=True)
    info, new = model_info(store, args)
    if args.neurons:
        sets = [read_neurons(path, info, args) for path in args.files]
        for path, neurons in zip(args.files, sets, strict=True):
            store.register_neurons([neurons], model=info if new else None)
            new = False
            print(f"registered neuron set {neurons.label!r}: {len(neurons)} units from {path}")
        return 0
    vectors = [
        read_vector(
            path,
            info,
            args.persona,
            layer=args.layer,
            layer_offset=args.layer_offset,
            positions=args.positions,
            baseline=args.baseline,
        )
        for path in tqdm(args.files, desc="reading", unit="file")
    ]
    store.register_vectors(vectors, model=info if new else None)
    for vector in vectors:
        print(f"registered {vector.persona!r} for {info.model_id} from {vector.dataset}")
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    columns, rows = open_store(args, write=False).query(args.query, args.param)
    if args.json:
        print(json.dumps([dict(zip(columns, r, strict=True)) for r in rows], default=str))
    else:
        print(table(columns, rows))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 when every row's file is present and intact, else list the problems (exit 1);
    with ``--repair`` remove the damaged rows and unreferenced files, and list what went."""
    if args.repair:
        with open_store(args, write=True) as store:
            done = store.repair()
        print("\n".join(done) if done else "nothing to repair")
        return 0
    problems = open_store(args, write=False).verify()
    print("\n".join(problems) if problems else "every row's file is present and intact")
    return 1 if problems else 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Open the store writable once, which brings its catalog to the current schema."""
    with open_store(args, write=True) as store:
        [(version,)] = store.sql("SELECT max(version) FROM migrations")
    print(f"{store.root}: catalog at schema version {version}")
    return 0


def common_options(top: bool) -> argparse.ArgumentParser:
    """--store and --lock-timeout, accepted before or after the command; only the top level
    sets defaults (sub-commands suppress theirs so they do not overwrite a value given first)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store",
        default=None if top else argparse.SUPPRESS,
        help=f"store directory (default: $PERSONACHAT_STORE or {default_store_root()})",
    )
    common.add_argument(
        "--lock-timeout",
        type=float,
        default=10.0 if top else argparse.SUPPRESS,
        help="seconds to retry while another process holds the catalog (default 10)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python scripts/store.py",
        description="Inspect and manage the persona store.",
        parents=[common_options(top=True)],
    )
    common = common_options(top=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, summary, add in (
        ("list", "list vectors (default), models, personas or neuron sets", add_list),
        ("show", "a persona with its vectors and metrics", add_show),
        ("remove", "remove vectors, a persona or neurons", add_remove),
        ("export", "write a vector to .safetensors/.pt/.gguf", add_export),
        ("import", "import vectors or neuron index lists", add_import),
        ("sql", "run a read-only SQL query on the catalog", add_sql),
        ("verify", "check every row's file; --repair removes damaged rows", add_verify),
        ("migrate", "bring the catalog to the current schema", add_migrate),
    ):
        add(sub.add_parser(name, parents=[common], help=summary))
    return parser


def add_list(p: argparse.ArgumentParser) -> None:
    p.description = "List stored vectors, or with a flag the models, personas or neuron sets."
    p.add_argument("--model", help="only this model id")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--models", action="store_true", help="list registered models")
    group.add_argument("--personas", action="store_true", help="list personas")
    group.add_argument("--neurons", action="store_true", help="list neuron sets")
    p.set_defaults(func=cmd_list)


def add_show(p: argparse.ArgumentParser) -> None:
    p.description = "Show a persona, its vectors and their per-layer AUC, separation and norms."
    p.add_argument("persona")
    p.add_argument("--model", help="only this model id")
    p.set_defaults(func=cmd_show)


def add_remove(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Remove a persona everywhere (no --model), its tensors for one model, matching vectors "
        "(with --method/--positions/--baseline), or a neuron set (--neurons LABEL)."
    )
    p.add_argument("persona", help="persona name, or the neuron set label with --neurons")
    p.add_argument("--model", help="model id")
    p.add_argument("--method")
    p.add_argument("--positions", choices=POSITIONS)
    p.add_argument("--baseline")
    p.add_argument("--neurons", action="store_true", help="remove the neuron set named PERSONA")
    p.set_defaults(func=cmd_remove)


def add_export(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Export a stored vector. .safetensors keeps all provenance; .pt is persona_vectors' "
        "[n_layers+1, hidden] layout; .gguf is a llama.cpp control vector (direction.<layer>)."
    )
    p.add_argument("persona")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, type=Path, help="output file; suffix picks the format")
    p.add_argument("--positions", choices=POSITIONS)
    p.add_argument("--method")
    p.add_argument("--baseline")
    p.add_argument("--layers", type=int, nargs="+", help="GGUF only: layers to include")
    p.add_argument("--scale", type=float, default=1.0, help="GGUF only: multiply the vector")
    p.set_defaults(func=cmd_export)


def add_import(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Import persona vectors (.safetensors, .npz, .pt loaded with weights_only=True, .gguf) "
        "or, with --neurons, neuron index lists ('label: [1, 2, 3]' lines or JSON)."
    )
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--model", required=True, help="model id the vectors belong to")
    p.add_argument("--persona", help="persona name (default: from the file)")
    p.add_argument("--layer", type=int, help="layer of a single-layer vector / neuron list")
    p.add_argument(
        "--layer-offset", type=int, default=0, help="1 if per-layer keys count hidden_states"
    )
    p.add_argument("--positions", choices=POSITIONS)
    p.add_argument("--baseline", default="default")
    p.add_argument("--neurons", action="store_true", help="files are neuron index lists")
    p.add_argument("--label", help="neuron set label (with --neurons)")
    p.add_argument("--site", choices=NEURON_SITES, default="gate")
    p.add_argument("--source", help="where the lists come from (default: the file path)")
    p.add_argument("--n-layers", type=int, help="register an unknown model: decoder layers")
    p.add_argument("--hidden-size", type=int, help="register an unknown model: hidden size")
    p.add_argument("--mlp-width", type=int, help="register an unknown model: MLP width")
    p.add_argument("--architecture", default="unknown", help="model_type, e.g. llama")
    p.set_defaults(func=cmd_import)


def add_sql(p: argparse.ArgumentParser) -> None:
    p.description = "Run a read-only SQL query on the catalog; use ? and --param for values."
    p.add_argument("query")
    p.add_argument("-p", "--param", action="append", default=[], help="a value for a ? placeholder")
    p.add_argument("--json", action="store_true", help="print JSON records")
    p.set_defaults(func=cmd_sql)


def add_verify(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Check that every vector's and mean's file is present with its checksum, and that no "
        "file lies unreferenced. --repair removes the rows of damaged files (register those "
        "vectors again) and deletes unreferenced files."
    )
    p.add_argument("--repair", action="store_true", help="remove damaged rows and stray files")
    p.set_defaults(func=cmd_verify)


def add_migrate(p: argparse.ArgumentParser) -> None:
    p.description = "Open the store writable once: its catalog is upgraded to this schema."
    p.set_defaults(func=cmd_migrate)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, IntegrityError, NoStoreError) as err:  # a bad input: fix it
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (StoreError, OSError, duckdb.Error) as err:  # the store refused or failed
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
