#!/bin/bash
# Writes the numbers 1 to $1, one line each $2 seconds, then exits with
# status $3: a job whose output shows whether every line arrived, once and
# in order, and whose exit status is its own.
#   lines.sh [N] [INTERVAL] [STATUS]
n=${1:-10}
interval=${2:-0.1}
for ((i = 1; i <= n; i++)); do
  echo "$i"
  if ((i < n)); then sleep "$interval"; fi
done
exit "${3:-0}"
