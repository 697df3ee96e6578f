"""The command's side of the admin socket: find the daemon serving a mount and ask it.

Split from `adminsock` (the daemon's side, which needs trio) so that the job
side, `mithrilfs.hooks` asking ``whoami``, imports nothing but the standard
library: a job's Python environment has no daemon packages (README,
"Installing").  The protocol and the socket's location are described in
`adminsock`.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mithrilfs.errors import UserError
from mithrilfs.mounts import FSTYPE, find_mount

ROOT_RUNTIME_DIR = Path("/run/mithrilfs")
PROTOCOL_VERSION = 1
MAX_REPLY = 64 << 20  # a dry run may list many entries
_PEERCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Peer:
    """Who is at the other end of a connection (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


# -- where the socket is ----------------------------------------------------------


def runtime_dir(daemon_uid: int) -> Path:
    if daemon_uid == 0:
        return ROOT_RUNTIME_DIR
    user_runtime = Path(f"/run/user/{daemon_uid}")
    if user_runtime.is_dir():
        return user_runtime / "mithrilfs"
    return Path(f"/tmp/mithrilfs-{daemon_uid}")


def socket_path(mountpoint: Path, daemon_uid: int) -> Path:
    real = os.path.realpath(mountpoint)
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:32]
    return runtime_dir(daemon_uid) / f"{digest}.sock"


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    return Peer(pid, uid, gid)


# -- asking -------------------------------------------------------------------------


def locate(mountpoint: Path) -> tuple[Path, int]:
    """The admin socket of the mount at *mountpoint*, and the uid of its daemon.

    Both come from the mount table, whose path is the real one, as the
    daemon saw it: the caller may not be able to resolve the path itself.
    """
    entry = find_mount(mountpoint)
    if entry is None or entry.fstype != FSTYPE:
        raise UserError(f"{mountpoint} is not a mithrilfs mount", 1)
    for option in entry.options.split(","):
        key, _, value = option.partition("=")
        if key == "user_id" and value.isdigit():
            return socket_path(Path(entry.mountpoint), int(value)), int(value)
    raise UserError(f"the mount table does not say who serves {mountpoint}", 1)


def ask(
    mountpoint: Path, op: str, fields: dict[str, Any] | None = None, *, wait: float
) -> dict[str, Any]:
    """Send one request to the daemon serving *mountpoint*; its result, or `UserError`.

    *wait*: seconds to wait for the answer.
    """
    path, owner = locate(mountpoint)
    request = json.dumps({"version": PROTOCOL_VERSION, "op": op, **(fields or {})}).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(wait)
        try:
            _connect(sock, path, wait)
        except (FileNotFoundError, ConnectionRefusedError):
            raise UserError(
                f"the daemon serving {mountpoint} takes no admin requests "
                f"(nothing listens at {path}); remount it with this version",
                1,
            ) from None
        except TimeoutError:
            raise UserError(
                f"the daemon serving {mountpoint} accepted no connection within {wait:g}s", 1
            ) from None
        except OSError as exc:
            raise UserError(f"cannot reach the admin socket {path}: {exc.strerror}", 1) from None
        server = peer_of(sock)
        if server.uid != owner:
            raise UserError(
                f"the admin socket {path} is served by uid {server.uid}, not by the "
                f"mount's daemon (uid {owner}); refusing to talk to it",
                1,
            )
        try:
            sock.sendall(request)
            answer = _receive_reply(sock)
        except TimeoutError:
            raise UserError(
                f"the daemon serving {mountpoint} did not answer within {wait:g}s", 1
            ) from None
        except OSError as exc:
            raise UserError(f"the admin socket {path} failed: {exc.strerror}", 1) from None
    try:
        reply = json.loads(answer)
        ok = reply["ok"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"the daemon serving {mountpoint} gave no valid answer", 1) from None
    if not ok:
        raise UserError(str(reply.get("error")), int(reply.get("exit_code") or 1))
    result: dict[str, Any] = reply["result"]
    return result


def _connect(sock: socket.socket, path: Path, wait: float) -> None:
    """Connect, waiting (up to *wait*) while the daemon's backlog is full."""
    deadline = time.monotonic() + wait
    while True:
        try:
            sock.connect(os.fspath(path))
            return
        except BlockingIOError:
            # A Unix socket with a full backlog refuses a connect with a timeout (EAGAIN).
            if time.monotonic() > deadline:
                raise TimeoutError from None
            time.sleep(0.05)


def _receive_reply(sock: socket.socket) -> bytes:
    received = bytearray()
    while chunk := sock.recv(1 << 16):
        received += chunk
        if len(received) > MAX_REPLY:
            break
    return bytes(received)
