"""Whether a file may decide what a (root) daemon executes.

A file that names commands, or a program the daemon runs, is only as safe as
the least trusted user who can change it. It is trusted when it is owned by
root or by the daemon's own user and no one else can write it; a program must
also sit in directories where no one else can replace it (a sticky directory
such as ``/tmp`` lets others add files, not replace this one).
"""

from __future__ import annotations

import os
import stat


class Untrusted(Exception):
    """The file may not be trusted; the message says why and how to fix it."""


def check_trusted(st: os.stat_result, what: str) -> None:
    """Refuse a file that is not a regular file, is owned by someone else, or is writable by others."""
    if not stat.S_ISREG(st.st_mode):
        raise Untrusted(f"{what} is not a regular file")
    _check_owner(st, what)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise Untrusted(
            f"{what} is writable by its group or by other users (mode {mode:04o}); "
            "remove their write permission (chmod go-w)"
        )


def check_trusted_program(path: str) -> None:
    """Refuse a program (an absolute path) that someone besides root or the daemon's user could change."""
    resolved = os.path.realpath(path)
    try:
        st = os.stat(resolved)
    except OSError as e:
        raise Untrusted(f"{path}: {e.strerror}") from None
    what = path if resolved == path else f"{path} (-> {resolved})"
    check_trusted(st, what)
    if not st.st_mode & 0o111:
        raise Untrusted(f"{what} is not executable (mode {stat.S_IMODE(st.st_mode):04o})")
    for directory in dict.fromkeys([*_ancestors(os.path.abspath(path)), *_ancestors(resolved)]):
        try:
            dst = os.stat(directory)
        except OSError as e:
            raise Untrusted(f"{what}: directory {directory}: {e.strerror}") from None
        _check_owner(dst, f"{what}: its directory {directory}")
        mode = stat.S_IMODE(dst.st_mode)
        if mode & 0o022 and not mode & stat.S_ISVTX:
            raise Untrusted(
                f"{what}: its directory {directory} is writable by other users (mode {mode:04o}), "
                "so they could replace the program"
            )


def _check_owner(st: os.stat_result, what: str) -> None:
    euid = os.geteuid()
    if st.st_uid not in (0, euid):
        raise Untrusted(
            f"{what} is owned by uid {st.st_uid}; it must be owned by root or by the daemon's user (uid {euid})"
        )


def _ancestors(path: str) -> list[str]:
    """Every directory above ``path``, nearest first, up to ``/``."""
    found = []
    parent = os.path.dirname(path)
    while True:
        found.append(parent)
        above = os.path.dirname(parent)
        if above == parent:
            return found
        parent = above
