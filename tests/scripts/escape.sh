#!/bin/bash
# Starts a child, a grandchild, a process that ignores SIGTERM (with a child
# of its own) and one that leaves the job's session with setsid; prints the
# pid of each, then waits.
sleep 300 &
echo "child $!"
bash -c 'sleep 300 & echo "grandchild $!"; wait' &
echo "parent $!"
bash -c 'trap "" TERM; sleep 300 & echo "stubborn-child $!"; echo "stubborn $$"; wait' &
setsid bash -c 'echo "escapee $$"; exec sleep 300' &
wait
