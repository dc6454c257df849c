#!/bin/bash
# Print a message on stderr and exit with the given code (default 1).
echo "failing on purpose with code ${1:-1}" >&2
exit "${1:-1}"
