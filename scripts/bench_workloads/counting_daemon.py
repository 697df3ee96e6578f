"""Run the unmodified mithrilfs daemon with a counter and a timer around each handler.

    python counting_daemon.py mount MP --store S --foreground ...   (the CLI's arguments)

Every pyfuse3 request handler of ``mithrilfs.fs.Operations`` (and the ones it
inherits, which answer ENOSYS) is wrapped before the daemon starts: the
wrapper counts the requests and sums the time spent in the handler.  On
SIGUSR2 the daemon writes ``{op: [requests, handler_ns]}`` as JSON to the
file named by $MITHRILFS_COUNTS and starts counting from zero again.  Used by
request_profile.py; nothing in the daemon's own code changes.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

OPS = [
    "lookup",
    "forget",
    "getattr",
    "setattr",
    "readlink",
    "mknod",
    "mkdir",
    "unlink",
    "rmdir",
    "symlink",
    "rename",
    "link",
    "open",
    "read",
    "write",
    "flush",
    "release",
    "fsync",
    "opendir",
    "readdir",
    "releasedir",
    "fsyncdir",
    "statfs",
    "getxattr",
    "setxattr",
    "listxattr",
    "removexattr",
    "access",
    "create",
]

COUNTS: dict[str, list[int]] = {}


def _wrap(name: str, handler: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(handler)
    async def counted(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter_ns()
        try:
            return await handler(*args, **kwargs)
        finally:
            entry = COUNTS.setdefault(name, [0, 0])
            entry[0] += 1
            entry[1] += time.perf_counter_ns() - t0

    return counted


def _dump(_signum: int, _frame: object) -> None:
    path = os.environ["MITHRILFS_COUNTS"]
    with open(path + ".tmp", "w") as out:
        json.dump(COUNTS, out)
    os.replace(path + ".tmp", path)
    COUNTS.clear()


def main() -> int:
    from mithrilfs import fs
    from mithrilfs.cli import main as cli_main

    for name in OPS:
        handler = getattr(fs.Operations, name, None)
        if handler is not None:
            setattr(fs.Operations, name, _wrap(name, handler))
    signal.signal(signal.SIGUSR2, _dump)
    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
