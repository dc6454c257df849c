#!/bin/bash
# Writes the numbers 1 to $1, one a line, as fast as it can.
seq 1 "$1"
