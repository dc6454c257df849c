#!/bin/bash
# Exits at once: what a start costs, without the job's own work.
exit 0
