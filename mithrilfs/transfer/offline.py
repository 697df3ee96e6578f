"""Holding a store for offline work (import, export): the lock, and the class to work on."""

from __future__ import annotations

from pathlib import Path

from mithrilfs import device
from mithrilfs.errors import UserError
from mithrilfs.mounts import FSTYPE, mount_table
from mithrilfs.repository import Repository, holder_pid


def open_offline(store: Path, *, create: bool, hint: str) -> Repository:
    """Take the store lock, explaining what to do when a mount holds it.

    *hint* is the way to do the same through a mount, shown in the refusal.
    """
    store = store.absolute()
    try:
        return Repository.open(store, create=create)
    except UserError:
        pid = holder_pid(store)
        if pid is None:
            raise
        mounts = [
            m.mountpoint for m in mount_table() if m.fstype == FSTYPE and m.source == str(store)
        ]
        where = f" mounted at {', '.join(mounts)}" if mounts else ""
        mountpoint = mounts[0] if mounts else "MOUNTPOINT"
        raise UserError(
            f"store {store} is in use by mithrilfs pid {pid}{where}; "
            f"{hint.replace('MOUNTPOINT', mountpoint)}, or unmount it first "
            f"('mithrilfs umount {mountpoint}')",
            1,
        ) from None


def resolve_class(requested: str) -> str:
    try:
        return device.resolve(requested)
    except device.DeviceClassError as exc:
        raise UserError(str(exc), 2) from None
