#!/usr/bin/env bash
# Run a training command again and again while it exits 75 ("saved, stopped early, resume
# me"), for machines without SLURM: a workstation, a spot VM, a container entrypoint.
#
#   examples/slurm/retry.sh python examples/plain_loop.py --run runs/plain --time-limit 1h
#
# MAX_TRIES (default 20) bounds the pieces; RETRY_DELAY (default 5 s) waits between them.
# Ctrl+C or SIGTERM: the running piece saves and exits 75, and no new piece starts.
set -uo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 2
fi
max_tries=${MAX_TRIES:-20}
delay=${RETRY_DELAY:-5}
stopping=0
pid=

# Background + wait, so that a signal reaches this shell at once and is passed on.
trap 'stopping=1; [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null' INT TERM
trap '[ -n "$pid" ] && kill -USR1 "$pid" 2>/dev/null' USR1

for ((try = 1; ; try++)); do
    "$@" &
    pid=$!
    wait "$pid"
    rc=$?
    while kill -0 "$pid" 2>/dev/null; do  # a trapped signal interrupted `wait`
        wait "$pid"
        rc=$?
    done
    pid=
    if [ "$rc" -ne 75 ] || [ "$stopping" -eq 1 ]; then
        exit "$rc"
    fi
    if [ "$try" -ge "$max_tries" ]; then
        echo "retry.sh: still exit 75 after $try pieces: giving up" >&2
        exit 75
    fi
    echo "retry.sh: exit 75 (saved, stopped early): piece $((try + 1)) in ${delay}s" >&2
    sleep "$delay"
    if [ "$stopping" -eq 1 ]; then
        exit 75
    fi
done
