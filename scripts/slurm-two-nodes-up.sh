#!/usr/bin/env bash
# slurm-two-nodes-up.sh — a real two-node Slurm cluster on this one machine, for tests and CI.
#
# Three Linux network namespaces play three hosts joined by one switch (a bridge in the head's
# namespace, one veth pair per compute node):
#
#   halos-head  10.77.18.1   slurmctld; the "login node": run sbatch/squeue/snakemake there
#   halos-n1    10.77.18.11  slurmd -N halos-n1
#   halos-n2    10.77.18.12  slurmd -N halos-n2
#
# Each daemon also gets its own UTS namespace, so `hostname` in a job prints its node's name.
# `ip netns exec NS` bind-mounts /etc/netns/NS/{hosts,slurm} over /etc/hosts and /etc/slurm:
# inside the namespaces the cluster looks like a real one (its own slurm.conf, names resolve).
# The filesystem is shared by all three, as a site's shared filesystem is. Addresses exist only
# inside these namespaces; the machine's own network and the one-node cluster of
# scripts/slurm-up.sh (127.0.0.1) are untouched, and both clusters can run at once.
#
# Why namespaces and not Slurm's multiple-slurmd mode: Debian's build has that mode (`scontrol
# show config`: MULTIPLE_SLURMD = Yes; `slurmd -N p1` and `-N p2` on 127.0.0.1 ports 17001/17002
# do run a 2-node `srun`), but both nodes then print one hostname and one address, and their
# NodeNames resolve to no host, so a job's ranks would rendezvous over loopback and nothing would
# test what a real multi-node job needs: the first node's name resolved on the other, a TCP
# rendezvous and gloo/NCCL traffic between two addresses on a named interface
# (GLOO_SOCKET_IFNAME=halos0). (A namespace with only `lo` is not enough either: getaddrinfo's
# AI_ADDRCONFIG then resolves nothing, and slurmd/srun fail with 'Unable to resolve "127.0.0.1"'.)
#
#   ip netns exec halos-head sinfo          # both nodes idle
#   ip netns exec halos-head snakemake --profile slurm ...
#
# Idempotent (a second run while up changes nothing). Must run as root. Stop with
# scripts/slurm-down.sh, which removes the namespaces, veths, files and PID files made here.
set -euo pipefail

PARTITION=${HALOS_SLURM_PARTITION:-ci}
NET=10.77.18
HEAD=halos-head
NODES=(halos-n1 halos-n2)
IFACE=halos0                      # the interface name in every namespace (GLOO_SOCKET_IFNAME)
RUN=/run/halos-two-nodes          # PID files
STATE=/var/spool/halos-two-nodes  # slurmctld state, one slurmd spool dir per node
LOGS=/var/log/slurm

SAY_AS=slurm-two-nodes-up
# shellcheck source=scripts/slurm-lib.sh
source "$(dirname "$0")/slurm-lib.sh"

address() {  # address NAMESPACE
  case "$1" in "$HEAD") echo "$NET.1" ;; halos-n*) echo "$NET.1${1#halos-n}" ;; esac
}

make_network() {  # the bridge in the head's namespace, a veth from it to each node's
  ip netns list | grep -qw "$HEAD" || ip netns add "$HEAD"
  if ! ip -n "$HEAD" link show "$IFACE" >/dev/null 2>&1; then
    ip -n "$HEAD" link add "$IFACE" type bridge
    ip -n "$HEAD" addr add "$(address "$HEAD")/24" dev "$IFACE"
    ip -n "$HEAD" link set "$IFACE" up
    ip -n "$HEAD" link set lo up
  fi
  local node
  for node in "${NODES[@]}"; do
    ip netns list | grep -qw "$node" || ip netns add "$node"
    ip -n "$node" link show "$IFACE" >/dev/null 2>&1 && continue
    ip -n "$HEAD" link add "$node" type veth peer name "$IFACE" netns "$node"
    ip -n "$HEAD" link set "$node" master "$IFACE" up
    ip -n "$node" addr add "$(address "$node")/24" dev "$IFACE"
    ip -n "$node" link set "$IFACE" up
    ip -n "$node" link set lo up
  done
}

