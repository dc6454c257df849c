#!/bin/bash
# What a job may do on a worker: who it runs as, its privileges, and whether
# it can read the worker's TLS key or write to the system.
echo "user=$(id -un)"
grep -E '^(NoNewPrivs|CapEff):' /proc/self/status | tr -d '\t' | tr ':' '='
if cat /etc/jobgate/pki/worker.key >/dev/null 2>&1; then
  echo "key=readable"
else
  echo "key=unreadable"
fi
if touch /etc/jobgate/probe 2>/dev/null; then
  echo "etc=writable"
else
  echo "etc=read-only"
fi
