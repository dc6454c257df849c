#!/bin/bash
# Starts a child and a grandchild that ignore nothing, plus one that ignores
# SIGTERM, then waits; prints their pids first.
sleep 300 &
echo "child $!"
bash -c 'sleep 300 & echo "grandchild $!"; wait' &
bash -c 'trap "" TERM; sleep 300 & echo "stubborn $!"; wait' &
sleep 0.3
wait
