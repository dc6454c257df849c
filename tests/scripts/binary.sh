#!/bin/bash
# Writes all 256 byte values, then invalid UTF-8.
printf "$(printf '\\%03o' $(seq 0 255))"
printf '\xff\xfe\xc3\x28'
