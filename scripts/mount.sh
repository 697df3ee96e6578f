#!/usr/bin/env bash
# Set up (see setup.sh) and mount mithrilfs: ./scripts/mount.sh [MOUNTPOINT] [mithrilfs mount options]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
mountpoint=${1:-/var/cache/mithril}
shift || true
mkdir -p "$mountpoint"
.venv/bin/mithrilfs mount "$mountpoint" "$@"
echo "mounted at $mountpoint; in job scripts: eval \"\$($PWD/.venv/bin/mithrilfs env $mountpoint)\""
