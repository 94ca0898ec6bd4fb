#!/usr/bin/env bash
# Install WQS and start a single-node store on the embedded default device
# (a 1 GiB file under /var/lib/wqs).
#
#   sudo ./install.sh            # install into /opt/wqs, start wqsd on 127.0.0.1:7070
#
# Environment: WQS_PREFIX (default /opt/wqs), WQS_LISTEN (default 127.0.0.1:7070),
# WQS_DEVICE_SIZE (default 1G), WQS_RDMA=1 (also install pyverbs for the RDMA transport). Under systemd the daemon runs as wqsd.service;
# without systemd (a container) it is started in the background, logging to
# /var/log/wqs/wqsd.log.
set -euo pipefail

PREFIX=${WQS_PREFIX:-/opt/wqs}
LISTEN=${WQS_LISTEN:-127.0.0.1:7070}
DEVICE_SIZE=${WQS_DEVICE_SIZE:-1G}
SRC=$(cd "$(dirname "$0")" && pwd)

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (it installs packages, /opt/wqs and a systemd unit)" >&2
    exit 1
fi

# Debian: a venv needs python3-venv; blkid (util-linux) guards `wqs format`.
if command -v apt-get >/dev/null; then
    missing=()
    python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
    command -v blkid >/dev/null || missing+=(util-linux)
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
fi

python3 -m venv "$PREFIX"
"$PREFIX/bin/pip" install --quiet --upgrade pip
"$PREFIX/bin/pip" install --quiet "$SRC"
if [ "${WQS_RDMA:-0}" = 1 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pyverbs rdma-core
    "$SRC/scripts/link-pyverbs.sh" "$PREFIX"
fi
for tool in wqsd wqs wqs-bench; do
    ln -sf "$PREFIX/bin/$tool" "/usr/local/bin/$tool"
done

install -d -m 0755 /etc/wqs
if [ ! -e /etc/wqs/wqsd.yaml ]; then
    install -m 0644 "$SRC/systemd/wqsd.yaml" /etc/wqs/wqsd.yaml
fi

wait_ready() {
    for _ in $(seq 1 60); do
        if /usr/local/bin/wqs --servers "$LISTEN" ping >/dev/null 2>&1; then
            /usr/local/bin/wqs --servers "$LISTEN" ping
            return 0
        fi
        sleep 0.5
    done
    echo "install.sh: wqsd did not answer on $LISTEN; see $1" >&2
    return 1
}

if [ -d /run/systemd/system ]; then
    install -m 0644 "$SRC/systemd/wqsd.service" "$SRC/systemd/wqsd@.service" /etc/systemd/system/
    systemctl daemon-reload
    systemctl enable --now wqsd.service
    wait_ready "journalctl -u wqsd"
else
    install -d -m 0700 /var/lib/wqs
    install -d -m 0755 /var/log/wqs /run/wqs
    if [ -f /run/wqs/wqsd.pid ] && kill -0 "$(cat /run/wqs/wqsd.pid)" 2>/dev/null; then
        echo "wqsd already running (pid $(cat /run/wqs/wqsd.pid))"
    else
        nohup /usr/local/bin/wqsd --config /etc/wqs/wqsd.yaml --listen "$LISTEN" \
            --device-size "$DEVICE_SIZE" >>/var/log/wqs/wqsd.log 2>&1 &
        echo $! > /run/wqs/wqsd.pid
        echo "started wqsd (pid $!) without systemd; log: /var/log/wqs/wqsd.log"
    fi
    wait_ready /var/log/wqs/wqsd.log
fi
echo "WQS is serving on $LISTEN. Try: wqs --servers $LISTEN stat"
