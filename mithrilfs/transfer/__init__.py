"""Moving cache trees into and out of a store while no daemon serves it.

`mithrilfs import` brings an existing cache directory (``~/.triton/cache``,
``/tmp/torchinductor_$USER``) or an export archive into a device class's tree;
`mithrilfs export` streams a class's tree into a zstd-compressed tar that
another node (or a container image build) imports.

Both hold the store lock for their whole run, like a daemon: a store that a
mount is serving is refused, and the message says to copy through the mount
or unmount first.

| module | owns |
| --- | --- |
| `archive.py` | the export format: reading and validating a tar.zst, no store involved |
| `plan.py` | what an import will write, gathered before anything is written |
| `importing.py` | staging, the merge rules and the commit into a store (crash states) |
| `exporting.py` | writing a class's tree as an archive |
| `offline.py` | taking the store lock for offline work, naming the class |
"""

from __future__ import annotations

from mithrilfs.transfer.archive import EXPORT_META_NAME, BadArchive, ExportMeta, is_archive
from mithrilfs.transfer.exporting import ExportReport, export_class
from mithrilfs.transfer.importing import ImportReport, import_archive, import_directory

__all__ = [
    "EXPORT_META_NAME",
    "BadArchive",
    "ExportMeta",
    "ExportReport",
    "ImportReport",
    "export_class",
    "import_archive",
    "import_directory",
    "is_archive",
]
