"""Incremental JSON results for the GPU run: every finished measurement is on disk at once.

`Recorder(path)` holds one JSON object; `section(name, budget_s)` runs a block, stores what the
block put in its dict (or the error, as one line plus the exception type) and the seconds it took,
then rewrites the file atomically. A failing section never stops the next one; a section that
is killed by the caller's timeout leaves every earlier section on disk.

It measures nothing itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path


class Recorder:
    def __init__(self, path: str | os.PathLike, **meta):
        self.path = Path(path)
        self.data: dict = {"meta": meta, "sections": {}}
        self.flush()

    @contextlib.contextmanager
    def section(self, name: str, budget_s: float | None = None) -> Iterator[dict]:
        """`with rec.section("x") as out: out["tokens_per_s"] = ...`: stored with status and seconds."""
        out: dict = {}
        entry = {"status": "running", "budget_s": budget_s, "result": out}
        self.data["sections"][name] = entry
        self.flush()
        t0 = time.perf_counter()
        try:
            yield out
            entry["status"] = "ok"
        except Exception as e:  # recorded, not raised: the next section still runs
            entry["status"] = "error"
            entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            entry["traceback"] = traceback.format_exc(limit=6)[-3000:]
        finally:
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            self.flush()

    def flush(self) -> None:
        write_json(self.path, self.data)


def write_json(path: Path, obj) -> None:
    """Write `obj` to `path` atomically (temp file + rename), so a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
