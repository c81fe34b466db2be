"""Directories and files only our own user can change: the checks behind spool and quarantine.

Another local user must not be able to plant, read or delete audit records (a forged row would
show up in ``audit lost``; a planted tree could make us ship their rows or drop ours). So the
spool's directories (and the quarantine's, below them) are checked, from ``/`` down, each time a
segment is created and each time orphans are adopted (never per record), walking with
``O_NOFOLLOW`` descriptors so nothing can be swapped in between (:func:`open_dir`):

* a directory we create is made ``0700`` and must then be ours and ``0700``;
* a directory above ``spool_dir/<target>`` that already exists must belong to root or to us and,
  if others may write to it, carry the sticky bit (like ``/tmp``); a symbolic link above the
  target is followed only if root or we own it, and the real directories are checked;
* the target directory itself must not be a symbolic link, must be ours and must give nothing to
  group or others.

A directory failing a check raises :class:`SpoolRefused` naming the path and why. A file in
them is ours only if it is a regular file of this user (:func:`file_problem`, on an ``lstat``
or on the ``fstat`` of a descriptor opened with ``O_NOFOLLOW``).
"""

from __future__ import annotations

import errno
import os
import stat

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class SpoolRefused(OSError):
    """A spool directory or segment another user could plant, change or delete records in."""


def open_dir(path: str, *, create: bool) -> int | None:
    """A descriptor of directory ``path`` once it and every directory above it pass the checks
    of the module docstring, creating missing ones ``0700`` when ``create``; None when it does
    not exist and ``create`` is false. Raises :class:`SpoolRefused`."""
    parent, leaf = os.path.split(os.path.abspath(path))
    _check_links(parent)
    real_parent = os.path.realpath(parent)
    names = [name for name in real_parent.split(os.sep) if name]
    fd = os.open("/", _DIR_FLAGS)
    try:
        _check_dir(fd, "/", created=False, leaf=False)
        current = "/"
        for i, name in enumerate([*names, leaf]):
            current = os.path.join(current, name)
            child, created = _open_child(fd, name, current, create=create)
            os.close(fd)
            fd = -1
            if child is None:
                return None
            fd = child
            _check_dir(fd, current, created=created, leaf=i == len(names))
        result, fd = fd, -1
        return result
    finally:
        if fd >= 0:
            os.close(fd)


def _check_links(path: str) -> None:
    """Symbolic links above the spool are followed only when root or we own them: in ``/tmp``
    anyone may plant ``/tmp/otel-celery-publish-<uid>`` as a link, and swap it later."""
    prefix = "/"
    for name in path.split(os.sep):
        if not name:
            continue
        prefix = os.path.join(prefix, name)
        try:
            st = os.lstat(prefix)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (0, os.geteuid()):
            raise SpoolRefused(
                f"{prefix} above the spool is a symbolic link owned by uid {st.st_uid}: that "
                "user could point the spool anywhere"
            )


def _open_child(dirfd: int, name: str, path: str, *, create: bool) -> tuple[int | None, bool]:
    created = False
    try:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=dirfd), False
        except FileNotFoundError:
            if not create:
                return None, False
        try:
            os.mkdir(name, 0o700, dir_fd=dirfd)
            created = True
        except FileExistsError:
            pass  # made by someone else meanwhile: checked as found
        return os.open(name, _DIR_FLAGS, dir_fd=dirfd), created
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise SpoolRefused(
                f"spool directory {path} is a symbolic link or not a directory: refusing to "
                "use it (another user could point it at their own files)"
            ) from None
        raise


def _check_dir(fd: int, path: str, *, created: bool, leaf: bool) -> None:
    euid = os.geteuid()
    st = os.fstat(fd)
    if created and st.st_uid == euid:
        os.fchmod(fd, 0o700)  # whatever the umask
        st = os.fstat(fd)
    mode = stat.S_IMODE(st.st_mode)
    if created or leaf:
        if st.st_uid != euid:
            raise SpoolRefused(
                f"spool directory {path} belongs to uid {st.st_uid}, not to this process's "
                f"user (uid {euid}): another user could plant or delete audit records there"
            )
        if mode & 0o077:
            raise SpoolRefused(
                f"spool directory {path} has mode {mode:04o}: it must be 0700 (other users "
                "could read or change the audit records in it)"
            )
        return
    if st.st_uid not in (0, euid):
        raise SpoolRefused(
            f"directory {path} above the spool belongs to uid {st.st_uid} (neither root nor "
            f"this process's user, uid {euid}): that user could replace the spool"
        )
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise SpoolRefused(
            f"directory {path} above the spool has mode {mode:04o}: other users can write to "
            "it and it has no sticky bit, so they could replace the spool"
        )


def file_problem(st: os.stat_result) -> str | None:
    """Why the file ``st`` describes is not a regular file of ours, or None when it is."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != os.geteuid():
        return f"belongs to uid {st.st_uid}, not to this process's user (uid {os.geteuid()})"
    return None
