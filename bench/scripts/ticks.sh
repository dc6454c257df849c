#!/bin/bash
# Prints the wall-clock time (seconds.microseconds) just before each write,
# every $2 seconds (default 0.01), $1 times (default 1000).
for ((i = 0; i < ${1:-1000}; i++)); do
  printf '%s\n' "$EPOCHREALTIME"
  sleep "${2:-0.01}"
done
