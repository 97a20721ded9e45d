# slurm-lib.sh — what scripts/slurm-up.sh (one node) and scripts/slurm-two-nodes-up.sh (two
# nodes in network namespaces) share: packages, munge, slurm.conf's common part, polling.
# Sourced, not run. The caller sets SAY_AS (its name in messages) and ACCOUNTING (0/1).

say() { echo "[${SAY_AS:-slurm}] $*" >&2; }
fail() { say "error: $*"; exit 1; }
[ "$(id -u)" -eq 0 ] || fail "run as root (it installs packages and starts daemons)"

running() {  # running PIDFILE COMM — the PID file names a live process with that name
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}
stop_and_wait() {  # stop_and_wait PID — SIGTERM, then up to 10 s for it to exit
  kill "$1"
  for _ in $(seq 40); do [ -d "/proc/$1" ] || break; sleep 0.25; done
}
await() {  # await SECONDS WHAT COMMAND... — poll every 0.5 s
  local seconds=$1 what=$2; shift 2
  for _ in $(seq $((seconds * 2))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  fail "gave up after ${seconds}s waiting for $what"
}

install_packages() {  # install_packages [EXTRA...] — Debian's munge + Slurm, once
  local wanted=(munge slurmctld slurmd slurm-client "$@") missing=()
  [ "${ACCOUNTING:-0}" = 1 ] && wanted+=(slurmdbd mariadb-server)
  for p in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_munge() {  # one munged for every cluster here: its socket is a file, seen from any namespace
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

common_conf() {  # slurm.conf lines every cluster here has (no systemd, no cgroups, no mail)
  cat <<CONF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# no systemd/cgroups in a container: track processes by PID
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default, every job would get the whole node's memory and jobs would run one at a time
DefMemPerCPU=1000
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=5
# finished jobs stay visible to squeue for 5 minutes (snakemake's squeue-based status needs it)
MinJobAge=300
CONF
}
