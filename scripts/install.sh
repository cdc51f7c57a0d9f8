#!/usr/bin/env bash
# Install dxa and what it needs, from PyPI only; builds the native modules in place.
# Idempotent. Used by demo.sh and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install --quiet --disable-pip-version-check \
    "setuptools>=77" wheel "Cython>=3.0" "cryptography>=42" "blake3>=0.4" "zstandard>=0.22" "msgpack>=1.0" \
    "grpcio>=1.85.1" "grpcio-tools==1.85.1" "protobuf>=7.35.1,<8" \
    "prometheus-client>=0.20" \
    "pytest>=8" "pytest-timeout>=2.3" "hypothesis>=6.100" 2>&1 | grep -v -E "^WARNING: (Running pip as|Location)" || true
if [ "${DXA_NO_EXTENSIONS:-}" != "1" ]; then
    $PY setup.py --quiet build_ext --inplace
fi
$PY -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e . 2>&1 \
    | grep -v -E "^WARNING: (Running pip as|Location)" || true
$PY -c "import agent._native as n; print('dxa installed; native code:', n.IMPLEMENTATION)"
