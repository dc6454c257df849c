#!/bin/bash
# Prints $1 batches of $2 numbered 100-byte lines, one batch every $3 seconds;
# the output is fully determined by the arguments (the followers check it).
n=0
for ((b = 0; b < $1; b++)); do
  for ((i = 0; i < $2; i++)); do
    printf 'line %09d %084d\n' "$n" 0
    n=$((n + 1))
  done
  sleep "$3"
done
