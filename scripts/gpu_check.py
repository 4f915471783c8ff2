"""Check ``--engine vllm`` on a GPU machine against ``--engine hf``, through the OpenAI API.

    pip install "interp-engine[vllm]"
    python scripts/gpu_check.py                              # the demo model and store/
    python scripts/gpu_check.py --model PATH --store STORE --num-gpus 2 --dtype bfloat16

Loads the model once, serves the OpenAI API twice on loopback (one server with ``--engine
vllm``, interp-engine's vLLM backend, one with ``--engine hf``, PersonaChat's shared batch),
sends the same 8 steered greedy requests to each from 8 threads at once, checks that every
vLLM reply equals its hf reply, and prints tokens/s for both. Exits 0 when all 8 match, 1 when
one differs (each difference is printed), 2 at once when there is no GPU or no vLLM.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = 8


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "store" / "models" / "demo"))
    parser.add_argument("--store", default=str(ROOT / "store"))
    parser.add_argument("--num-gpus", type=int, default=1, help="tensor parallelism of vLLM")
    parser.add_argument(
        "--dtype",
        default="float32",
        help="both engines' dtype (float32 keeps greedy replies comparable token for token)",
    )
    parser.add_argument("--max-tokens", type=int, default=48)
    return parser.parse_args(argv)


def steerings(personas: list[str]) -> list[Any]:
    """Eight requests' ``steering``: additive at all, prompt and generated positions, blends."""
    a = "pirate" if "pirate" in personas else personas[0]
    b = "cynic" if "cynic" in personas else personas[-1]
    return [
        {"personas": {a: 1.0}, "layers": "1-2:4"},
        None,
        {"personas": {a: 1.0}, "layers": "1-2:4", "positions": "prompt"},
        {"personas": {b: 1.0}, "layers": "all:2"},
        {"personas": {a: 0.5, b: 0.5}, "layers": {"1": 3.0, "2": 3.0}},
        {"personas": {a: 1.0}, "layers": "0-1:3", "positions": "prompt", "last_n": 4},
        {"personas": {b: 1.0}, "layers": "1-3:3", "positions": "generated"},
        {"direction": {"persona": a, "layers": "0-1", "mode": "zero"}},
    ]


def serve_api(backend: Any) -> tuple[Any, str]:
    """The OpenAI API alone over ``backend`` on a free loopback port."""
    from fastapi import FastAPI

    from personachat.app.api.routes import router
    from personachat.app.api.server import serve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = FastAPI()
    app.include_router(router(backend))
    server = serve(app, "127.0.0.1", port)
    return server, f"{server.url}/v1"


def burst(url: str, model: str, asks: list[Any], max_tokens: int) -> tuple[list[Any], float]:
    """Send every request at once, one thread each; (replies, wall seconds)."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    replies: list[Any] = [None] * len(asks)

    def one(i: int) -> None:
        replies[i] = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"Tell me about the {['sea', 'stars'][i % 2]}."}],
            max_tokens=max_tokens,
            temperature=0,
            extra_body={"steering": asks[i]},
        )

    one(0)  # warm-up: the model and the engine load
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(asks))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return replies, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from personachat.chat.interp import vllm_problem

    problem = vllm_problem()
    if problem is not None:
        print(f"gpu_check: cannot run: {problem}", file=sys.stderr)
        return 2
    from personachat.app.backend import Backend
    from personachat.app.serving import Serving
    from personachat.model import load_model

    lm = load_model(args.model, dtype=args.dtype, device="cuda")
    rates: dict[str, float] = {}
    texts: dict[str, list[Any]] = {}
    for kind in ("vllm", "hf"):
        serving = Serving(kind, num_gpus=args.num_gpus, max_requests=REQUESTS)
        backend = Backend(args.model, args.store, models={args.model: lm}, serving=serving)
        asks = steerings(sorted(backend.persona_names(args.model)))
        server, url = serve_api(backend)
        try:
            replies, seconds = burst(url, args.model, asks, args.max_tokens)
        finally:
            server.close()
        tokens = sum(r.usage.completion_tokens for r in replies)
        rates[kind] = tokens / seconds
        texts[kind] = [r.choices[0].message.content for r in replies]
        print(
            f"{kind}: {REQUESTS} concurrent steered requests, {tokens} tokens in "
            f"{seconds:.2f} s: {rates[kind]:.1f} tokens/s"
        )
    differ = [i for i in range(REQUESTS) if texts["vllm"][i] != texts["hf"][i]]
    for i in differ:
        print(f"request {i} differs:\n  vllm: {texts['vllm'][i]!r}\n  hf:   {texts['hf'][i]!r}")
    print(
        f"{REQUESTS - len(differ)}/{REQUESTS} replies equal; vllm/hf tokens/s: "
        f"{rates['vllm'] / rates['hf']:.2f}x"
    )
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
