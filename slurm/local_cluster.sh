#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the `slurm` tests.
#
#   bash slurm/local_cluster.sh install   # apt-get the packages if missing (root)
#   bash slurm/local_cluster.sh start     # install if needed, then start all daemons
#   bash slurm/local_cluster.sh status    # sinfo (+ the daemons' pids)
#   bash slurm/local_cluster.sh stop      # cancel jobs, stop all daemons, no process left
#   bash slurm/local_cluster.sh env       # prints `export SLURM_CONF=...`
#
# Everything lives in a private state dir (default /tmp/persistworld-slurm, override with
# PERSISTWORLD_SLURM_DIR): configs, munge key + socket, a private MariaDB (datadir, socket,
# 127.0.0.1:3307), slurmdbd, slurmctld, slurmd (node `localhost`, partition `debug`).
# It runs without systemd, as root. `start` when already running is a no-op; `start` after
# `stop` reuses the state dir (database, job ids); `rm -rf` the state dir for a clean slate.
# Clients find the cluster through SLURM_CONF=<dir>/etc/slurm.conf; `start` also links
# /etc/slurm/slurm.conf to it when that file does not exist (so plain `sinfo` works).
#
# Tunables (environment): PERSISTWORLD_SLURM_DIR, PERSISTWORLD_SLURM_CPUS (4),
# PERSISTWORLD_SLURM_MAXTIME (minutes, 240), PERSISTWORLD_SLURM_DB_PORT (3307),
# PERSISTWORLD_SLURM_PORT (6817: slurmctld; +1 slurmd, +2 slurmdbd),
# PERSISTWORLD_SLURM_TIMEOUT (seconds to wait for the cluster to come up, 90).
set -euo pipefail

