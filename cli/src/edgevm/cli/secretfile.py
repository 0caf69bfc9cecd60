"""Files that hold secrets (nkey seeds, private keys): created with mode 0600 from the first byte."""

from __future__ import annotations

import os
from pathlib import Path


def write_secret(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` atomically with mode 0600 (never readable by others, not even briefly).

    The directory must exist: a mistyped `--out` is an error, not a new directory.
    """
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is masked by the umask and ignored for an existing file
        os.write(fd, raw)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
