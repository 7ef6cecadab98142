"""One run per output folder: an exclusive lock that names its holder and dies with it.

Two runs writing one folder interleave their journals and duplicate records, so every
stage takes this lock before it writes. The lock is ``flock`` (through ``filelock``): the
kernel releases it when the holding process dies, however it dies, so a lock left by a
killed run is taken over by the next one, which says so. Who holds it (pid, host, start
time, command) is kept beside the lock, for the message a second run prints.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from refine_af.errors import InputError

LOCK_FILE = ".refine-af.lock"
HOLDER_FILE = ".refine-af.lock.json"


def _holder(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / HOLDER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return (
        f"pid {holder.get('pid')} on {holder.get('host')} since {started} "
        f"({holder.get('command', '?')})"
    )


@contextlib.contextmanager
def output_lock(out_dir: str | os.PathLike[str], *, warn=None) -> Iterator[Path]:
    """Hold the exclusive lock of ``out_dir`` (created if missing) for the block.

    A folder locked by a live process raises ``InputError`` naming the holder. ``warn``
    (a callable taking a message) hears when a dead run's lock is taken over.
    """
    folder = Path(out_dir)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise InputError(
            f"{folder}: another run is writing this output folder: {_describe(_holder(folder))}; "
            "wait for it to finish or use another --out"
        ) from None
    try:
        previous = _holder(folder)
        if previous and warn is not None:
            warn(
                f"{folder}: taking over the lock of a run that ended without releasing it "
                f"({_describe(previous)})"
            )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200],
        }
        (folder / HOLDER_FILE).write_text(json.dumps(me) + "\n", encoding="utf-8")
        try:
            yield folder
        finally:
            (folder / HOLDER_FILE).unlink(missing_ok=True)
    finally:
        lock.release()
        if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
            # a run that wrote nothing (bad input found late) leaves no folder behind
            (folder / LOCK_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()
