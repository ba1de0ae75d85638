"""
Atomic file writes: write a uniquely named temporary file beside the target, fsync it, rename it over the target.

A reader (or a run killed mid-write) therefore sees either the old complete file or the new complete file, never a
half-written one; two processes writing the same target at once never share a temporary name (pid + random
suffix), so neither can rename the other's partial file into place. POSIX rename is atomic within one filesystem,
which is why the temporary file lives in the target's own directory.
"""

import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success fsync it and rename it to `path`; on error delete it.

    Naive equivalent: write to `path` directly (and leave a truncated file behind if interrupted).
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON (NaN and infinity are refused, so every file we write parses with any JSON reader)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode("utf-8"))
