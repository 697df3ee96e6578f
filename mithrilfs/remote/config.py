"""Where the shared tier is and how long it may take: the ``--remote`` options.

A password never comes in the URL (`parse_remote` refuses it) but from a
private file (`read_password_file`) or the environment (`PASSWORD_ENV`), and
is kept out of reprs and logs.
"""

from __future__ import annotations

import os
import stat
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from mithrilfs.errors import UserError
from mithrilfs.units import parse_duration

DEFAULT_TIMEOUT = 0.2  # seconds a lookup may spend on the tier (plus fetch time)
NEGATIVE_TTL = 30.0  # seconds a "not there" answer is remembered
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 10.0
PUBLISH_QUEUE = 10_000  # inodes waiting to be published
PASSWORD_ENV = "MITHRILFS_REMOTE_PASSWORD"

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class RemoteConfig:
    """Where the tier is and how long it may take; built by `parse_remote`."""

    url: str  # as the operator gave it; never holds a password
    client_url: str  # what redis-py gets: scheme, host, port, db, its own query options
    cluster: bool = False
    timeout: float = DEFAULT_TIMEOUT
    negative_ttl: float = NEGATIVE_TTL
    queue_size: int = PUBLISH_QUEUE
    backoff_initial: float = BACKOFF_INITIAL
    backoff_max: float = BACKOFF_MAX
    # Passed to redis-py apart from the URL, and kept out of every repr and log.
    password: str | None = field(default=None, repr=False)

    @property
    def display(self) -> str:
        """The URL as logs show it (`parse_remote` refuses one with a password)."""
        return self.url


def parse_remote(
    url: str, timeout: float | None = None, password: str | None = None
) -> RemoteConfig:
    """Validate a ``--remote`` URL.

    ``redis://`` and ``rediss://`` (TLS) name one server; Redis Cluster is
    selected by the scheme ``redis+cluster://`` / ``rediss+cluster://`` or
    by the query option ``cluster=1``.  Other query options go to redis-py.
    A password inside the URL is refused: command lines and fstab are
    readable by every user of the node.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
        has_password = parts.password is not None
    except ValueError as exc:
        raise UserError(f"--remote: invalid URL: {exc}", 2) from None
    if has_password or "password" in urllib.parse.parse_qs(parts.query):
        raise UserError(
            "--remote: the URL must not hold a password (every user can read command lines "
            "and fstab): put it in a file only root can read and pass --remote-password-file "
            f"FILE (fstab: remote_password_file=FILE), or set {PASSWORD_ENV}",
            2,
        )
    scheme = parts.scheme.lower()
    cluster = scheme in _CLUSTER_SCHEMES
    scheme = _CLUSTER_SCHEMES.get(scheme, scheme)
    if scheme not in ("redis", "rediss"):
        raise UserError(
            f"--remote: unsupported URL '{url}': expected redis://HOST:PORT/DB, "
            "rediss://... (TLS) or redis+cluster://HOST:PORT",
            2,
        )
    if not parts.hostname:
        raise UserError(f"--remote: no host in '{url}'", 2)
    query = []
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if key == "cluster":
            cluster = cluster or value.lower() in _TRUE
        else:
            query.append((key, value))
    path = parts.path
    if path.strip("/") and not path.strip("/").isdigit():
        raise UserError(f"--remote: the database in '{url}' must be a number", 2)
    if cluster and path.strip("/") not in ("", "0"):
        raise UserError("--remote: Redis Cluster has only database 0", 2)
    if timeout is not None and not 0 < timeout <= 60:
        raise UserError("--remote-timeout must be between 0 and 60 seconds", 2)
    netloc = parts.netloc if port is not None else f"{parts.netloc}:6379"
    client_url = urllib.parse.urlunsplit((scheme, netloc, path, urllib.parse.urlencode(query), ""))
    return RemoteConfig(
        url=url,
        client_url=client_url,
        cluster=cluster,
        timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
        password=password,
    )


def read_password_file(path: Path) -> str:
    """The tier's password from *path*, which no one but its owner may read."""
    what = f"--remote-password-file {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise UserError(f"{what}: no such file", 2) from None
    except OSError as exc:
        raise UserError(f"{what}: {exc.strerror}", 2) from None
    try:
        # Checked on the descriptor, before reading: a directory cannot be read at all.
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{what}: not a regular file", 2)
        if info.st_mode & 0o044:
            raise UserError(
                f"{what}: readable by group or others; make it private (chmod 600 {path})", 2
            )
        data = os.read(fd, 64 * 1024)
    finally:
        os.close(fd)
    try:
        password = data.decode().rstrip("\r\n")
    except UnicodeDecodeError:
        raise UserError(f"{what}: not UTF-8 text", 2) from None
    if not password or "\n" in password:
        raise UserError(f"{what}: expected one line holding the password", 2)
    return password


def parse_timeout(text: str) -> float:
    """'0.2', '200ms', '1s' -> seconds (units.parse_duration), at most a minute."""
    seconds = parse_duration(text, "--remote-timeout")
    if not 0 < seconds <= 60:
        raise UserError("--remote-timeout must be between 0 and 60 seconds", 2)
    return seconds
