#!/usr/bin/env bash
# One command for a newcomer: install dxa, create certificates if missing, start a
# receiving daemon on loopback, copy a generated ~1 GiB dataset (one large file plus
# 3,000 small ones) encrypted and verified with a progress bar, print the throughput,
# check the copy byte for byte, and stop the daemon.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh
export DXA_HOME=${DXA_HOME:-$HOME/.config/dxa}
WORK=${DXA_DEMO_DIR:-$PWD/demo-data}
mkdir -p "$WORK"
dxa init
python3 - "$WORK/src" <<'PY'
import os, sys
src = sys.argv[1]
if not os.path.exists(os.path.join(src, ".complete")):
    os.makedirs(os.path.join(src, "small"), exist_ok=True)
    with open(os.path.join(src, "model.bin"), "wb") as fh:
        for _ in range(768):
            fh.write(os.urandom(1 << 20))
    for i in range(3000):
        d = os.path.join(src, "small", f"{i // 500:02d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"part-{i:05d}.dat"), "wb") as fh:
            fh.write(os.urandom(64 << 10))
    open(os.path.join(src, ".complete"), "w").close()
print(f"dataset ready in {src}")
PY
rm -rf "$WORK/root" "$WORK/port"
dxa serve --listen 127.0.0.1:0 --root "$WORK/root" --port-file "$WORK/port" 2> "$WORK/serve.log" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s "$WORK/port" ] && break; sleep 0.1; done
PORT=$(cat "$WORK/port")
echo "daemon listening on 127.0.0.1:$PORT (log: $WORK/serve.log)"
dxa cp -r "$WORK/src" "dxa://127.0.0.1:$PORT/datasets/demo"
diff -r "$WORK/src" "$WORK/root/datasets/demo" && echo "byte-for-byte identical: $WORK/root/datasets/demo"
echo "--- running it again sends nothing (everything is already there and verified):"
dxa cp -r "$WORK/src" "dxa://127.0.0.1:$PORT/datasets/demo" --no-progress
