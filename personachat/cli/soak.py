"""Soak the chat app: sessions x requests through the real HTTP API, memory and latency.

    python scripts/soak.py --requests 1000 --sessions 4
    python scripts/soak.py --requests 1000 --new-session      # a new session per request

Starts ``python app.py`` as a child process on a free loopback port (127.0.0.1 only, with its
own temporary folders), waits for its default model, then sends ``/chat`` requests one after
another through ``gradio_client``: round-robin over ``--sessions`` sessions, or a new session
for each request. It samples the server's resident memory (RSS, from ``/proc``) every
``--every`` requests and prints the growth per 100 requests after ``--warmup`` (a least-squares
slope), the latency percentiles, the files left in the app's temporary folders and the load
average. Bounded: at most ``--requests`` requests and ``--max-seconds`` seconds, each request
at most ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = ("Tell me about the ocean.", "Tell me about volcanoes.", "Tell me about the moon.")
START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class SoakConfig:
    """What one soak run does: how many requests, over how many sessions, for how long."""

    requests: int = 1000
    sessions: int = 1
    new_session: bool = False
    warmup: int = 100
    every: int = 50
    max_seconds: float = 3600.0
    timeout: float = 60.0
    max_new_tokens: int = 16
    app_args: tuple[str, ...] = ()


@dataclass
class SoakResult:
    """RSS samples (requests done, MB), request latencies (s), and what was left behind."""

    rss: list[tuple[int, float]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    temp_files: int = 0
    seconds: float = 0.0
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def growth_per_100(self, warmup: int) -> float:
        """The RSS slope after ``warmup`` requests, in MB per 100 requests (least squares)."""
        points = [(n, mb) for n, mb in self.rss if n >= warmup]
        if len(points) < 2:
            return 0.0
        mean_n = sum(n for n, _ in points) / len(points)
        mean_mb = sum(mb for _, mb in points) / len(points)
        spread = sum((n - mean_n) ** 2 for n, _ in points)
        slope = sum((n - mean_n) * (mb - mean_mb) for n, mb in points) / spread
        return 100.0 * slope

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb(pid: int) -> float:
    """The resident memory of process ``pid`` in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def start_app(port: int, scratch: Path, app_args: Sequence[str]) -> subprocess.Popen[bytes]:
    """``python app.py`` on 127.0.0.1:``port`` with its temporary files under ``scratch``;
    returns once the page answers (the model then loads in the background)."""
    env = dict(os.environ, GRADIO_TEMP_DIR=str(scratch / "gradio"), TMPDIR=str(scratch / "tmp"))
    env.update(PERSONACHAT_LOG="WARNING", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env.pop("SPACE_ID", None)
    (scratch / "gradio").mkdir()
    (scratch / "tmp").mkdir()
    command = [sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(port)]
    log = scratch / "app.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*command, *app_args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        if "PersonaChat on http://" in log.read_text(errors="replace"):
            return proc
        time.sleep(0.2)
    proc.kill()
    proc.wait(timeout=30)
    tail = log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"the app did not start within {START_TIMEOUT_S:.0f} s:\n{tail}")


def chat(client: Any, config: SoakConfig, i: int) -> None:
    """One ``/chat`` request; raises unless the reply came back done."""
    job = client.submit(
        message=MESSAGES[i % len(MESSAGES)],
        history=[],
        side_history=[],
        personas=["pirate"] if i % 2 else [],
        layer_spec="2-3:3",
        positions="prompt",
        max_new_tokens=config.max_new_tokens,
        api_name="/chat",
    )
    out = job.result(timeout=config.timeout)
    status = str(out[3])
    if not status.startswith("Done"):
        raise RuntimeError(f"request {i}: {status[:200]}")


