#!/usr/bin/env bash
# Install what mithrilfs needs on a Debian 12 machine, idempotently:
# the FUSE 3 runtime and headers (pyfuse3 builds against them), a compiler,
# redis-server (the shared-tier tests), and a virtualenv in .venv of the
# newest supported Python with the package and its daemon extra, the
# compilers it is tested with, and the test tools.
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

# The newest supported Python found (PYTHON= chooses another): on PATH first,
# then /usr/bin.  A name that is on PATH but does not run (a pyenv shim for a
# version that is not selected) is passed over.
SUPPORTED=(3.13 3.12 3.11 3.10)
runs_supported() {
    "$1" -c 'import sys; sys.exit(sys.version_info[:2] not in [(3, 10), (3, 11), (3, 12), (3, 13)])' \
        >/dev/null 2>&1
}
if [[ -n ${PYTHON:-} ]]; then
    if ! runs_supported "$PYTHON"; then
        echo "setup: mithrilfs needs Python 3.10 to 3.13 (PYTHON=$PYTHON is $("$PYTHON" --version 2>&1))" >&2
        exit 1
    fi
else
    for version in "${SUPPORTED[@]}"; do
        for candidate in "python$version" "/usr/bin/python$version"; do
            if runs_supported "$candidate"; then
                PYTHON=$candidate
                break 2
            fi
        done
    done
    if [[ -z ${PYTHON:-} ]]; then
        echo "setup: no Python 3.10 to 3.13 found (python3.13 ... python3.10); set PYTHON=" >&2
        exit 1
    fi
fi
python_version=$("$PYTHON" -c 'import sys; print(sys.version.split()[0])')

# A venv of another Python is made again from scratch.
if [[ -x .venv/bin/python ]] && [[ $(.venv/bin/python -c 'import sys; print(sys.version.split()[0])') != "$python_version" ]]; then
    rm -rf .venv
fi
stamp=".venv/.installed-$( (cat pyproject.toml constraints.txt; echo "$python_version") | sha256sum | cut -c1-16)"
if [[ ! -f $stamp ]]; then
    [[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    # The operator's environment: the daemon extra (pyfuse3 builds against
    # libfuse3's headers), the compilers the suite drives and the test tools.
    # The tested set (constraints.txt): torch==2.13.0 is the CPU build on this
    # machine's disk; pinning it keeps pip from fetching a CUDA build.
    .venv/bin/python -m pip install -q -c constraints.txt -e '.[daemon,compilers,test,bench]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi
echo "setup: .venv has Python $python_version"
