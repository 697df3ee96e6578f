"""The tier's keys (``<class>`` is the device class, paths are relative to their tree's root)::

mithrilfs:v1:obj:<64 hex>                      an object's bytes, named by blake3
mithrilfs:v1:<class>:entry:<path>              the shared tree: one entry's manifest (JSON)
mithrilfs:v1:<class>:dirs                      a set: every directory above an entry
mithrilfs:v1:<class>:user:<uid>:entry:<path>   the same for the private tree of <uid>
mithrilfs:v1:<class>:user:<uid>:dirs
"""

from __future__ import annotations

KEY_PREFIX = b"mithrilfs:v1:"


def object_key(digest: bytes) -> bytes:
    return KEY_PREFIX + b"obj:" + digest.hex().encode()


def namespace(device_class: str, uid: int | None) -> bytes:
    """The key prefix of one tree's entries: the class's cluster-wide namespace
    (the shared tree) or the one of the user with this uid (their private tree)."""
    shared = KEY_PREFIX + device_class.encode() + b":"
    return shared if uid is None else shared + b"user:%d:" % uid


def entry_key(space: bytes, path: tuple[bytes, ...]) -> bytes:
    return space + b"entry:" + b"/".join(path)


def dirs_key(space: bytes) -> bytes:
    return space + b"dirs"
