#!/bin/bash
# Count from 1 to N (default 10), one number per interval (default 1s).
#   count.sh [N] [INTERVAL]
set -euo pipefail
n=${1:-10}
interval=${2:-1}
for ((i = 1; i <= n; i++)); do
  echo "$i"
  if ((i < n)); then sleep "$interval"; fi
done
