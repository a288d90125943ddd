"""Writing files whole or not at all (DESIGN §10): every file the project writes goes through `atomic_path`.

A crash, a full disk or an exception while writing leaves the previous file (or none) in place, never half of
a new one: the writer fills a temporary file in the same folder, which replaces the target with `os.replace`
(atomic on POSIX and Windows) only once it is complete.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

FILE_MODE = 0o644
TEMPORARY_MARK = ".partial-"
"""In the names of temporary files (`.<stem>.partial-<pid><suffix>`), so a writer can sweep up stale ones."""


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; it becomes `path` when the block ends without an error.

    The temporary name keeps the suffix, so writers that add one when it is missing (`numpy.save`) or pick a
    format by it see the right one. On an error the temporary file is removed and the target left untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}{TEMPORARY_MARK}{os.getpid()}{path.suffix}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, FILE_MODE)  # some writers create private files; what we publish is readable like any other
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path, obj, indent: int | None = 1) -> None:
    """JSON with a final newline (keys in insertion order)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=indent) + "\n").encode())


def remove_stale_temporaries(folder) -> None:
    """Delete temporary files an interrupted writer left in `folder`."""
    for stale in Path(folder).glob(f".*{TEMPORARY_MARK}*"):
        stale.unlink(missing_ok=True)
