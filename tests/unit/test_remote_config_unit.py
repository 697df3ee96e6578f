"""The ``--remote`` options: URL forms, the password file and the timeout (no mount, no redis)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mithrilfs import remote
from mithrilfs.errors import UserError
from mithrilfs.remote.config import BACKOFF_INITIAL, BACKOFF_MAX, NEGATIVE_TTL, PUBLISH_QUEUE


def test_remote_url_forms() -> None:
    plain = remote.parse_remote("redis://cache.internal:6380/2")
    assert (plain.client_url, plain.cluster, plain.timeout) == (
        "redis://cache.internal:6380/2",
        False,
        remote.DEFAULT_TIMEOUT,
    )
    assert remote.parse_remote("rediss://h/0").client_url == "rediss://h:6379/0"
    for url in ("redis+cluster://h:7000", "redis://h:7000?cluster=1", "rediss+cluster://h:7000"):
        config = remote.parse_remote(url)
        assert config.cluster, url
        assert "cluster" not in config.client_url
        assert "+" not in config.client_url
    kept = remote.parse_remote("redis://h:1/0?cluster=0&ssl_cert_reqs=none", 1.5)
    assert (kept.cluster, kept.timeout) == (False, 1.5)
    assert kept.client_url.endswith("?ssl_cert_reqs=none")
    acl_user = remote.parse_remote("redis://mithril@h:1/0", password="hunter2")
    assert "hunter2" not in acl_user.display
    assert "hunter2" not in repr(acl_user)
    for secret in (
        "redis://user:hunter2@h:1/0",
        "redis://:hunter2@h:1/0",
        "redis://h/0?password=x",
    ):
        with pytest.raises(UserError, match="remote-password-file"):
            remote.parse_remote(secret)
    for bad in ("http://h:1", "redis://", "redis://h:99999", "redis://h/x", "redis+cluster://h/3"):
        with pytest.raises(UserError):
            remote.parse_remote(bad)
    assert remote.parse_timeout("200ms") == pytest.approx(0.2)
    assert remote.parse_timeout("1s") == 1.0
    for bad in ("0", "-1", "soon", "61"):
        with pytest.raises(UserError):
            remote.parse_timeout(bad)


def test_a_config_keeps_the_defaults_and_hides_its_password() -> None:
    config = remote.parse_remote("redis://mithril@cache:6380/1", password="hunter2")
    assert (config.negative_ttl, config.queue_size) == (NEGATIVE_TTL, PUBLISH_QUEUE)
    assert (config.backoff_initial, config.backoff_max) == (BACKOFF_INITIAL, BACKOFF_MAX)
    assert config.password == "hunter2"
    assert config.display == "redis://mithril@cache:6380/1"
    assert config.client_url == "redis://mithril@cache:6380/1"
    for bad in (0.0, -1.0, 60.5):
        with pytest.raises(UserError, match="between 0 and 60"):
            remote.parse_remote("redis://h/0", bad)


def private_file(path: Path, data: bytes, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.chmod(path, mode)  # whatever the umask
    return path


def test_the_password_comes_from_one_line_of_a_private_file(tmp_path: Path) -> None:
    assert remote.read_password_file(private_file(tmp_path / "a", b"hunter2\n")) == "hunter2"
    assert remote.read_password_file(private_file(tmp_path / "b", b"s p a c e\r\n")) == "s p a c e"
    assert remote.read_password_file(private_file(tmp_path / "c", b"x", 0o400)) == "x"


@pytest.mark.parametrize(
    ("data", "mode", "message"),
    [
        (b"hunter2\n", 0o640, "readable by group or others"),
        (b"hunter2\n", 0o604, "readable by group or others"),
        (b"", 0o600, "expected one line"),
        (b"\n", 0o600, "expected one line"),
        (b"one\ntwo\n", 0o600, "expected one line"),
        (b"\xff\xfe", 0o600, "not UTF-8"),
    ],
)
def test_a_bad_password_file_is_one_clear_error(
    tmp_path: Path, data: bytes, mode: int, message: str
) -> None:
    path = private_file(tmp_path / "password", data, mode)
    with pytest.raises(UserError, match=message) as raised:
        remote.read_password_file(path)
    assert raised.value.exit_code == 2
    assert "hunter2" not in str(raised.value)


def test_a_password_file_must_be_a_plain_file_of_its_own(tmp_path: Path) -> None:
    target = private_file(tmp_path / "target", b"hunter2\n")
    (tmp_path / "link").symlink_to(target)  # not followed: it could point anywhere
    (tmp_path / "dir").mkdir()
    for path, message in (
        (tmp_path / "missing", "no such file"),
        (tmp_path / "link", "--remote-password-file"),
        (tmp_path / "dir", "not a regular file"),
    ):
        with pytest.raises(UserError, match=message) as raised:
            remote.read_password_file(path)
        assert raised.value.exit_code == 2
