"""The admin socket: how `mithrilfs stats`, `gc` and `evict` reach a serving daemon.

One Unix stream socket per mount, at a path that anyone can derive from the
mountpoint alone (the store directory is root's, 0700): for a daemon run by
root ``/run/mithrilfs/<digest of the mountpoint's real path>.sock``, for
another user's daemon the same name under ``/run/user/<uid>/mithrilfs`` (or
``/tmp/mithrilfs-<uid>`` where there is no /run/user/<uid>).  The client
finds the daemon's uid in the mount table (FUSE's ``user_id=`` option).  The
socket is 0666: who may do what is decided per request from the caller's
SO_PEERCRED, never from the socket's mode.  The client checks the server's
SO_PEERCRED too, so a socket planted in a shared directory is never trusted.

Protocol: one request per connection, one JSON object on one line, answered
by one JSON line, ``{"ok": true, "result": {...}}`` or ``{"ok": false,
"error": "...", "exit_code": N}``; then the daemon closes.  A request is at
most MAX_REQUEST bytes and must arrive within CONNECTION_TIMEOUT; a peer
that sends half a request and goes silent is disconnected.  At most
MAX_CONNECTIONS are served at once; more wait in the kernel's backlog.
Nothing a peer sends can stop the daemon: every failure of a connection
ends that connection only.

Crash states: a daemon killed while serving leaves its socket file; the next
mount at that mountpoint replaces it (bound under a temporary name, then
renamed over it), and the next mount anywhere removes it (nothing listens on
it any more).  A clean stop removes it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from mithrilfs.errors import UserError
from mithrilfs.mounts import FSTYPE, find_mount

log = logging.getLogger(__name__)

ROOT_RUNTIME_DIR = Path("/run/mithrilfs")
PROTOCOL_VERSION = 1
MAX_REQUEST = 64 * 1024
MAX_REPLY = 64 << 20  # a dry run may list many entries
CONNECTION_TIMEOUT = 5.0
MAX_CONNECTIONS = 32
# accept() failing for lack of descriptors or memory: wait, never give up serving.
_EXHAUSTION = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_PEERCRED = struct.Struct("3i")
_SOCKET_NAME = re.compile(r"[0-9a-f]{32}\.sock")


class RequestError(Exception):
    """A request the daemon refuses to run: answered with *message* and *exit_code*."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class RequestTooLong(RequestError):
    """More than MAX_REQUEST bytes without the end of the line."""


