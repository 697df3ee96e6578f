"""Which extended attributes a mount keeps, and their limits.

Only the ``user.`` namespace is stored (in the index, per inode).  Every
other namespace answers EOPNOTSUPP: ``trusted.`` and ``security.`` would
need the daemon to enforce what the kernel enforces for a local
filesystem, and ``system.posix_acl_*`` would need ACL checks that
`default_permissions` does not make.  The kernel itself refuses names over
255 bytes (ERANGE) and values over 64 KiB (E2BIG) before a request arrives.
"""

from __future__ import annotations

import errno

from mithrilfs.errors import FsError

USER_PREFIX = b"user."
# What one inode's attributes may take, names and values together; beyond
# it a set fails with ENOSPC, as on ext4 once its attribute block is full.
# It also keeps a listing under the kernel's 64 KiB list limit.
INODE_XATTR_BYTES = 64 * 1024


def check_name(name: bytes) -> None:
    """Refuse a name outside the ``user.`` namespace (ACLs included) with EOPNOTSUPP.

    A bare ``user.`` is EINVAL, as the kernel answers for a local filesystem.
    """
    if name == USER_PREFIX:
        raise FsError(errno.EINVAL)
    if not name.startswith(USER_PREFIX):
        raise FsError(errno.EOPNOTSUPP)
