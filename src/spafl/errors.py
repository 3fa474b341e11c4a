"""User-facing errors.

Anything a user can get wrong (a config key, a value, a missing file, a
broken checkpoint) raises :class:`UserError`. The CLI prints its message as
one line and exits with status 2; library users catch it like any exception.
"""

import errno
import os


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


class DivergedError(RuntimeError):
    """Training produced a non-finite loss; the run stops at the last good checkpoint."""


#: What an OSError's errno means for the user, where the system's own words are unclear.
_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is too large for the file system",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "the system does not allow it",
    errno.ENAMETOOLONG: "the path is too long",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "it is a directory",
    errno.ENOENT: "no such file or directory",
}

#: The errnos of a file-system fault (as opposed to a bug, or a fault of a pipe or socket).
FILE_ERRNOS = frozenset(_REASONS) | {errno.EIO, errno.EEXIST, errno.ELOOP, errno.EMLINK, errno.ENOTEMPTY, errno.EBUSY}


def short_path(path: object, limit: int = 160) -> str:
    """``path`` as text, shortened in the middle when it is longer than ``limit`` characters (an error stays one line)."""
    text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    text = text.replace("\n", "\\n")
    if len(text) <= limit:
        return text
    return f"{text[:limit // 2]}...{text[-limit // 4:]} ({len(text)} characters)"


def file_error(error: OSError, doing: str, path: object = None) -> UserError:
    """A one-line UserError for ``error``, met while ``doing`` (e.g. "cannot write DIR/checkpoint.pt").

    Names the file the system names when it differs from ``path``, and says what the errno means.
    """
    reason = _REASONS.get(error.errno) or error.strerror or str(error)
    where = error.filename
    if where is not None and (path is None or os.fsdecode(where) != os.fsdecode(path)):
        reason = f"{reason} ({short_path(where)})"
    return UserError(f"{doing}: {reason}")


def read_bounded(path: object, limit: int, what: str) -> bytes:
    """The bytes of ``path`` (at most ``limit``: /dev/zero or a huge file is refused, not read); UserError otherwise."""
    try:
        with open(path, "rb") as handle:  # type: ignore[arg-type]
            data = handle.read(limit + 1)
    except FileNotFoundError:
        raise UserError(f"{what} {short_path(path)} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} {short_path(path)} is a directory, expected a file") from None
    except OSError as error:
        raise file_error(error, f"cannot read {what} {short_path(path)}", path) from None
    if len(data) > limit:
        raise UserError(f"{what} {short_path(path)} is larger than {limit >> 20} MiB; it is not a spafl {what}")
    return data