hosts_file() {
  echo "127.0.0.1 localhost"
  local ns
  for ns in "$HEAD" "${NODES[@]}"; do echo "$(address "$ns") $ns"; done
}

slurm_conf() {
  local node_line node
  node_line=$(slurmd -C | head -n1)   # NodeName=vm CPUs=… RealMemory=…: each node sees it all
  [[ $node_line == NodeName=* ]] || fail "unexpected 'slurmd -C' output: $node_line"
  cat <<CONF
# written by halos-factory scripts/slurm-two-nodes-up.sh
ClusterName=halos2
SlurmctldHost=$HEAD($(address "$HEAD"))
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOGS/two-nodes-slurmctld.log
SlurmdLogFile=$LOGS/two-nodes-slurmd-%n.log
$(common_conf)
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
CONF
  for node in "${NODES[@]}"; do
    echo "${node_line/NodeName=* CPUs=/NodeName=$node NodeAddr=$(address "$node") CPUs=} State=UNKNOWN"
  done
  echo "PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
}

write_configs() {  # the same slurm.conf and hosts in every namespace's /etc/netns/NS/
  local ns conf hosts
  conf=$(slurm_conf); hosts=$(hosts_file)
  for ns in "$HEAD" "${NODES[@]}"; do
    mkdir -p "/etc/netns/$ns/slurm"
    echo "$hosts" | write_if_changed "/etc/netns/$ns/hosts" 0644 || true
    echo "$conf" | write_if_changed "/etc/netns/$ns/slurm/slurm.conf" 0644 && changed=1
  done
  return 0
}

as_host() {  # as_host NAMESPACE COMMAND... — a daemon in the namespace, with its hostname
  # Not `ip netns exec`: it mounts a new /sys without /sys/fs/cgroup, and slurmd then refuses to
  # start ("No filesystem mounted on /sys/fs/cgroup") even with proctrack/linuxproc. The same
  # /etc bind mounts by hand, in a mount namespace of the daemon's own.
  nsenter --net="/run/netns/$1" unshare --mount --uts -- sh -c \
    'mount --bind "/etc/netns/$0/hosts" /etc/hosts && mount --bind "/etc/netns/$0/slurm" /etc/slurm &&
     hostname "$0" && exec "$@"' "$@"
}

restart_if_changed() {  # a changed slurm.conf needs every daemon restarted
  [ "$changed" = 1 ] || return 0
  local pidfile
  for pidfile in "$RUN"/slurmd-*.pid "$RUN/slurmctld.pid"; do
    running "$pidfile" slurmd || running "$pidfile" slurmctld || continue
    local pid; pid=$(cat "$pidfile")
    say "slurm.conf changed: stopping pid $pid ($pidfile)"
    stop_and_wait "$pid"
  done
}

nodes_idle() {
  local states
  states=$(ip netns exec "$HEAD" sinfo -h -N -o '%N %T' 2>/dev/null) || return 1
  [ "$(echo "$states" | grep -cE ' (idle|mixed|allocated|completing)$')" -eq ${#NODES[@]} ] && return 0
  echo "$states" | grep -E ' (down|drain)' | while read -r node _; do
    ip netns exec "$HEAD" scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1
  done
  return 1
}

install_packages iproute2
start_munge
mkdir -p "$RUN" "$LOGS" "$STATE/slurmctld"
make_network
changed=0
write_configs
restart_if_changed
running "$RUN/slurmctld.pid" slurmctld || as_host "$HEAD" slurmctld
await 30 slurmctld ip netns exec "$HEAD" scontrol ping
for node in "${NODES[@]}"; do
  mkdir -p "$STATE/slurmd-$node"
  running "$RUN/slurmd-$node.pid" slurmd || as_host "$node" slurmd -N "$node"
done
await 60 "both nodes to become idle" nodes_idle
say "ready: partition $PARTITION on ${NODES[*]}; run clients with 'ip netns exec $HEAD ...'"
