#!/usr/bin/env bash
# Install what mithrilfs needs on a Debian 12 machine, idempotently:
# the FUSE 3 runtime and headers (pyfuse3 builds against them), a compiler,
# redis-server (the shared-tier tests), and a virtualenv in .venv with the
# package, the compilers it is tested with, and the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(fuse3 libfuse3-dev pkg-config gcc python3-venv redis-server zstd util-linux psmisc)

missing=()
for package in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup: need root to install: ${missing[*]}" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "setup: mithrilfs needs Python 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=" >&2
    exit 1
fi

stamp=".venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [[ ! -f $stamp ]]; then
    [[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    # The tested set (constraints.txt): torch==2.13.0 is the CPU build on this
    # machine's disk; pinning it keeps pip from fetching a CUDA build.
    .venv/bin/python -m pip install -q -c constraints.txt -e '.[compilers,test,bench]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi
