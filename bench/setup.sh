#!/usr/bin/env bash
# Install what the WAN lab needs and build its relay.  Idempotent: when everything is
# present it asks no registry and finishes in about a second.
#
#   bash bench/setup.sh              deps, relay build, then a self-check of the wan link
#   bash bench/setup.sh --deps-only  deps and relay build only; starts nothing
#
# Peers come from Debian (iperf3, rsync, uftp, GridFTP), Python deps from PyPI.
# It never starts a service: while it installs, a policy-rc.d refuses every
# invoke-rc.d start (package postinst scripts would otherwise start daemons).
set -euo pipefail
cd "$(dirname "$0")/.."

DEPS_ONLY=0
for arg in "$@"; do
    case "$arg" in
        --deps-only) DEPS_ONLY=1 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

PY=${PYTHON:-python3}
export DEBIAN_FRONTEND=noninteractive

APT_PKGS=(iperf3 rsync uftp globus-gridftp-server-progs globus-gass-copy-progs nftables iproute2 gcc)

missing=()
for pkg in "${APT_PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup.sh: missing packages ${missing[*]}; run as root to install them" >&2
        exit 1
    fi
    echo "setup.sh: installing ${missing[*]}"
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod +x "$policy"
        made_policy=1
        trap '[ "$made_policy" = 1 ] && rm -f "$policy"' EXIT
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! $PY -c "import pyroute2, matplotlib" 2>/dev/null; then
    echo "setup.sh: installing pyroute2 and matplotlib from PyPI"
    $PY -m pip install --quiet --disable-pip-version-check "pyroute2>=0.7" "matplotlib>=3.7" 2>&1 \
        | grep -v -E "^WARNING: (Running pip as|Location)" || true
fi

relay=$($PY -c "from bench.lab.relay import build_relay; print(build_relay())")
echo "setup.sh: relay at $relay"

if [ "$DEPS_ONLY" = 1 ]; then
    echo "setup.sh: dependencies present"
    exit 0
fi

exec $PY -m bench.lab check wan
