#!/bin/sh
# Shell pipeline corpus program: a shell loop | sed | tee OUTDIR/trace.txt, then a digest of the trace.
# usage: sh tee_pipeline.sh OUTDIR STEPS DELAY_MS
# The loop computes a deterministic sequence in shell arithmetic and sleeps DELAY_MS between steps; `tee`
# writes every line to the trace and to stdout, where "step I" shows the progress.
set -eu
out=$1 steps=$2 delay=$3
pause=$(awk -v ms="$delay" 'BEGIN { printf "%.3f", ms / 1000 }')
i=0 x=1
while [ "$i" -lt "$steps" ]; do
  x=$(( (x * 1103515245 + 12345 + i) % 2147483648 ))
  echo "step $i value $x"
  [ "$delay" -gt 0 ] && sleep "$pause"
  i=$((i + 1))
done | sed -u 's/ value / v=/' | tee "$out/trace.txt"
wc -l < "$out/trace.txt" > "$out/result.txt"
cksum < "$out/trace.txt" >> "$out/result.txt"
