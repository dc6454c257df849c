#!/bin/bash
# What a job may do on a worker: who it runs as, its privileges, its cgroup,
# and whether it can read the worker's TLS key or write to the system.
echo "uid=$(id -u)"
echo "user=$USER"
echo "tmpdir=$(stat -c '%u %a' "$TMPDIR")"
echo "groups=$(id -G | tr ' ' ',')"
grep -E '^(NoNewPrivs|CapEff|CapPrm):' /proc/self/status | tr -d '\t' | tr ':' '='
echo "cgroup=$(grep '^0::' /proc/self/cgroup | cut -d: -f3)"
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
