#!/bin/bash
# Prints the job's environment and identity.
env | sort
echo "uid=$(id -u)"
if [ -t 0 ]; then echo "stdin=tty"; else echo "stdin=$(readlink /proc/self/fd/0)"; fi
