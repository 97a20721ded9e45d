#!/usr/bin/env bash
# slurm-up.sh — a real one-node Slurm cluster on this machine, for tests and CI. Idempotent.
#
# Installs Debian's munge + slurmctld + slurmd + slurm-client, writes a slurm.conf that matches
# the machine (`slurmd -C`), starts the daemons without systemd or cgroups, and waits until the
# node is idle. A second run while everything is up changes nothing (about 0.3 s).
#
#   HALOS_SLURM_ACCOUNTING=1   also MariaDB + slurmdbd, so `sacct` works as on a real site
#   HALOS_SLURM_PARTITION=ci   partition name (default: ci)
#
# Must run as root. Stop with scripts/slurm-down.sh (by PID files, never by process name).
set -euo pipefail

ACCOUNTING=${HALOS_SLURM_ACCOUNTING:-0}
PARTITION=${HALOS_SLURM_PARTITION:-ci}
CLUSTER=halos
ETC=/etc/slurm
LOGS=/var/log/slurm
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
DB_PASSWORD=halos-ci

say() { echo "[slurm-up] $*" >&2; }
fail() { say "error: $*"; exit 1; }
[ "$(id -u)" -eq 0 ] || fail "run as root (it installs packages and starts daemons)"

running() {  # running PIDFILE COMM — the PID file names a live process with that name
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}
await() {  # await SECONDS WHAT COMMAND... — poll every 0.5 s
  local seconds=$1 what=$2; shift 2
  for _ in $(seq $((seconds * 2))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  fail "gave up after ${seconds}s waiting for $what"
}

install_packages() {
  local wanted=(munge slurmctld slurmd slurm-client) missing=()
  [ "$ACCOUNTING" = 1 ] && wanted+=(slurmdbd mariadb-server)
  for p in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_munge() {
  install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
  install -d -o munge -g munge -m 0711 /var/lib/munge
  install -d -o munge -g munge -m 0755 /run/munge
  [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  running /run/munge/munged.pid munged || { rm -f /run/munge/munged.pid; runuser -u munge -- /usr/sbin/munged; }
  await 10 munge bash -c 'munge -n | unmunge'
}

write_if_changed() {  # write_if_changed FILE MODE < content; returns 0 when the file changed
  local tmp; tmp=$(mktemp)
  cat > "$tmp"
  if cmp -s "$tmp" "$1"; then rm -f "$tmp"; return 1; fi
  install -m "$2" "$tmp" "$1"; rm -f "$tmp"; say "wrote $1"
}

slurm_conf() {
  local node_line accounting
  node_line=$(slurmd -C | head -n1)   # NodeName=… CPUs=… RealMemory=…, measured here
  [[ $node_line == NodeName=* ]] || fail "unexpected 'slurmd -C' output: $node_line"
  if [ "$ACCOUNTING" = 1 ]; then
    accounting=$'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\nJobAcctGatherType=jobacct_gather/linux'
  else
    accounting=$'AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none'
  fi
  cat <<CONF
# written by halos-factory scripts/slurm-up.sh
ClusterName=$CLUSTER
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# no systemd/cgroups in a container: track processes by PID
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default, every job would get the whole node's memory and jobs would run one at a time
DefMemPerCPU=1000
$accounting
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=5
# finished jobs stay visible to squeue for 5 minutes (snakemake's squeue-based status needs it)
MinJobAge=300
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

start_accounting() {
  install -d -o mysql -g mysql -m 0755 /run/mysqld
  # An `if`, not `running … || mariadbd … &`: that backgrounds a subshell which keeps this
  # script's stdout/stderr open, and a caller reading them (CI, pytest) waits forever.
  if ! running /run/mysqld/mysqld.pid mariadbd; then
    setsid mariadbd --user=mysql --bind-address=127.0.0.1 --pid-file=/run/mysqld/mysqld.pid \
      >>"$LOGS/mariadb.log" 2>&1 </dev/null &
  fi
  await 60 mariadb mariadb-admin ping
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  write_if_changed "$ETC/slurmdbd.conf" 0600 <<CONF && changed=1
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageUser=slurm
StoragePass=$DB_PASSWORD
StorageLoc=slurm_acct_db
CONF
  running /run/slurmdbd.pid slurmdbd || { rm -f /run/slurmdbd.pid; slurmdbd; }
  await 60 slurmdbd sacctmgr -n list cluster
}

restart_if_changed() {  # a changed slurm.conf needs both daemons restarted, or the node is flagged
  [ "$changed" = 1 ] || return 0
  for daemon in slurmd slurmctld; do
    if running "/run/$daemon.pid" "$daemon"; then
      local pid; pid=$(cat "/run/$daemon.pid")
      say "slurm.conf changed: restarting $daemon"
      kill "$pid"
      for _ in $(seq 40); do [ -d "/proc/$pid" ] || break; sleep 0.25; done
    fi
  done
}

node_idle() {
  case "$(sinfo -h -o %T 2>/dev/null | head -n1)" in
    idle|mixed|allocated|completing) return 0 ;;
    *drain*|down*) scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1; return 1 ;;
    *) return 1 ;;
  esac
}

install_packages
start_munge
mkdir -p "$ETC" "$LOGS" "$STATE" "$SPOOL"
changed=0
slurm_conf | write_if_changed "$ETC/slurm.conf" 0644 && changed=1
[ "$ACCOUNTING" = 1 ] && start_accounting
restart_if_changed
running /run/slurmctld.pid slurmctld || { rm -f /run/slurmctld.pid; slurmctld; }
await 30 slurmctld scontrol ping
running /run/slurmd.pid slurmd || { rm -f /run/slurmd.pid; slurmd; }
await 60 "the node to become idle" node_idle
if [ "$ACCOUNTING" = 1 ]; then  # let root submit under an account, as on a real site
  sacctmgr -i -Q add account "$CLUSTER" Description=halos Organization=halos >/dev/null 2>&1 || true
  sacctmgr -i -Q add user root Account="$CLUSTER" >/dev/null 2>&1 || true
fi
say "ready: partition $PARTITION on $(hostname -s), accounting=$ACCOUNTING"
