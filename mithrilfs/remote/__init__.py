"""The shared tier: cache entries published to, and fetched from, Redis or Valkey.

A mount started with ``--remote URL`` publishes every cache entry it seals
and, when a name is missing locally, asks the shared tier for it before
answering "no such file".  The tier is optional and never fails a compile:
any error, timeout or refused object is a local miss, and the compiler
builds the entry as it would without the tier.

A cache entry is what `layouts.entry_rule` says (a Triton key directory, an
FX graph or AOTAutograd key directory, the code-cache files sharing a stem,
or a single file).  The modules, one idea each:

    config.py    the ``--remote`` URL, its password and timeout (`RemoteConfig`)
    keys.py      the tier's key names, one namespace per tree
    manifest.py  the manifest format: one entry as stored, checked on the way in
    backoff.py   skipping a tier that is down, remembering names it lacks
    client.py    redis-py in worker threads: probe, bounded fetch, publish
    local.py     the local tree as the tier sees it (which tree, whose)
    part.py      what fetching and publishing share (`TierPart`)
    fetch.py     a local miss answered from the tier, installed whole or not at all
    publish.py   sealed entries sent to the tier in the background
    service.py   `Remote`, which builds the parts and is what fs.py calls

Lifecycle: at mount the daemon reaches the tier once (`Remote.connect`,
bounded) before it serves; at unmount it publishes what is queued
(`Remote.drain`, bounded).  Threads: redis-py's synchronous client runs only
in worker threads and gets paths and bytes, never index state; SQLite, the
store's renames and the counters stay on the trio thread.

Trust: objects are verified by hash, so a tampered object is refused.
Manifests are trusted as far as their shape allows: they are checked to
describe only files inside their own entry, but whoever can write the
Redis keys decides which (valid) objects a name refers to.  See
docs/remote.md.
"""

from mithrilfs.remote.backoff import Backoff, NegativeCache
from mithrilfs.remote.client import ByteBudget, RedisTier, RemoteUnavailable, StagedObjects
from mithrilfs.remote.config import (
    DEFAULT_TIMEOUT,
    PASSWORD_ENV,
    RemoteConfig,
    parse_remote,
    parse_timeout,
    read_password_file,
)
from mithrilfs.remote.keys import namespace
from mithrilfs.remote.local import names_user, split_tree
from mithrilfs.remote.manifest import MAX_MANIFEST_BYTES, FileSpec, Manifest, ManifestError
from mithrilfs.remote.service import Remote

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_MANIFEST_BYTES",
    "PASSWORD_ENV",
    "Backoff",
    "ByteBudget",
    "FileSpec",
    "Manifest",
    "ManifestError",
    "NegativeCache",
    "RedisTier",
    "Remote",
    "RemoteConfig",
    "RemoteUnavailable",
    "StagedObjects",
    "names_user",
    "namespace",
    "parse_remote",
    "parse_timeout",
    "read_password_file",
    "split_tree",
]
