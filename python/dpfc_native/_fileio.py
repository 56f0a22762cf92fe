"""Writing output files whole or not at all; opening input files that are regular files."""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import stat
import sys


@contextlib.contextmanager
def atomic_write(path, binary: bool = False):
    """A new file to write in place of ``path``: written beside the target and renamed over
    it when the block ends without an exception. A failure (a full disk, Ctrl-C) leaves the
    previous file as it was, never a truncated one, and no temporary file. A symlink is
    written through (its target replaced, beside it), an existing file keeps its
    permissions, and missing folders are made. An existing target that is not a regular
    file (a FIFO, a device) is written in place, and ``/dev/stdout``, ``/dev/stderr``,
    ``/dev/fd/N`` and ``/proc/self/fd/N`` through the process's own descriptor (also when
    it is redirected to a file).

    Yields the open file (text in UTF-8, or ``binary``). Write through the file object:
    ``ndarray.tofile`` (which ``np.save`` uses on real files) does not report a short
    write."""
    path = os.fspath(path)
    fd = _inherited_fd(path)
    if fd is not None:
        # /dev/stdout (even redirected to a file), /dev/fd/N: a stream the process holds
        # open, written through the descriptor itself (renaming over its file would detach
        # the stream; a fresh open would truncate it and write at its own offset). The
        # output is written in one piece at the end: nothing if the block raises, and a
        # zip (whose writer seeks back, which an O_APPEND descriptor ignores) whole.
        buf = io.BytesIO() if binary else io.StringIO()
        yield buf  # nothing is written if the block raises
        data = buf.getvalue()
        for stream in (sys.stdout, sys.stderr):  # what was printed before comes first
            with contextlib.suppress(AttributeError, ValueError, OSError):
                stream.flush()
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data if binary else data.encode("utf-8"))
        return
    if not _regular_or_missing(path):  # a FIFO, a device: written in place, not replaced
        with open(path, "wb") if binary else open(path, "w", encoding="utf-8") as f:
            yield f
        return
    target = os.path.realpath(path)
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    # A short name of its own (the target's may already be at the name-length limit).
    tmp = os.path.join(folder, f".dpfc-{secrets.token_hex(8)}.tmp")
    try:
        # "x": a new file with the umask's permissions
        with open(tmp, "xb") if binary else open(tmp, "x", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces the previous file
        if os.path.exists(target):
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _inherited_fd(path: str):
    """The descriptor of this process that ``path`` names (``/dev/stdout``, ``/dev/stderr``,
    ``/dev/fd/N``, ``/proc/self/fd/N``, ``/proc/<this pid>/fd/N``,
    ``/proc/thread-self/fd/N``), or that it is the same file as (stdout or stderr, reached
    through a symlink or another spelling), or None."""
    norm = os.path.normpath(os.path.abspath(path))
    own = rf"/proc/(?:self|thread-self|{os.getpid()})/fd/(\d+)"
    m = re.fullmatch(rf"/dev/(stdout|stderr)|/dev/fd/(\d+)|{own}", norm)
    if m is not None:
        return {"stdout": 1, "stderr": 2}.get(m.group(1)) or int(m.group(2) or m.group(3))
    try:
        st = os.stat(path)
    except OSError:
        return None
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            if os.path.samestat(st, os.fstat(fd)):
                return fd
    return None


def is_regular_or_new(path) -> bool:
    """Whether ``path`` is a regular file or does not exist yet (a file ``atomic_write``
    replaces whole), not a FIFO, a device or a descriptor of this process."""
    path = os.fspath(path)
    return _inherited_fd(path) is None and _regular_or_missing(path)


def _regular_or_missing(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:  # not there yet (or a dangling link)
        return True


def file_kind(mode: int) -> str:
    """What a ``st_mode`` that is not a regular file's is, in words."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a plain file"


def open_regular(path: str):
    """``path`` opened for binary reading if it is a regular file (links followed);
    otherwise an :class:`OSError` saying what it is. A FIFO, socket or device named like
    a data file would block the reader forever (or read without end), so the type is
    checked before the open, and again on the opened descriptor (the path may have been
    swapped in between); the open itself does not wait for a FIFO's writer."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise OSError(f"not a regular file ({file_kind(mode)})")
    nonblock = getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, os.O_RDONLY | nonblock | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"not a regular file ({file_kind(mode)})")
        if nonblock:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