DIR="${PERSISTWORLD_SLURM_DIR:-/tmp/persistworld-slurm}"
CLUSTER=persistworld
NODE=localhost
CPUS="${PERSISTWORLD_SLURM_CPUS:-4}"
MAXTIME="${PERSISTWORLD_SLURM_MAXTIME:-240}"
DB_PORT="${PERSISTWORLD_SLURM_DB_PORT:-3307}"
CTLD_PORT="${PERSISTWORLD_SLURM_PORT:-6817}"
SLURMD_PORT=$((CTLD_PORT + 1))
DBD_PORT=$((CTLD_PORT + 2))
TIMEOUT="${PERSISTWORLD_SLURM_TIMEOUT:-90}"
DB_PASS=persistworld-local
PACKAGES=(slurm-wlm slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
NEEDED_CMDS=(slurmctld slurmd slurmdbd sinfo sbatch sacct sacctmgr scontrol munged
  mariadbd mariadb-install-db mariadb)

export SLURM_CONF="$DIR/etc/slurm.conf"
# Every daemon is started through `owned`: the marker in its environment (inherited by what it
# starts, e.g. slurmstepd) lets `stop` find anything left behind.
owned() { env PERSISTWORLD_SLURM_OWNER="$DIR" "$@"; }

log() { echo "local_cluster: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (apt-get, daemons run as SlurmUser=root)"; }

installed() {
  local c
  for c in "${NEEDED_CMDS[@]}"; do
    command -v "$c" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$c" >/dev/null 2>&1 \
      || return 1
  done
}

cmd_install() {
  export PATH="$PATH:/usr/sbin:/sbin"
  if installed; then log "packages already installed"; return 0; fi
  need_root
  local t0; t0=$(now)
  # Keep the packages' maintainer scripts from starting system-wide services.
  POLICY=/usr/sbin/policy-rc.d; MADE_POLICY=0
  if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$POLICY"; chmod 755 "$POLICY"; MADE_POLICY=1
    trap 'if [ "$MADE_POLICY" = 1 ]; then rm -f "$POLICY"; fi' EXIT
  fi
  local apt=(apt-get -o DPkg::Lock::Timeout=300 -q)
  log "apt-get update"
  "${apt[@]}" update -qq
  log "apt-get install ${PACKAGES[*]}"
  DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -qq --no-install-recommends \
    "${PACKAGES[@]}" >/dev/null
  if [ "$MADE_POLICY" = 1 ]; then rm -f "$POLICY"; MADE_POLICY=0; fi
  installed || die "packages installed but commands missing: ${NEEDED_CMDS[*]}"
  log "installed in $(since "$t0") s"
}

# ---------------------------------------------------------------- configuration files
write_configs() {
  mkdir -p "$DIR"/{etc,run,log,spool/slurmctld,spool/slurmd,munge,mysql}
  chmod 755 "$DIR/munge"
  local mem_mb
  mem_mb=$(awk '/MemTotal/ { printf "%d", $2 / 1024 * 0.8 }' /proc/meminfo)
  cat >"$DIR/etc/slurm.conf.new" <<EOF
# Written by slurm/local_cluster.sh: a one-node test cluster. Do not edit (rewritten on start).
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may restart after ~10 s instead of ~150 s.
AuthInfo=cred_expire=10,socket=$DIR/munge/munge.socket.2
StateSaveLocation=$DIR/spool/slurmctld
SlurmdSpoolDir=$DIR/spool/slurmd
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MailProg=/bin/true
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=10
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=$MAXTIME DefaultTime=10 State=UP
EOF
  mv "$DIR/etc/slurm.conf.new" "$DIR/etc/slurm.conf"
  (
    umask 077
    cat >"$DIR/etc/slurmdbd.conf" <<EOF
# Written by slurm/local_cluster.sh.
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket.2
DbdHost=$NODE
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  )
  chown root:root "$DIR/etc/slurmdbd.conf"; chmod 600 "$DIR/etc/slurmdbd.conf"
  # Let plain `sinfo` (no SLURM_CONF) find this cluster, without clobbering a real config.
  local sys=/etc/slurm/slurm.conf
  if [ ! -e "$sys" ] || { [ -L "$sys" ] && [[ "$(readlink "$sys")" == */etc/slurm.conf ]]; }; then
    mkdir -p /etc/slurm && ln -sfn "$DIR/etc/slurm.conf" "$sys"
  fi
}

# ---------------------------------------------------------------- process helpers
pid_of() { # pidfile -> pid if that process is alive
  local f="$1" p
  [ -s "$f" ] || return 1
  p=$(tr -dc '0-9' <"$f")
  # alive, and ours (not a recycled pid): it carries the marker from `owned`
  [ -n "$p" ] && kill -0 "$p" 2>/dev/null \
    && grep -qzxF "PERSISTWORLD_SLURM_OWNER=$DIR" "/proc/$p/environ" 2>/dev/null && echo "$p"
}

stop_daemons() { # TERM them together, wait up to 15 s, then KILL
  local d p pids=() end
  for d in "$@"; do
    p=$(pid_of "$(pidfile "$d")") || continue
    kill -TERM "$p" 2>/dev/null || true; pids+=("$p")
  done
  end=$(( $(date +%s) + 15 ))
  for p in "${pids[@]}"; do
    while kill -0 "$p" 2>/dev/null && [ "$(date +%s)" -lt "$end" ]; do sleep 0.05; done
    if kill -0 "$p" 2>/dev/null; then log "pid $p ignored SIGTERM: SIGKILL"; kill -KILL "$p" 2>/dev/null || true; fi
  done
}

wait_for() { # seconds description command...
  local secs="$1" what="$2"; shift 2
  local end=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$end" ]; then log "timed out after ${secs}s waiting for $what"; return 1; fi
    sleep 0.2
  done
}

fail_with_logs() {
  log "ERROR: $*"
  local f
  for f in "$DIR/munge/munged.log" "$DIR/log/mariadb.err" "$DIR/log/slurmdbd.log" \
           "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log"; do
    [ -s "$f" ] && { echo "----- tail $f" >&2; tail -n 25 "$f" >&2; }
  done
  exit 1
}

DAEMONS=(slurmd slurmctld slurmdbd mariadb munged)
pidfile() {
  case "$1" in
    munged) echo "$DIR/munge/munged.pid" ;;
    mariadb) echo "$DIR/run/mariadb.pid" ;;
    *) echo "$DIR/run/$1.pid" ;;
  esac
}

all_running() {
  local d
  for d in "${DAEMONS[@]}"; do pid_of "$(pidfile "$d")" >/dev/null || return 1; done
}

