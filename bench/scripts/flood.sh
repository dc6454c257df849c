#!/bin/bash
# Writes $1 bytes (default 1 GiB) of 64-byte lines to stdout as fast as it can.
yes "$(printf '%063d' 0)" | head -c "${1:-1073741824}"
