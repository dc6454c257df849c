#!/bin/bash
# Writes $1 lines of 100 bytes each (default 10000).
yes "$(printf '%099d' 0)" | head -n "${1:-10000}"
