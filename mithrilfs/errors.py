"""The exceptions that cross module boundaries.

`FsError` carries the errno that a filesystem request must fail with; the
index and the open-file layer raise it, and `fs.py` turns it into a
`pyfuse3.FUSEError` at exactly one place.  `UserError` is a failure the CLI
reports as one line and an exit code, never as a traceback.
"""

from __future__ import annotations

import errno
import os


class FsError(Exception):
    """A filesystem request that fails with a specific errno."""

    def __init__(self, errno_: int, detail: str = "") -> None:
        super().__init__(detail or os.strerror(errno_))
        self.errno = errno_


def not_found() -> FsError:
    return FsError(errno.ENOENT)


class UserError(Exception):
    """A failure reported to the operator as one line, with an exit code.

    Exit codes: 1 for a failed operation, 2 for bad usage or input,
    3 for a store that needs repair (see `mithrilfs fsck --repair`).
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
