#!/usr/bin/env bash
# Run the WQS test suite: installs what the tests need, then pytest.
#
#   ./test.sh                 # everything
#   ./test.sh -k engine       # extra arguments go to pytest
#
# Needs root for apt packages (fio, redis-server, etcd-server, fdisk, iproute2) and for
# the loop-device and network-namespace tests; without root those tests skip and say so.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(fio redis-server etcd-server fdisk util-linux iproute2 e2fsprogs python3-venv)
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    need=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
    done
    if [ ${#need[@]} -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e ".[test]"

exec .venv/bin/python -m pytest -q "$@"
