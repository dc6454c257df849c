#!/bin/bash
# Sleeps for $1 seconds (default 300), in a child process.
echo "sleeping"
sleep "${1:-300}"