owned_pids() { # every process whose environment carries our marker (daemons, slurmstepd, jobs)
  local e p
  for e in /proc/[0-9]*/environ; do
    p=${e#/proc/}; p=${p%/environ}
    [ "$p" = $$ ] && continue
    if grep -qzxF "PERSISTWORLD_SLURM_OWNER=$DIR" "$e" 2>/dev/null; then echo "$p"; fi
  done
}

# ---------------------------------------------------------------- daemons
sql() { mariadb --no-defaults -S "$DIR/mysql/mysql.sock" -uroot "$@"; }

start_munge() {
  if [ ! -s "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 400 "$DIR/munge/munge.key"
  pid_of "$DIR/munge/munged.pid" >/dev/null && return 0
  rm -f "$DIR/munge/munge.socket.2" "$DIR/munge/munge.socket.2.lock"
  owned munged 9>&- --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket.2" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
    --seed-file="$DIR/munge/munged.seed" --num-threads=2 \
    || fail_with_logs "munged did not start"
  wait_for 10 munged test -S "$DIR/munge/munge.socket.2" || fail_with_logs "munged socket missing"
  link_munge_socket
}

# Slurm 22.05's connections to slurmdbd (sacct, sacctmgr, slurmctld) ignore AuthInfo=socket= and
# use munge's default socket: point it at ours unless a system munged owns it.
MUNGE_DEFAULT=/run/munge/munge.socket.2
link_munge_socket() {
  if [ -e "$MUNGE_DEFAULT" ] && [ ! -L "$MUNGE_DEFAULT" ]; then
    log "WARNING: a system munged owns $MUNGE_DEFAULT; sacct/slurmdbd may reject our credentials"
    return 0
  fi
  mkdir -p "$(dirname "$MUNGE_DEFAULT")"
  ln -sfn "$DIR/munge/munge.socket.2" "$MUNGE_DEFAULT"
}

start_mariadb() {
  local data="$DIR/mysql/data" fresh=0
  if [ ! -d "$data/mysql" ]; then
    rm -rf "$data"
    mariadb-install-db --no-defaults --datadir="$data" --user=root \
      --auth-root-authentication-method=normal --skip-test-db --skip-name-resolve \
      >"$DIR/log/mariadb-install.log" 2>&1 || { tail -n 30 "$DIR/log/mariadb-install.log" >&2;
        die "mariadb-install-db failed"; }
    fresh=1
  fi
  if ! pid_of "$DIR/run/mariadb.pid" >/dev/null; then
    rm -f "$DIR/mysql/mysql.sock"
    owned setsid nohup mariadbd 9>&- --no-defaults --user=root --datadir="$data" \
      --socket="$DIR/mysql/mysql.sock" --port="$DB_PORT" --bind-address=127.0.0.1 \
      --pid-file="$DIR/run/mariadb.pid" --log-error="$DIR/log/mariadb.err" \
      --skip-name-resolve --skip-log-bin --performance-schema=OFF \
      --innodb-buffer-pool-size=64M --innodb-log-file-size=32M \
      --innodb-flush-log-at-trx-commit=2 --max-connections=64 \
      </dev/null >/dev/null 2>&1 &
  fi
  wait_for 60 "mariadb" sql -e 'SELECT 1' || fail_with_logs "mariadb did not come up"
  if [ "$fresh" = 1 ] || ! sql -N -e "SELECT 1 FROM mysql.user WHERE user='slurm'" | grep -q 1; then
    sql <<EOF
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
  fi
}

start_slurmdbd() {
  pid_of "$DIR/run/slurmdbd.pid" >/dev/null || owned slurmdbd 9>&- || fail_with_logs "slurmdbd did not start"
  # First start creates the tables (a few seconds).
  wait_for "$TIMEOUT" slurmdbd sacctmgr -n list cluster || fail_with_logs "slurmdbd does not answer"
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || fail_with_logs "sacctmgr add cluster failed"
  fi
  if ! sacctmgr -n -P list account format=account | grep -qx default; then
    sacctmgr -i add account default Cluster="$CLUSTER" Description=local Organization=local \
      >/dev/null || true
  fi
  if ! sacctmgr -n -P list user format=user | grep -qx root; then
    sacctmgr -i add user root DefaultAccount=default >/dev/null || true
  fi
}

node_ready() { # node idle (or running jobs) and not down / drained
  local st
  st=$(sinfo -h -n "$NODE" -o '%t' 2>/dev/null) || return 1
  case "$st" in idle|mix|alloc|comp) return 0 ;; *) return 1 ;; esac
}

