#!/bin/bash
# Interleaves stdout and stderr, then exits with $1.
echo "out 1"
echo "err 1" >&2
echo "out 2"
echo "err 2" >&2
exit "${1:-0}"
