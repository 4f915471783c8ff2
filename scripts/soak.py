"""Soak the chat app through its HTTP API: memory growth per 100 requests and latency.

    python scripts/soak.py --requests 1000 --sessions 4
    python scripts/soak.py --requests 1000 --new-session

Starts ``python app.py`` on a free loopback port, drives ``/chat`` through ``gradio_client``
and prints the server's RSS growth per 100 requests after a warm-up, the latency percentiles
and the files left in its temporary folders; what it does and its options are in
``personachat/cli/soak.py`` and ``--help``.
"""

import sys

from personachat.cli.soak import main

if __name__ == "__main__":
    sys.exit(main())
