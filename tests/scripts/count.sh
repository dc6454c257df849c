#!/bin/bash
# count.sh N INTERVAL: print 1..N, one per INTERVAL seconds.
n=${1:-10}
for ((i = 1; i <= n; i++)); do
  echo "$i"
  if ((i < n)); then sleep "${2:-1}"; fi
done
