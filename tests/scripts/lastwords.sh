#!/bin/bash
# Writes $1 numbered lines, one per $2 seconds, then a last line without a
# newline right before it exits with ${3:-0}.
for ((i = 1; i <= ${1:-10}; i++)); do
  printf 'line %04d ✓ of job %s\n' "$i" "$JOBGATE_JOB_ID"
  sleep "${2:-0.1}"
done
printf 'last words'
exit "${3:-0}"
