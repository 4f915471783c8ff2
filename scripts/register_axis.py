"""Register a model's assistant axis (from role personas toward the default assistant) as a vector.

    python scripts/register_axis.py --model store/models/demo --dataset demo

The same command is installed as ``personachat-axis``; what it does and its options are in
``personachat/cli/register_axis.py`` and ``--help``.
"""

import sys

from personachat.cli.register_axis import main

if __name__ == "__main__":
    sys.exit(main())
