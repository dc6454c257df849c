#!/bin/bash
# Writes every byte value, $1 times, $2 seconds apart, then a lone UTF-8
# lead byte right before it exits.
for ((i = 0; i < ${1:-3}; i++)); do
  printf "$(printf '\\%03o' $(seq 0 255))"
  sleep "${2:-0.1}"
done
printf '\xc3'
