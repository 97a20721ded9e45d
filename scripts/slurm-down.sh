#!/usr/bin/env bash
# slurm-down.sh — stop what scripts/slurm-up.sh and scripts/slurm-two-nodes-up.sh started, by the
# PIDs in their PID files, and remove what the two-node script made: its network namespaces
# (their veths and bridge go with them), /etc/netns/halos-*, its PID files and state.
# Logs stay in /var/log/slurm. Idempotent.
set -uo pipefail
TWO_NODES_RUN=/run/halos-two-nodes
NAMESPACES=(halos-n1 halos-n2 halos-head)

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

remove_namespace() {  # whatever still runs there (a job's leftovers) is ours: stop it, then the ns
  local ns=$1 pids
  ip netns list 2>/dev/null | grep -qw "$ns" || { rm -rf "/etc/netns/$ns"; return 0; }
  pids=$(ip netns pids "$ns" 2>/dev/null)
  if [ -n "$pids" ]; then
    echo "[slurm-down] stopping processes left in $ns: $pids" >&2
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null
  fi
  ip netns del "$ns" && echo "[slurm-down] removed network namespace $ns" >&2
  rm -rf "/etc/netns/$ns"
}

for pidfile in "$TWO_NODES_RUN"/slurmd-*.pid; do [ -e "$pidfile" ] && stop "$pidfile" slurmd; done
stop "$TWO_NODES_RUN/slurmctld.pid" slurmctld
for ns in "${NAMESPACES[@]}"; do remove_namespace "$ns"; done
rm -rf "$TWO_NODES_RUN" /var/spool/halos-two-nodes
rmdir /etc/netns 2>/dev/null  # when nothing else uses it
stop /run/slurmd.pid slurmd
stop /run/slurmctld.pid slurmctld
stop /run/slurmdbd.pid slurmdbd
stop /run/mysqld/mysqld.pid mariadbd
stop /run/munge/munged.pid munged
