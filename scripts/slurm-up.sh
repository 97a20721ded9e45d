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

SAY_AS=slurm-up
# shellcheck source=scripts/slurm-lib.sh
source "$(dirname "$0")/slurm-lib.sh"

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
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
$(common_conf)
$accounting
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
      stop_and_wait "$pid"
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
