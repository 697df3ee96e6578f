"""transfer/archive.py without a store: what an export archive may hold, and what is refused."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Callable

import pytest
import zstandard

from mithrilfs.errors import UserError
from mithrilfs.progress import Progress
from mithrilfs.transfer import archive
from mithrilfs.transfer.importing import check_devices
from mithrilfs.transfer.plan import Kind, Node, Plan

Member = tuple[tarfile.TarInfo, bytes]


def entry(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, **fields: object) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode = kind, len(data), 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def pack(members: list[Member], header: bytes | None = None) -> bytes:
    """A zstd-compressed PAX tar: the export header (counts taken from *members*), then them."""
    if header is None:
        sizes = sum(len(data) for info, data in members if info.isreg())
        header = archive.ExportMeta("cpu-unit", len(members), sizes, "unit").to_json()
    raw = io.BytesIO()
    with tarfile.open(
        fileobj=raw, mode="w", format=tarfile.PAX_FORMAT, errors=archive.TAR_ERRORS
    ) as tar:
        info = tarfile.TarInfo(archive.EXPORT_META_NAME)
        info.size = len(header)
        tar.addfile(info, io.BytesIO(header))
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return zstandard.ZstdCompressor().compress(raw.getvalue())


class MemoryStage:
    """Stands in for the store: keeps what would be staged, by digest."""

    def __init__(self) -> None:
        self.staged: dict[bytes, bytes] = {}

    def __call__(self, read: Callable[[int], bytes]) -> tuple[bytes, int]:
        data = b""
        while chunk := read(1 << 16):
            data += chunk
        digest = hashlib.sha256(data).digest()
        self.staged[digest] = data
        return digest, len(data)


def read(data: bytes) -> tuple[Plan, MemoryStage]:
    stage = MemoryStage()
    plan, _meta = archive.read_archive(
        io.BytesIO(data), stage, Progress("unit", stream=io.StringIO())
    )
    return plan, stage


GOOD = entry("triton/k/a.bin", b"a" * 100)
USER_ATTR = archive.XATTR_PAX_PREFIX + "user.origin"


def test_hard_links_fifos_devices_and_attributes_are_read() -> None:
    plan, stage = read(
        pack(
            [
                entry("triton/k", kind=tarfile.DIRTYPE, pax_headers={USER_ATTR: "dir"}),
                entry("triton/k/a.bin", b"a" * 100, pax_headers={USER_ATTR: "\udcff\x00bin"}),
                entry("triton/k/b.bin", kind=tarfile.LNKTYPE, linkname="triton/k/a.bin"),
                entry("triton/k/c.bin", kind=tarfile.LNKTYPE, linkname="triton/k/b.bin"),
                entry("triton/k/fifo", kind=tarfile.FIFOTYPE),
                entry("triton/k/s", kind=tarfile.SYMTYPE, linkname="a.bin"),
                entry("triton/k/s2", kind=tarfile.LNKTYPE, linkname="triton/k/s"),
                entry("triton/k/null", kind=tarfile.CHRTYPE, devmajor=1, devminor=3),
                entry("triton/k/big", kind=tarfile.BLKTYPE, devmajor=4095, devminor=(1 << 20) - 1),
            ]
        )
    )
    nodes = {b"/".join(parts): node for parts, node in plan.nodes.items()}
    assert nodes[b"triton/k"].xattrs == {b"user.origin": b"dir"}
    assert nodes[b"triton/k/a.bin"].xattrs == {b"user.origin": b"\xff\x00bin"}
    # A link to a link names the first: one inode, as GNU tar writes them.
    assert (
        nodes[b"triton/k/b.bin"].link
        == nodes[b"triton/k/c.bin"].link
        == (b"triton", b"k", b"a.bin")
    )
    assert nodes[b"triton/k/s2"].link == (b"triton", b"k", b"s")  # link(2) takes symlinks
    assert nodes[b"triton/k/fifo"].file_type == stat.S_IFIFO
    assert not nodes[b"triton/k/fifo"].is_device
    assert nodes[b"triton/k/null"].rdev == os.makedev(1, 3)
    assert nodes[b"triton/k/big"].rdev == os.makedev(4095, (1 << 20) - 1)
    assert nodes[b"triton/k/big"].is_device
    assert list(stage.staged.values()) == [b"a" * 100]  # a hard link stages nothing


def test_commit_order_puts_hard_links_after_what_they_name() -> None:
    plan = Plan()
    plan.add(Node((b"a", b"link"), Kind.HARDLINK, 0, 0, link=(b"z", b"file")))
    plan.add(Node((b"z", b"file"), Kind.FILE, 0o644, 0))
    plan.add(Node((b"a",), Kind.DIR, 0o755, 0))
    assert [node.parts for node in plan.in_commit_order()] == [
        (b"a",),
        (b"z", b"file"),
        (b"a", b"link"),
    ]


HOSTILE: dict[str, list[Member]] = {
    "absolute name": [GOOD, entry("/etc/passwd", b"x")],
    "dot-dot name": [GOOD, entry("triton/../../x", b"x")],
    "link to nothing": [GOOD, entry("triton/h", kind=tarfile.LNKTYPE, linkname="triton/none")],
    "link forward": [entry("triton/h", kind=tarfile.LNKTYPE, linkname=GOOD[0].name), GOOD],
    "link escaping": [GOOD, entry("triton/h", kind=tarfile.LNKTYPE, linkname="/etc/shadow")],
    "trusted attribute": [entry("triton/x", b"x", pax_headers={"SCHILY.xattr.trusted.x": "1"})],
    "bare user. attribute": [entry("triton/x", b"x", pax_headers={"SCHILY.xattr.user.": "1"})],
    "attribute on a FIFO": [
        entry("triton/f", kind=tarfile.FIFOTYPE, pax_headers={USER_ATTR: "1"}),
    ],
    "attribute name over 255 bytes": [
        entry("triton/x", b"x", pax_headers={"SCHILY.xattr.user." + "n" * 251: "1"}),
    ],
    "attributes over what an inode holds": [
        entry(
            "triton/x",
            b"x",
            pax_headers={f"SCHILY.xattr.user.{i}": "v" * 30_000 for i in range(3)},
        ),
    ],
    "socket": [entry("triton/s", kind=b"s")],
    "more entries than the header says": [GOOD, entry("triton/k/b.bin", b"b")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_members_are_refused(case: str) -> None:
    members = HOSTILE[case]
    data = pack(members)
    if case == "more entries than the header says":
        header = archive.ExportMeta("cpu-unit", 1, 100, "unit").to_json()
        data = pack(members, header)
    with pytest.raises((archive.BadArchive, tarfile.TarError)):
        read(data)


def test_a_truncated_archive_is_refused() -> None:
    data = pack([GOOD, entry("triton/k/b.bin", b"b" * 5000)])
    with pytest.raises(archive.BadArchive, match="truncated"):
        read(data[: len(data) // 2])


def test_version_1_archives_still_read() -> None:
    header = (
        archive.ExportMeta("cpu-unit", 1, 100, "unit")
        .to_json()
        .replace(b'"version": 2', b'"version": 1')
    )
    plan, _stage = read(pack([GOOD], header))
    assert list(plan.nodes) == [(b"triton", b"k", b"a.bin")]


@pytest.mark.parametrize(("major", "minor"), [(4096, 0), (0, 1 << 20), (0o7777777, 0o7777777)])
def test_device_numbers_beyond_the_kernel_are_refused(major: int, minor: int) -> None:
    node = entry("triton/d", kind=tarfile.CHRTYPE)
    node[0].devmajor, node[0].devminor = major, minor
    data = pack([node])
    with pytest.raises(archive.BadArchive, match="device number"):
        read(data)


def test_only_root_imports_device_nodes() -> None:
    plan = Plan()
    plan.add(Node((b"fifo",), Kind.SPECIAL, 0o600, 0, file_type=stat.S_IFIFO))
    check_devices(plan, 1000)  # FIFOs are anyone's
    plan.add(Node((b"null",), Kind.SPECIAL, 0o666, 0, file_type=stat.S_IFCHR, rdev=259))
    check_devices(plan, 0)
    with pytest.raises(UserError, match="only by root") as caught:
        check_devices(plan, 1000)
    assert caught.value.exit_code == 2
