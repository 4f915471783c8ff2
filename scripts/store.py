"""Inspect and manage the persona store from the shell: a thin CLI over ``personachat.store``.

    python scripts/store.py list [--model M] [--personas | --models | --neurons]
    python scripts/store.py show PERSONA [--model M]
    python scripts/store.py remove PERSONA [--model M] [--method ...]
    python scripts/store.py remove LABEL --neurons --model M
    python scripts/store.py export PERSONA --model M --out pirate.gguf [--layers 10 12] [--scale 4]
    python scripts/store.py import FILE... --model M [--persona P] [--layer L] [--layer-offset 1]
    python scripts/store.py import seeds/000.txt --neurons --label teacher --layer 15 --model M
    python scripts/store.py sql "SELECT persona, best_layer FROM vectors WHERE model_id = ?" -p M

The same command is installed as ``personachat-store``; what it does and its options are in
``personachat/cli/store.py`` and ``--help``.
"""

import sys

from personachat.cli.store import main

if __name__ == "__main__":
    sys.exit(main())