start_slurm() {
  pid_of "$DIR/run/slurmctld.pid" >/dev/null || owned slurmctld 9>&- || fail_with_logs "slurmctld did not start"
  wait_for 30 slurmctld scontrol ping || fail_with_logs "slurmctld does not answer"
  pid_of "$DIR/run/slurmd.pid" >/dev/null || owned slurmd 9>&- -N "$NODE" || fail_with_logs "slurmd did not start"
  local end=$(( $(date +%s) + TIMEOUT )) resumed=0 st
  until node_ready; do
    st=$(sinfo -h -n "$NODE" -o '%t' 2>/dev/null || true)
    # A node left down/drained by an unclean stop: bring it back once.
    if [ "$resumed" = 0 ] && [[ "$st" == down* || "$st" == drain* || "$st" == drng* ]]; then
      scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true; resumed=1
    fi
    [ "$(date +%s)" -lt "$end" ] || fail_with_logs "node $NODE not idle after ${TIMEOUT}s (state: ${st:-?})"
    sleep 0.2
  done
  wait_for 30 sacct sacct -n -X -S now-1hour -o JobID || fail_with_logs "sacct does not answer"
}

cmd_start() {
  local t0; t0=$(now)
  export PATH="$PATH:/usr/sbin:/sbin"
  installed || cmd_install
  need_root
  mkdir -p "$DIR"
  exec 9>"$DIR/.lock"; flock -w 300 9 || die "another start/stop holds $DIR/.lock"
  if all_running && node_ready; then
    log "already running ($DIR); SLURM_CONF=$SLURM_CONF"; return 0
  fi
  if [ -n "$(owned_pids)" ]; then log "partially running: stopping the rest first"; do_stop; fi
  write_configs
  start_munge;    log "munged up      (+$(since "$t0") s)"
  start_mariadb;  log "mariadb up     (+$(since "$t0") s)"
  start_slurmdbd; log "slurmdbd up    (+$(since "$t0") s)"
  start_slurm;    log "slurmctld, slurmd up, node idle, sacct answers (+$(since "$t0") s)"
  log "cluster '$CLUSTER' up in $(since "$t0") s: partition debug, $CPUS CPUs, MaxTime ${MAXTIME} min"
  log "clients: export SLURM_CONF=$SLURM_CONF"
}

do_stop() {
  local end
  # Cancel jobs first so no slurmstepd / job process outlives its slurmd.
  if pid_of "$DIR/run/slurmctld.pid" >/dev/null && [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
    squeue -h -o %A | sort -u | xargs -r scancel --quiet 2>/dev/null || true
    end=$(( $(date +%s) + 15 ))
    while [ -n "$(squeue -h -o %i 2>/dev/null)" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 0.3; done
  fi
  stop_daemons slurmd slurmctld
  stop_daemons slurmdbd munged
  stop_daemons mariadb
  # Anything else carrying our marker (a slurmstepd that outlived its job, a daemon whose pidfile is gone).
  local left; left=$(owned_pids | tr '\n' ' ')
  if [ -n "${left// }" ]; then
    kill -TERM $left 2>/dev/null || true; sleep 1
    left=$(owned_pids | tr '\n' ' ')
    [ -n "${left// }" ] && kill -KILL $left 2>/dev/null || true
  fi
  rm -f "$DIR"/run/*.pid "$DIR/munge/munged.pid"
  if [ -L "$MUNGE_DEFAULT" ] && [ "$(readlink "$MUNGE_DEFAULT")" = "$DIR/munge/munge.socket.2" ]; then
    rm -f "$MUNGE_DEFAULT"
  fi
}

cmd_stop() {
  [ -d "$DIR" ] || { log "nothing to stop ($DIR does not exist)"; return 0; }
  export PATH="$PATH:/usr/sbin:/sbin"
  exec 9>"$DIR/.lock"; flock -w 300 9 || die "another start/stop holds $DIR/.lock"
  do_stop
  local left; left=$(owned_pids | tr '\n' ' ')
  [ -z "${left// }" ] || die "processes left behind: $left"
  log "stopped ($DIR kept; rm -rf it for a clean slate)"
}

cmd_status() {
  export PATH="$PATH:/usr/sbin:/sbin"
  local d p rc=0
  for d in munged mariadb slurmdbd slurmctld slurmd; do
    if p=$(pid_of "$(pidfile "$d")"); then echo "$d: running (pid $p)"; else echo "$d: not running"; rc=3; fi
  done
  echo "SLURM_CONF=$SLURM_CONF"
  sinfo 2>&1 || rc=3
  return $rc
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: $0 {install|start|stop|status|env}" >&2; exit 2 ;;
esac
