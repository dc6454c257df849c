#!/bin/bash
# Ignores SIGTERM: only SIGKILL, after [jobs].stop_grace_s, ends it.
trap '' TERM
echo "stubborn $$"
while :; do sleep 0.1; done
