#!/bin/bash
# Prints a greeting and its arguments.
echo "hello from $JOBGATE_WORKER"
for a in "$@"; do echo "arg: $a"; done
