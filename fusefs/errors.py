"""The core's exception hierarchy.

Every error the core raises is a `FsError` subclass that carries the errno a
Linux filesystem would give for it (after bcachefs ``errcode.h``: private error
classes, each with a standard errno class).  The FUSE layer converts them to
`pyfuse3.FUSEError` in one place; nothing inside the core knows about FUSE.

A subclass chooses its errno with a class attribute; a raise site may override
it for one instance (``FsError("...", errno=errno.EFBIG)``).  The message is one
line: it is what the log and the command-line tools print.
"""

from __future__ import annotations

import errno as _errno
from typing import ClassVar


class FsError(Exception):
    """Base of every error the core raises on purpose."""

    errno: ClassVar[int] = _errno.EIO
    _errno_override: int | None = None

    def __init__(self, message: str = "", *, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self._errno_override = errno

    @property
    def code(self) -> int:
        """The errno this error surfaces as."""
        if self._errno_override is not None:
            return self._errno_override
        return type(self).errno

    def __str__(self) -> str:
        msg = super().__str__()
        return msg or _errno.errorcode.get(self.code, "error")


class InvalidArgument(FsError):
    """A request that makes no sense: bad offsets, bad flags, bad commands."""

    errno = _errno.EINVAL


class NotFound(FsError):
    errno = _errno.ENOENT


class Exists(FsError):
    errno = _errno.EEXIST


class NotEmpty(FsError):
    errno = _errno.ENOTEMPTY


class IsADirectory(FsError):
    errno = _errno.EISDIR


class NotADirectory(FsError):
    errno = _errno.ENOTDIR


class NameTooLong(FsError):
    errno = _errno.ENAMETOOLONG


class NoSpace(FsError):
    """The allocator or a reservation could not be satisfied."""

    errno = _errno.ENOSPC


class OutOfMemory(FsError):
    """An allocation of a page or IO buffer failed (or a memory fault fired)."""

    errno = _errno.ENOMEM


class IOFailure(FsError):
    """The backing device failed a read, write or flush."""

    errno = _errno.EIO


class ReadOnly(FsError):
    """The filesystem went read-only after an error it could not survive."""

    errno = _errno.EROFS


class FileTooBig(FsError):
    """An offset or length past the maximum file size."""

    errno = _errno.EFBIG


class NotSupported(FsError):
    errno = _errno.EOPNOTSUPP


class NoData(FsError):
    """No such extended attribute."""

    errno = _errno.ENODATA


class Corrupt(FsError):
    """On-disk data failed a checksum or a structural check."""

    errno = _errno.EUCLEAN


class ExtentError(InvalidArgument):
    """An extent-map operation that would break the map's invariants:
    an overlapping map, a shift out of range, a negative index."""


class NotPermitted(FsError):
    errno = _errno.EPERM


class ArgumentTooBig(FsError):
    """A value past a size limit (an xattr value over 64 KiB)."""

    errno = _errno.E2BIG


class OutOfRange(FsError):
    """A name or buffer past a length limit (an xattr name over 255 bytes)."""

    errno = _errno.ERANGE


class InUse(FsError):
    """The image is opened by another fusefs process."""

    errno = _errno.EBUSY
