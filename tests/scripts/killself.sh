#!/bin/bash
# Prints a line, then kills itself with signal $1 (default KILL).
echo "before"
kill -"${1:-KILL}" $$
echo "not reached"
