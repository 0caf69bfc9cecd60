"""Confinement of user-given paths to the node's directories (import roots, volume store).

Rules, in the order they are checked (each failure names the field and the rule):
- the path is a non-empty string without NUL bytes and without a `..` component;
- an absolute path must lie inside one of the roots as written; a relative path is taken relative to the
  first root (so `image.import {"path": "ubuntu.qcow2"}` means `<first import root>/ubuntu.qcow2`);
- the path must exist; it is resolved with every symbolic link followed, and the result must still lie
  inside one of the (resolved) roots, so a link cannot lead out;
- it must be a regular file (no directory, device, FIFO or socket).

`image.import`'s `path` ("a file on the node") is confined to the node's import roots, by default
`<state_dir>/import` (`/var/lib/edgevm/import`), so a request cannot import `/etc/shadow`. A Volume's
`source` containing a `/` is a path inside the node's volume store; without a `/` it names an image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from edgevm.shared.errors import FieldError
from edgevm.shared.limits import excerpt

IMPORT_SUBDIR = "import"


class PathRejected(FieldError):
    """A user-given path breaks a confinement rule; `field` is its JSON path, `rule` the broken rule."""


def default_import_roots(state_dir: Path) -> list[Path]:
    """Return the directories `image.import` reads from when none are configured."""
    return [state_dir / IMPORT_SUBDIR]


def is_store_path(source: str) -> bool:
    """Return whether a Volume `source` is a path in the volume store (it has a `/`) rather than an image."""
    return "/" in source


def confine(path: str, roots: Sequence[Path], *, field: str) -> Path:
    """Return the resolved regular file `path` names inside one of `roots`, or raise PathRejected."""
    if not roots:
        raise PathRejected(field, "no directories are configured to read files from on this node")
    where = _describe(roots)
    if not path or "\0" in path:
        raise PathRejected(field, "must be a non-empty path without NUL characters")
    given = PurePosixPath(path)
    if ".." in given.parts:
        raise PathRejected(field, f"must not contain '..'; give a path inside {where}")
    if given.is_absolute():
        if not any(given.is_relative_to(root) or given.is_relative_to(_resolved(root)) for root in roots):
            raise PathRejected(field, f"{excerpt(path, 256)} is outside {where}; put the file there first")
        candidate = Path(given)
    else:
        candidate = roots[0] / given
    try:
        resolved = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise PathRejected(field, f"{excerpt(path, 256)} does not exist in {where}") from None
    except RuntimeError:  # a symbolic link loop
        raise PathRejected(field, f"{excerpt(path, 256)} is a symbolic link loop") from None
    except OSError as exc:
        raise PathRejected(field, f"{excerpt(path, 256)} cannot be read: {exc.strerror}") from None
    if not any(resolved.is_relative_to(_resolved(root)) for root in roots):
        raise PathRejected(field, f"{excerpt(path, 256)} leads outside {where} through a symbolic link")
    if not resolved.is_file():
        raise PathRejected(field, f"{excerpt(path, 256)} is not a regular file")
    return resolved


def _resolved(root: Path) -> Path:
    return root.resolve(strict=False)


def _describe(roots: Sequence[Path]) -> str:
    listed = ", ".join(str(root) for root in roots)
    return f"the node's directory {listed}" if len(roots) == 1 else f"the node's directories ({listed})"
