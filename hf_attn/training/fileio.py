"""Crash-safe small-file writes shared by the config and checkpoint code.

A file written in place (``open(path, "w")``) is truncated first: a crash, SIGKILL or full disk
before the last byte leaves it empty or half written, and the next run then reads garbage. Writing
a temporary file beside it, flushing it to disk and renaming it over the target (one atomic
``rename`` on POSIX filesystems) leaves either the old or the new content, never a mix.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomically(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: temp file in the same folder, fsync, ``os.replace``.

    Raises:
        OSError: if writing fails (full disk...); ``path`` then still holds its previous content.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            # mkstemp creates the file 0600; keep the permissions a plain open() would have given.
            os.fchmod(fh.fileno(), path.stat().st_mode & 0o777 if path.exists() else 0o644)
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


__all__ = ["fsync_dir", "write_text_atomically"]
