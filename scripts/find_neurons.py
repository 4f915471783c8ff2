"""Find persona neurons: MLP units that separate contrast pairs, with cross-pair stability.

    python scripts/find_neurons.py --model meta-llama/Llama-2-7b-hf --dataset roles \\
        --layers 15 --site gate --method attribution --k 32 --out runs/llama_neurons

The same command is installed as ``personachat-neurons``; what it does and its options are in
``personachat/cli/find_neurons.py`` and ``--help``.
"""

import sys

from personachat.cli.find_neurons import main

if __name__ == "__main__":
    sys.exit(main())
