#!/usr/bin/env bash
# The main job on the embedded default (a local store and a SQLite catalog, no
# Slurm): run a counter under `hpcckpt run --interval`, let it checkpoint,
# kill its whole process tree as a node crash would, resume it with
# `hpcckpt resume`, and show that it went on from where it was.
#
# Usage: sudo scripts/demo.sh        (it runs scripts/setup.sh first)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$REPO/scripts/setup.sh"
VENV=${HPCCKPT_VENV:-$REPO/.venv}
H="$VENV/bin/hpcckpt"
PY="$VENV/bin/python"

WORK=$(mktemp -d /tmp/hpcckpt-demo.XXXXXX)
export HPCCKPT_STORE="$WORK/store"
JOB="demo-$$"
N=60
PROG="import time
for i in range($N):
    print(i, flush=True)
    time.sleep(0.25)
print('done', flush=True)"

say() { printf '\n==> %s\n' "$*"; }

say "hpcckpt doctor"
"$H" doctor

say "running a counter (0..$((N-1))) under hpcckpt, checkpointing every 2 s (job $JOB)"
"$H" run --interval 2 --job-id "$JOB" -- python3 -u -c "$PROG" >"$WORK/first.out" 2>"$WORK/first.log" &
RUNNER=$!

committed() { "$H" list "$JOB" --json 2>/dev/null | "$PY" -c \
  'import json,sys; print(sum(r["status"]=="committed" for r in json.load(sys.stdin)))' 2>/dev/null || echo 0; }
for _ in $(seq 1 120); do
  [ "$(committed)" -ge 2 ] && break
  kill -0 "$RUNNER" 2>/dev/null || { cat "$WORK/first.log" >&2; echo "the runner died" >&2; exit 1; }
  sleep 0.5
done
[ "$(committed)" -ge 2 ] || { cat "$WORK/first.log" >&2; echo "no checkpoints were committed" >&2; exit 1; }
"$H" list "$JOB"

say "SIGKILL to the runner and the whole job tree, as a node crash would do"
"$PY" - "$RUNNER" <<'PYEOF'
import sys, psutil
runner = psutil.Process(int(sys.argv[1]))
procs = runner.children(recursive=True) + [runner]
for p in procs:
    p.kill()
psutil.wait_procs(procs, timeout=10)
PYEOF
wait "$RUNNER" 2>/dev/null || true
killed_at=$(tail -n1 "$WORK/first.out")
echo "the counter was at $killed_at when it was killed"

say "hpcckpt resume $JOB"
"$H" resume "$JOB" >"$WORK/resumed.out" 2>"$WORK/resumed.log" || { cat "$WORK/resumed.log" >&2; exit 1; }
first=$(head -n1 "$WORK/resumed.out")
last=$(grep -v done "$WORK/resumed.out" | tail -n1)
echo "after resume the counter went on at $first (from its checkpoint, not from 0) and finished at $last"
if [ "$first" -gt 0 ] && [ "$last" = "$((N-1))" ] && grep -qx done "$WORK/resumed.out"; then
  say "demo OK: the job resumed from its checkpoint and ran to its end (files in $WORK)"
else
  echo "demo FAILED: see $WORK" >&2; exit 1
fi