@dataclass(frozen=True)
class Peer:
    """Who is at the other end of a connection (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


Handler = Callable[[Peer, dict[str, Any]], Awaitable[dict[str, Any]]]


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


# -- the daemon's side ----------------------------------------------------------------


class Listening:
    """A listening socket at *path*, a stale one replaced; `close` removes it again."""

    def __init__(self, path: Path) -> None:
        _prepare_directory(path.parent)
        _sweep_stale(path.parent)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            self.sock.bind(os.fspath(temporary))
            os.chmod(temporary, 0o666)  # authorization is by peer credentials
            self.sock.listen(64)
            # Atomic: a stale socket of a killed daemon is replaced, never missing.
            os.replace(temporary, path)
            self._identity = os.stat(path).st_ino
        except OSError as exc:
            self.sock.close()
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise UserError(f"cannot create the admin socket {path}: {exc.strerror}", 1) from None

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            # Only our own: a newer daemon may have taken the name over.
            if os.stat(self.path).st_ino == self._identity:
                self.path.unlink()


def _prepare_directory(directory: Path) -> None:
    """Create the socket directory (0755), or check that nobody else could swap it."""
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        info = os.lstat(directory)
    except OSError as exc:
        raise UserError(f"cannot create {directory}: {exc.strerror}", 1) from None
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.geteuid()
        or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    ):
        raise UserError(
            f"{directory} must be a directory owned by uid {os.geteuid()} that only "
            "its owner can write; remove it and mount again",
            1,
        )


def _sweep_stale(directory: Path) -> None:
    """Remove the sockets of killed daemons, whatever their mountpoint.

    A socket nobody listens on refuses connections (ECONNREFUSED); a live
    daemon accepts (and answers an empty request) or, busy, says EAGAIN.
    """
    for candidate in directory.glob("*.sock"):
        if not _SOCKET_NAME.fullmatch(candidate.name):
            continue
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
            probe.setblocking(False)
            try:
                probe.connect(os.fspath(candidate))
            except ConnectionRefusedError:
                with contextlib.suppress(OSError):
                    candidate.unlink()
                    log.info("removed %s, left by a daemon that was killed", candidate)
            except OSError:
                pass  # alive and busy, or gone meanwhile


async def serve(
    listening: Listening,
    handle: Handler,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer connections on *listening* until cancelled."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(listening.sock.dup()))
    # Past MAX_CONNECTIONS nothing more is accepted: the kernel's backlog holds
    # the rest until a slot frees (a silent peer holds one for the timeout at most).
    slots = trio.Semaphore(MAX_CONNECTIONS)
    async with listener, trio.open_nursery() as nursery:
        task_status.started()
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                slots.release()
                if exc.errno not in _EXHAUSTION:
                    raise
                log.warning("admin socket: cannot accept a connection: %s", exc.strerror)
                await trio.sleep(0.1)
                continue
            except BaseException:
                slots.release()
                raise
            nursery.start_soon(_converse_in_slot, stream, handle, slots)


async def _converse_in_slot(
    stream: trio.SocketStream, handle: Handler, slots: trio.Semaphore
) -> None:
    try:
        await _converse(stream, handle)
    finally:
        slots.release()


async def _converse(stream: trio.SocketStream, handle: Handler) -> None:
    async with stream:
        try:
            peer = peer_of(stream.socket)  # type: ignore[arg-type]
            try:
                with trio.move_on_after(CONNECTION_TIMEOUT) as waiting:
                    text = await _receive_request(stream)
                if waiting.cancelled_caught:
                    return  # half a request, then silence: hang up
                reply = {"ok": True, "result": await handle(peer, parse_request(text))}
            except RequestTooLong as exc:
                await _send(stream, _error(str(exc), exc.exit_code))
                await _discard_rest(stream)
                return
            except RequestError as exc:
                reply = _error(str(exc), exc.exit_code)
            await _send(stream, reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away; nothing to answer
        except Exception:
            # A bug must cost one connection, never the mount.
            log.exception("admin socket: a request failed")
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await _send(stream, _error("the request failed; see the daemon's log", 1))


async def _receive_request(stream: trio.SocketStream) -> bytes:
    received = bytearray()
    while b"\n" not in received:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break  # the peer shut down its side: what came is the request
        received += chunk
        if len(received) > MAX_REQUEST:
            raise RequestTooLong(f"request longer than {MAX_REQUEST} bytes")
    return bytes(received.partition(b"\n")[0])


async def _discard_rest(stream: trio.SocketStream) -> None:
    """Read what an oversized request still sends (bounded) so that the answer reaches it.

    Closing a Unix socket with unread data resets the connection, and the
    peer would see the reset instead of the answer waiting for it.
    """
    budget = 16 * MAX_REQUEST
    with trio.move_on_after(CONNECTION_TIMEOUT):
        while budget > 0 and (chunk := await stream.receive_some(65536)):
            budget -= len(chunk)


def parse_request(text: bytes) -> dict[str, Any]:
    """The request object of one line; `RequestError` for anything malformed."""
    if not text.strip():
        raise RequestError("empty request")
    try:
        data = json.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError("request is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise RequestError(f"request is not JSON: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:
        # An integer of thousands of digits, arrays nested thousands deep.
        raise RequestError(f"request is not usable JSON: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise RequestError("request must be a JSON object")
    if data.get("version") != PROTOCOL_VERSION:
        raise RequestError(f"unsupported protocol version (this daemon speaks {PROTOCOL_VERSION})")
    if not isinstance(data.get("op"), str):
        raise RequestError("request has no 'op'")
    return data


def _error(message: str, exit_code: int) -> dict[str, Any]:
    return {"ok": False, "error": message, "exit_code": exit_code}


async def _send(stream: trio.SocketStream, reply: dict[str, Any]) -> None:
    # Bounded: a peer that never reads must not hold a task (and its reply) forever.
    with trio.move_on_after(CONNECTION_TIMEOUT):
        await stream.send_all(json.dumps(reply).encode() + b"\n")


# -- the command's side ---------------------------------------------------------------


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
