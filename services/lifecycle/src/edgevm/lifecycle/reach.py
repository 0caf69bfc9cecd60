"""Whether QEMU can reach the node's files: it opens disks as its own user (libvirt-qemu), not as root.

The state directory is edgevm's own: it is made enterable. A directory above it (a home directory, a
`mktemp -d`) is the user's: edgevm does not loosen its mode, it refuses to start and says what to run.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path


class StateDirUnreachable(Exception):
    """QEMU's user cannot enter a directory above the state directory; the message names it and the fix."""


def _search_bit(info: os.stat_result, uid: int, gids: set[int]) -> tuple[int, str]:
    """The permission bit that decides whether `uid` enters the directory, and its chmod spelling."""
    if info.st_uid == uid:
        return stat.S_IXUSR, "u+x"
    if info.st_gid in gids:
        return stat.S_IXGRP, "g+x"
    return stat.S_IXOTH, "o+x"


def _can_enter(info: os.stat_result, uid: int, gids: set[int]) -> bool:
    return bool(info.st_mode & _search_bit(info, uid, gids)[0])


def _has_acl(directory: Path) -> bool:
    try:
        return "system.posix_acl_access" in os.listxattr(directory)
    except OSError:
        return False


def blocking_directory(path: Path, uid: int, gids: set[int]) -> Path | None:
    """The first directory from / down to `path` that `uid` (with groups `gids`) cannot enter, or None.

    A directory with an ACL counts as enterable: its mode bits do not tell, and the kernel will.
    """
    if uid == 0:
        return None
    for directory in [*reversed(path.parents), path]:
        if not _can_enter(directory.stat(), uid, gids) and not _has_acl(directory):
            return directory
    return None


def user_groups(uid: int, gid: int) -> tuple[str, set[int]]:
    """The name of `uid` and the groups its processes get (`gid` and its supplementary groups)."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid), {gid}
    return name, {gid, *os.getgrouplist(name, gid)}


def make_reachable(state_dir: Path, uid: int, gid: int) -> None:
    """Let QEMU's user enter the state directory (search permission only: not list it), or raise
    StateDirUnreachable naming the directory above it that stops QEMU and how to open it."""
    name, gids = user_groups(uid, gid)
    state_dir = state_dir.resolve()
    blocked = blocking_directory(state_dir.parent, uid, gids)
    if blocked is not None:
        info = blocked.stat()
        fix = _search_bit(info, uid, gids)[1]
        raise StateDirUnreachable(
            f"QEMU runs guests as {name} (uid {uid}), which cannot enter {blocked} (mode "
            f"{stat.S_IMODE(info.st_mode):04o}, owner {_owner(info)}), above the state directory {state_dir}: "
            f"vm.start would fail with 'Permission denied'. Let it through with `chmod {fix} {blocked}` (or "
            f"`setfacl -m u:{name}:x {blocked}`), or choose a state directory it can reach "
            "(--state-dir or EDGEVM_STATE_DIR, e.g. /var/lib/edgevm)"
        )
    info = state_dir.stat()
    if not _can_enter(info, uid, gids):
        state_dir.chmod(stat.S_IMODE(info.st_mode) | _search_bit(info, uid, gids)[0])


def _owner(info: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        user = str(info.st_uid)
    try:
        group = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group = str(info.st_gid)
    return f"{user}:{group}"
