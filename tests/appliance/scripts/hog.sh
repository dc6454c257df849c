#!/bin/bash
# Keeps $1 MiB in memory at once (tail holds a line until it ends).
head -c "${1:-64}M" /dev/zero | tail