def drive(url: str, pid: int, config: SoakConfig) -> SoakResult:
    """Send the requests to the app at ``url`` (process ``pid``), sampling its RSS."""
    from gradio_client import Client

    result = SoakResult()
    clients = [
        Client(url, verbose=False, download_files=False) for _ in range(max(1, config.sessions))
    ]
    clients[0].predict(model_id="", api_name="/load_model")  # the model is loaded first
    start = time.monotonic()
    result.rss.append((0, rss_mb(pid)))
    for i in range(config.requests):
        if time.monotonic() - start > config.max_seconds:
            result.errors.append(f"stopped after {config.max_seconds:.0f} s at request {i}")
            break
        client = clients[i % len(clients)]
        if config.new_session:
            client.reset_session()
        began = time.monotonic()
        try:
            chat(client, config, i)
        except Exception as err:  # counted and reported; the soak goes on
            result.errors.append(f"{type(err).__name__}: {str(err)[:200]}")
        result.latencies.append(time.monotonic() - began)
        if (i + 1) % config.every == 0:
            result.rss.append((i + 1, rss_mb(pid)))
    result.seconds = time.monotonic() - start
    for client in clients:
        client.close()
    return result


def soak(config: SoakConfig) -> SoakResult:
    """Start the app, drive it, stop it; the temporary folders are removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="personachat-soak-") as folder:
        scratch = Path(folder)
        port = free_port()
        proc = start_app(port, scratch, config.app_args)
        try:
            result = drive(f"http://127.0.0.1:{port}/", proc.pid, config)
            result.temp_files = count_files(scratch)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        result.load = os.getloadavg()
    return result


def report(config: SoakConfig, result: SoakResult) -> str:
    """The soak's figures in a few lines."""
    first, last = result.rss[0][1], result.rss[-1][1]
    sessions = "a new session each" if config.new_session else f"{config.sessions} session(s)"
    lines = [
        f"{len(result.latencies)} /chat requests over {sessions} in {result.seconds:.0f} s "
        f"(load average {result.load[0]:.1f} {result.load[1]:.1f} {result.load[2]:.1f})",
        f"RSS {first:.0f} -> {last:.0f} MB; after {config.warmup} requests of warm-up "
        f"{result.growth_per_100(config.warmup):+.2f} MB per 100 requests",
        "latency p50 {:.3f} s, p90 {:.3f} s, p99 {:.3f} s, max {:.3f} s".format(
            result.percentile(50),
            result.percentile(90),
            result.percentile(99),
            max(result.latencies, default=float("nan")),
        ),
        f"files left in the app's temporary folders: {result.temp_files}",
        f"errors: {len(result.errors)}"
        + (f" (first: {result.errors[0]})" if result.errors else ""),
        "RSS samples (requests: MB): " + ", ".join(f"{n}: {mb:.0f}" for n, mb in result.rss),
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> SoakConfig:
    parser = argparse.ArgumentParser(
        description="Soak the chat app through its HTTP API: RSS growth and latency."
    )
    parser.add_argument("--requests", type=int, default=1000, help="requests in all (1000)")
    parser.add_argument("--sessions", type=int, default=1, help="sessions, round-robin (1)")
    parser.add_argument(
        "--new-session", action="store_true", help="a new session for every request"
    )
    parser.add_argument("--warmup", type=int, default=100, help="requests before the slope (100)")
    parser.add_argument("--every", type=int, default=50, help="requests between RSS samples (50)")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="time bound (3600)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per request (60 s)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens per reply (16)")
    parser.add_argument(
        "app_args", nargs="*", help="passed to app.py after --, e.g. -- --model PATH"
    )
    args = parser.parse_args(argv)
    if args.requests < 1 or args.every < 1 or args.sessions < 1:
        parser.error("--requests, --every and --sessions must be at least 1")
    return SoakConfig(
        requests=args.requests,
        sessions=args.sessions,
        new_session=args.new_session,
        warmup=args.warmup,
        every=args.every,
        max_seconds=args.max_seconds,
        timeout=args.timeout,
        max_new_tokens=args.max_new_tokens,
        app_args=tuple(args.app_args),
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    result = soak(config)
    print(report(config, result), flush=True)
    return 1 if result.errors else 0
