#!/usr/bin/env bash
# slurm-down.sh — stop what scripts/slurm-up.sh started, by the PIDs in its PID files. Idempotent.
set -uo pipefail
stop() {  # stop PIDFILE COMM
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 0
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]; then
    echo "[slurm-down] stopping $2 (pid $pid)" >&2
    kill -TERM "$pid"
    for _ in $(seq 60); do [ -d "/proc/$pid" ] || break; sleep 0.25; done
    [ -d "/proc/$pid" ] && kill -KILL "$pid"
  fi
  rm -f "$1"
}
stop /run/slurmd.pid slurmd
stop /run/slurmctld.pid slurmctld
stop /run/slurmdbd.pid slurmdbd
stop /run/mysqld/mysqld.pid mariadbd
stop /run/munge/munged.pid munged
