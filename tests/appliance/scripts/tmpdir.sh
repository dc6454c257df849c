#!/bin/bash
# Writes a file into the job's $TMPDIR, waits $1 seconds, then reads it back
# and writes another: whether the job's private directory stays its own
# while the worker restarts.
#   tmpdir.sh [SECONDS]
echo "tmpdir=$TMPDIR"
if echo kept > "$TMPDIR/before"; then echo "written"; fi
sleep "${1:-10}"
if [ "$(cat "$TMPDIR/before" 2>/dev/null)" = kept ]; then
  echo "before=kept"
else
  echo "before=gone"
fi
if echo new 2>/dev/null > "$TMPDIR/after"; then
  echo "after=written"
else
  echo "after=failed"
fi
