"""Staging and journals: a write batch's files on their way in, and what a crash leaves.

A ``Batch`` writes each new file to ``.staging/<token>.<pid>.tmp`` and fsyncs it before the
catalog lock is taken (threads of one process share the file system's journal commits). Under
the lock, inside the transaction that inserts its rows, ``publish`` first writes the batch's
*journal* ``.staging/<pid>.<token>.journal`` (fsynced JSON: the files it publishes and those of
the rows it replaces or removes), then renames the staged files to their final names and fsyncs
their folders; the transaction commits after that. ``finish`` runs once the lock is released:
after a commit it deletes the replaced files, after a failure the published ones, then the
journal. So at every instant a file that no row names is either under ``.staging`` or listed in
a live or dead writer's journal, and readers never look in ``.staging``.

``interrupted`` finds what dead writers (their PID gone, or older than a day) left: their staged
files and journals, and the journal-listed files no row names. ``recover_interrupted`` deletes
them; the store runs it under the catalog lock when a writable ``Store`` opens and before every
write of tensors.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

STAGING = ".staging"
STALE_SECONDS = 24 * 3600  # a journal or staged file this old belongs to no live write
WRITE_THREADS = 16


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file at ``path`` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def owner_pid(path: Path) -> int:
    """The PID in a staged file's or journal's name (``<token>.<pid>.tmp``, ``<pid>.<token>.
    journal``); -1 if there is none."""
    parts = path.name.split(".")
    text = parts[-2] if path.suffix == ".tmp" else parts[0]
    return int(text) if text.isdigit() else -1


def is_dead(path: Path, now: float) -> bool:
    """Whether the writer that made ``path`` is gone (or the file is a day old)."""
    pid = owner_pid(path)
    try:
        age = now - path.stat().st_mtime
    except FileNotFoundError:
        return False
    return pid < 0 or not pid_alive(pid) or age > STALE_SECONDS


@dataclass
class Pending:
    """A tensor file on its way in: bytes, checksum, final and staged paths."""

    rel: str
    final: Path
    data: bytes
    sha256: str
    tmp: Path | None = None


class Batch:
    """The files of one write: staged, published under the lock, finished after it."""

    def __init__(self, root: Path, pending: list[Pending]) -> None:
        self.root = root
        self.pending = pending
        self.staging = root / STAGING
        self.journal = self.staging / f"{os.getpid()}.{secrets.token_hex(6)}.journal"
        self.retire: list[str] = []
        self.published = False
        self.committed = False

    def stage(self) -> None:
        """Write every new file to its fsynced staged file (before the lock)."""
        if not self.pending:
            return
        self.staging.mkdir(parents=True, exist_ok=True)
        for item in self.pending:
            item.tmp = self.staging / f"{secrets.token_hex(8)}.{os.getpid()}.tmp"
        with ThreadPoolExecutor(max_workers=WRITE_THREADS) as pool:
            list(pool.map(lambda item: write_synced(item.tmp, item.data), self.pending))

    def publish(self, retire: list[str]) -> None:
        """Under the lock, before the commit: journal the batch, then rename its files into
        place. ``retire``: the files of the rows the transaction replaces or removes."""
        self.retire = list(retire)
        if not self.pending and not self.retire:
            return
        self.staging.mkdir(parents=True, exist_ok=True)
        record = {"publish": [item.rel for item in self.pending], "retire": self.retire}
        write_synced(self.journal, json.dumps(record).encode())
        fsync_dir(self.staging)
        self.published = True
        folders = {item.final.parent for item in self.pending}
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        for item in self.pending:
            assert item.tmp is not None
            os.replace(item.tmp, item.final)
        for folder in folders:
            fsync_dir(folder)

    def finish(self) -> None:
        """After the lock: delete the replaced files (committed) or the published ones (not),
        then the journal and any staged file left."""
        if self.committed:
            gone = self.retire
        else:
            gone = [item.rel for item in self.pending] if self.published else []
        for rel in gone:
            (self.root / rel).unlink(missing_ok=True)
        self.journal.unlink(missing_ok=True)
        for item in self.pending:
            if item.tmp is not None:
                item.tmp.unlink(missing_ok=True)


def read_journal(path: Path) -> list[str]:
    """The files a journal lists (published and retired); [] if it is unreadable (a crash
    while writing it came before any rename)."""
    try:
        record = json.loads(path.read_bytes())
        files = [*record.get("publish", []), *record.get("retire", [])]
    except (OSError, ValueError, TypeError, AttributeError):
        return []
    return [f for f in files if isinstance(f, str)]


def interrupted(root: Path, referenced: Callable[[], set[str]]) -> list[Path]:
    """What dead writers left: their staged files and journals, and the files their journals
    list that no row names (``referenced`` is asked only if a dead journal exists)."""
    staging = root / STAGING
    if not staging.is_dir():
        return []
    now = time.time()
    dead = [p for p in sorted(staging.iterdir()) if p.is_file() and is_dead(p, now)]
    journals = [p for p in dead if p.suffix == ".journal"]
    left: list[Path] = []
    if journals:
        names = referenced()
        for journal in journals:
            for rel in read_journal(journal):
                path = (root / rel).resolve()
                inside = path.is_relative_to(root.resolve()) and STAGING not in Path(rel).parts
                if inside and rel not in names and path.is_file():
                    left.append(root / rel)
    return left + dead


def recover_interrupted(root: Path, referenced: Callable[[], set[str]]) -> int:
    """Delete what dead writers left (under the catalog lock); returns how many files."""
    left = interrupted(root, referenced)
    for path in left:
        log.warning("store: removing a leftover of an interrupted write: %s", path)
        path.unlink(missing_ok=True)
    return len(left)
