#!/usr/bin/env bash
# Set up (see setup.sh) and mount mithrilfs: ./scripts/mount.sh [MOUNTPOINT] [mithrilfs mount options]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# mount(8) and fstab find the helper on the default PATH, not in .venv.
if [[ $(id -u) -eq 0 ]] && { [[ ! -e /usr/local/bin/mithrilfs ]] || [[ -L /usr/local/bin/mithrilfs ]]; }; then
    ln -sfn "$PWD/.venv/bin/mithrilfs" /usr/local/bin/mithrilfs
fi
mountpoint=${1:-/var/cache/mithril}
shift || true
mkdir -p "$mountpoint"
.venv/bin/mithrilfs mount "$mountpoint" "$@"
echo "mounted at $mountpoint; in job scripts: eval \"\$(mithrilfs env $mountpoint)\""
