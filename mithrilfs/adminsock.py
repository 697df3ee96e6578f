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

This module is the daemon's side; the command's side, which the job side
uses too and which needs no trio, is `adminclient`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

# The command's side (importable without trio, for the job side) lives in
# adminclient; these names are re-exported for the daemon and the commands.
from mithrilfs.adminclient import PROTOCOL_VERSION as PROTOCOL_VERSION
from mithrilfs.adminclient import Peer as Peer
from mithrilfs.adminclient import ask as ask
from mithrilfs.adminclient import peer_of as peer_of
from mithrilfs.adminclient import socket_path as socket_path
from mithrilfs.errors import UserError

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
CONNECTION_TIMEOUT = 5.0
MAX_CONNECTIONS = 32
# accept() failing for lack of descriptors or memory: wait, never give up serving.
_EXHAUSTION = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_SOCKET_NAME = re.compile(r"[0-9a-f]{32}\.sock")


class RequestError(Exception):
    """A request the daemon refuses to run: answered with *message* and *exit_code*."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class RequestTooLong(RequestError):
    """More than MAX_REQUEST bytes without the end of the line."""


Handler = Callable[[Peer, dict[str, Any]], Awaitable[dict[str, Any]]]


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
