"""Extract persona vectors (difference of mean activations per layer) and register them.

    python scripts/extract_vectors.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset personas \\
        --positions response_avg,question_span --baseline default --out runs/qwen05

The same command is installed as ``personachat-extract``; what it does and its options are in
``personachat/cli/extract_vectors.py`` and ``--help``.
"""

import sys

from personachat.cli.extract_vectors import main

if __name__ == "__main__":
    sys.exit(main())
