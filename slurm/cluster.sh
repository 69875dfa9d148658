#!/usr/bin/env bash
# A real SLURM cluster in a private folder, for tests and for trying prefvec-ds on one machine:
# one node (localhost), or N nodes, each a network namespace with its own address and hostname
# (slurm/nodes.sh).
#
#   slurm/cluster.sh up        # install packages if missing, write configs, start daemons
#   slurm/cluster.sh up --nodes 2   # node1, node2 in namespaces on a private bridge; give
#                                   # --nodes 2 to down/status/env too (its own default folder)
#   slurm/cluster.sh status    # which daemons run, node state; exit 3 when not all up
#   slurm/cluster.sh env       # prints `export SLURM_CONF=...`; use: eval "$(slurm/cluster.sh env)"
#   slurm/cluster.sh down      # cancel our jobs, stop only the daemons we started (pid files)
#   slurm/cluster.sh down --purge   # ... and delete the folder
#
# Environment (all optional):
#   PREFVEC_SLURM_HOME        folder for configs, state, logs, pid files, munge key and socket
#                             (default $HOME/.cache/prefvec-ds/slurm, slurm-<N>nodes for N > 1)
#   PREFVEC_SLURM_PORT_BASE   first of 4 TCP ports: slurmctld, slurmd, slurmdbd, mariadb, and
#                             for N > 1 srun's range, +10..+39
#                             (default 16817, 18810 for N > 1; the stock ports are 6817-6819 and 3306, and
#                             20000-32767 is where jobs put MASTER_PORT, see distributed/env.py)
#   PREFVEC_SLURM_FIRST_JOB_ID first job id (default 1): private clusters on one machine with
#                             different ids never derive the same MASTER_PORT
#   PREFVEC_SLURM_CPUS        CPUs the node advertises (default 8: four array tasks at once)
#   PREFVEC_SLURM_ACCOUNTING  1 (default): slurmdbd + mariadb so that sacct works; 0: without
#   PREFVEC_SLURM_NO_INSTALL  1: never call apt-get; fail when a binary is missing
#   PREFVEC_SLURM_SUBNET      nodes' /24 when --nodes > 1 (default 10.213.0: bridge .1, node i .1i)
#   PREFVEC_SLURM_NET_PREFIX  prefix of the bridge, veth and namespace names (default pvmn)
#
# Use another PREFVEC_SLURM_HOME and port base for a multi-node cluster beside a one-node one.
# The ports, node count, subnet and the accounting choice are fixed when the folder is first created (they are
# read back from it afterwards), so `up` twice, or `up` from another shell, is a no-op.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=slurm/nodes.sh
source "$HERE/nodes.sh"
NODE=localhost

# `--nodes N` (any command): N > 1 picks the multi-node defaults (folder slurm-<N>nodes, ports
# from 18810), so a multi-node cluster runs beside the default one-node cluster.
set_home() {  # requested nodes or ""
    local dflt="$HOME/.cache/prefvec-ds/slurm"
    if [[ -n "$1" && "$1" != 1 ]]; then dflt="$HOME/.cache/prefvec-ds/slurm-${1}nodes"; fi
    H="${PREFVEC_SLURM_HOME:-$dflt}"
    ETC="$H/etc" RUN="$H/run" LOG="$H/log"
    CONF="$ETC/slurm.conf"
    SETTINGS="$ETC/cluster.env"   # ports/accounting chosen at creation, sourced on every call
}

log() { echo "cluster.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

load_settings() {
    if [[ -f "$SETTINGS" ]]; then
        # shellcheck disable=SC1090
        source "$SETTINGS"
    else
        PORT_BASE="${PREFVEC_SLURM_PORT_BASE:-$([[ "${REQUESTED_NODES:-1}" == 1 ]] && echo 16817 || echo 18810)}"
        ACCOUNTING="${PREFVEC_SLURM_ACCOUNTING:-1}"
        CPUS="${PREFVEC_SLURM_CPUS:-8}"
        FIRST_JOB_ID="${PREFVEC_SLURM_FIRST_JOB_ID:-1}"
        NODES="${REQUESTED_NODES:-1}"
        SUBNET="${PREFVEC_SLURM_SUBNET:-10.213.0}"
        NET_PREFIX="${PREFVEC_SLURM_NET_PREFIX:-pvmn}"
    fi
    FIRST_JOB_ID="${FIRST_JOB_ID:-1}"  # folders made before the setting existed
    NODES="${NODES:-1}" SUBNET="${SUBNET:-10.213.0}" NET_PREFIX="${NET_PREFIX:-pvmn}"
    if [[ -n "${REQUESTED_NODES:-}" && "$REQUESTED_NODES" != "$NODES" ]]; then
        die "$H was created with --nodes $NODES, not $REQUESTED_NODES: use another PREFVEC_SLURM_HOME"
    fi
    CTLD_PORT=$PORT_BASE SLURMD_PORT=$((PORT_BASE + 1))
    DBD_PORT=$((PORT_BASE + 2)) DB_PORT=$((PORT_BASE + 3))
}

# pid of a daemon from its pid file, printed only when that process is alive and is the
# program we expect (a stale pid file may point at a recycled pid: never signal that one).
live_pid() {  # name pidfile
    local pid
    [[ -s "$2" ]] || return 1
    pid="$(tr -dc 0-9 <"$2")"
    [[ -n "$pid" && -r "/proc/$pid/comm" ]] || return 1
    [[ "$(cat "/proc/$pid/comm")" == "$1"* ]] || return 1
    echo "$pid"
}

wait_for() {  # seconds description command...
    local deadline=$((SECONDS + $1)) what="$2"
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

ensure_packages() {
    local need=(sbatch slurmctld slurmd munged mungekey)
    [[ "$ACCOUNTING" == 1 ]] && need+=(slurmdbd mariadbd mariadb-install-db)
    ((NODES > 1)) && need+=(ip nsenter unshare)
    local bin
    for bin in "${need[@]}"; do
        command -v "$bin" >/dev/null 2>&1 && continue
        [[ "${PREFVEC_SLURM_NO_INSTALL:-0}" == 1 ]] && die "$bin not found and PREFVEC_SLURM_NO_INSTALL=1"
        PREFVEC_SLURM_ACCOUNTING="$ACCOUNTING" "$HERE/install_deps.sh"
        return
    done
}

write_settings() {
    [[ -f "$SETTINGS" ]] && return
    printf 'PORT_BASE=%s\nACCOUNTING=%s\nCPUS=%s\nFIRST_JOB_ID=%s\nNODES=%s\nSUBNET=%s\nNET_PREFIX=%s\n' \
        "$PORT_BASE" "$ACCOUNTING" "$CPUS" "$FIRST_JOB_ID" "$NODES" "$SUBNET" "$NET_PREFIX" >"$SETTINGS"
}

write_slurm_conf() {
    local mem_mb
    # Leave 10% of RAM to the OS; the number only has to be <= what slurmd detects.
    mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    local acct="AccountingStorageType=accounting_storage/none"
    if [[ "$ACCOUNTING" == 1 ]]; then
        acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$NODE
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$RUN/munge.sock"
    fi
    local CRED_EXPIRE="${PREFVEC_SLURM_CRED_EXPIRE:-10}"
    # One node: the controller and slurmd on 127.0.0.1. Several: the controller on the bridge
    # address (its name must be this host's name), each slurmd in its namespace.
    local ctld="$NODE(127.0.0.1)" nodes_conf
    nodes_conf="SlurmdPidFile=$RUN/slurmd.pid
SlurmdLogFile=$LOG/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP"
    if ((NODES > 1)); then
        ctld="$(hostname -s)($(bridge_addr))"
        nodes_conf="$(node_conf_lines "$CPUS" "$mem_mb")"
    fi
    cat >"$CONF.tmp" <<EOF
# Written by slurm/cluster.sh; regenerated on every \`up\`.
ClusterName=prefvec
FirstJobId=$FIRST_JOB_ID
SlurmctldHost=$ctld
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$RUN/munge.sock,cred_expire=$CRED_EXPIRE
StateSaveLocation=$H/state
SlurmdSpoolDir=$H/spool/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmctldLogFile=$LOG/slurmctld.log
TmpFS=$H/tmp
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# linuxproc + task/none need no cgroup set-up, so the cluster also runs inside containers.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
# Advertise more CPUs than the machine has (config_overrides stops slurmd from marking the
# node INVALID "Low CPUs"), so that the four DPO directions of an array run at once.
SlurmdParameters=config_overrides
# afterok on a failed job would otherwise stay PENDING (DependencyNeverSatisfied) forever.
DependencyParameters=kill_invalid_depend
JobRequeue=1
# Seconds between SIGTERM and SIGKILL on cancel/time limit: room for a checkpoint, still short.
KillWait=10
# Finished jobs stay visible to squeue/scontrol this long; after that, sacct answers.
MinJobAge=300
SchedulerType=sched/backfill
# Look at pending jobs every 2 s instead of 60/30 s (a requeued job becomes eligible
# cred_expire seconds later and would otherwise wait for the next periodic pass).
SchedulerParameters=sched_interval=2,bf_interval=2
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
$acct
$nodes_conf
EOF
    if cmp -s "$CONF.tmp" "$CONF"; then
        rm -f "$CONF.tmp"
    else
        mv "$CONF.tmp" "$CONF"
        CONF_CHANGED=1
    fi
}

write_slurmdbd_conf() {
    local pass
    pass="$(cat "$ETC/db.pass")"
    # slurmdbd refuses a config readable by others (it holds the database password).
    (umask 077; cat >"$ETC/slurmdbd.conf" <<EOF
# Written by slurm/cluster.sh; regenerated on every \`up\`.
AuthType=auth/munge
AuthInfo=socket=$RUN/munge.sock
DbdHost=$NODE
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$pass
StorageLoc=slurm_acct_db
EOF
    )
}

start_munge() {
    live_pid munged "$RUN/munged.pid" >/dev/null && return
    [[ -f "$ETC/munge.key" ]] || mungekey --create --keyfile="$ETC/munge.key"
    chmod 600 "$ETC/munge.key"
    # --force: start even though a stale socket/lock from a killed munged may be left over.
    munged --force --socket="$RUN/munge.sock" --key-file="$ETC/munge.key" \
        --pid-file="$RUN/munged.pid" --log-file="$LOG/munged.log" --seed-file="$H/state/munge.seed" 9>&-
    wait_for 10 munge test -S "$RUN/munge.sock" || die "munged did not start, see $LOG/munged.log"
}

db_client() { mariadb --no-defaults --socket="$RUN/mysql.sock" -uroot "$@"; }

start_mariadb() {
    live_pid mariadbd "$RUN/mariadb.pid" >/dev/null && return
    local fresh=0
    if [[ ! -d "$H/mysql/mysql" ]]; then
        mariadb-install-db --no-defaults --user=root --datadir="$H/mysql" \
            --auth-root-authentication-method=socket --skip-test-db >"$LOG/mariadb-install.log" 2>&1 \
            || die "mariadb-install-db failed, see $LOG/mariadb-install.log"
        fresh=1
    fi
    # setsid+nohup: the server must outlive this shell; it has no daemonize option of its own.
    setsid nohup mariadbd --no-defaults --user=root --datadir="$H/mysql" --socket="$RUN/mysql.sock" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$RUN/mariadb.pid" \
        --log-error="$LOG/mariadb.log" --innodb-buffer-pool-size=32M </dev/null >/dev/null 2>&1 9>&- &
    wait_for 60 mariadb db_client -e 'select 1' || die "mariadbd did not start, see $LOG/mariadb.log"
    if [[ "$fresh" == 1 || ! -f "$ETC/db.pass" ]]; then
        (umask 077; head -c 18 /dev/urandom | base64 | tr -dc A-Za-z0-9 >"$ETC/db.pass")
        db_client <<EOF
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$(cat "$ETC/db.pass")';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$(cat "$ETC/db.pass")';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
    fi
}

start_slurmdbd() {
    live_pid slurmdbd "$RUN/slurmdbd.pid" >/dev/null && return
    write_slurmdbd_conf
    slurmdbd 9>&- || die "slurmdbd failed, see $LOG/slurmdbd.log"
    wait_for 30 slurmdbd sacctmgr -n show cluster || die "slurmdbd does not answer, see $LOG/slurmdbd.log"
}

start_slurm() {
    if ! live_pid slurmctld "$RUN/slurmctld.pid" >/dev/null; then
        slurmctld 9>&- || die "slurmctld failed, see $LOG/slurmctld.log"
    fi
    local i name
    if ((NODES > 1)); then
        for ((i = 1; i <= NODES; i++)); do
            name="$(node_name "$i")"
            live_pid slurmd "$RUN/slurmd.$name.pid" >/dev/null || start_node_slurmd "$i"
        done
    elif ! live_pid slurmd "$RUN/slurmd.pid" >/dev/null; then
        # -N: the node is called "localhost" in slurm.conf whatever the host name is.
        slurmd -N "$NODE" 9>&- || die "slurmd failed, see $LOG/slurmd.log"
    fi
    wait_for 30 node node_ready || {
        scontrol update nodename="$(all_nodes)" state=resume >/dev/null 2>&1 || true
        wait_for 15 node node_ready || die "nodes not ready: $(node_state | tr '\n' ' '); see $LOG/slurmd*.log"
    }
}

# One `up`/`down` at a time per folder (two shells, or pytest workers, may race). Daemons are
# started with `9>&-`: one that inherited the lock's fd would hold the lock for its lifetime.
take_lock() {
    exec 9>"$H/.lock"
    flock -w 120 9 || die "another cluster.sh holds $H/.lock"
}


cmd_up() {
    # slurmd starts every job as its user and slurmctld/slurmdbd are configured as root.
    [[ "$(id -u)" == 0 ]] || die "up needs root (try: sudo -E $0 up)"
    ensure_packages
    mkdir -p "$ETC" "$RUN" "$LOG" "$H/state" "$H/spool" "$H/tmp"
    take_lock
    write_settings
    if ((NODES > 1)); then
        net_up
        # slurmd does not create its spool folder's parent for %n ("Domain socket directory").
        node_names | while read -r name; do mkdir -p "$H/spool/slurmd-$name"; done
    fi
    CONF_CHANGED=0
    write_slurm_conf
    if [[ "$CONF_CHANGED" == 1 ]] && live_pid slurmctld "$RUN/slurmctld.pid" >/dev/null; then
        # Running daemons read slurm.conf only at start or on reconfigure.
        scontrol reconfigure || log "warning: scontrol reconfigure failed; try down + up"
    fi
    start_munge
    if [[ "$ACCOUNTING" == 1 ]]; then
        start_mariadb
        start_slurmdbd
    fi
    start_slurm
    log "up: SLURM_CONF=$CONF ($(node_summary))"
}

# TERM a group of daemons at once (each takes 1-3 s to exit), wait, KILL what is left.
stop_daemons() {  # name:pidfile...
    local pair pids=() pid
    for pair in "$@"; do
        if pid="$(live_pid "${pair%%:*}" "${pair#*:}")"; then
            kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
        fi
        rm -f "${pair#*:}"
    done
    local deadline=$((SECONDS + 20))
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    done
}

cmd_down() {
    [[ -f "$CONF" ]] || { log "down: nothing at $H"; return 0; }
    take_lock
    if live_pid slurmctld "$RUN/slurmctld.pid" >/dev/null; then
        # Cancel what is still queued or running in *this* cluster (SLURM_CONF is ours), so that
        # no slurmstepd or payload outlives its slurmd.
        local jobs
        jobs="$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')"
        if [[ -n "${jobs// }" ]]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            wait_for 15 jobs bash -c '[[ -z "$(squeue -h -o %A)" ]]' || log "down: jobs still listed"
        fi
    fi
    # SLURM first (slurmctld flushes accounting to slurmdbd on the way out), then what it used.
    local slurmds=("slurmd:$RUN/slurmd.pid") name
    if ((NODES > 1)); then
        slurmds=()
        for name in $(node_names); do slurmds+=("slurmd:$RUN/slurmd.$name.pid"); done
    fi
    stop_daemons "${slurmds[@]}" "slurmctld:$RUN/slurmctld.pid"
    stop_daemons "slurmdbd:$RUN/slurmdbd.pid" "mariadbd:$RUN/mariadb.pid" "munged:$RUN/munged.pid"
    # Only after the daemons: a slurmd whose namespace is gone could not even say goodbye.
    if ((NODES > 1)); then net_down; fi
    if [[ "${1:-}" == --purge ]]; then
        rm -rf "$H"
        log "down: stopped and removed $H"
    else
        log "down: stopped (state kept in $H)"
    fi
}

cmd_status() {
    local all=0 name pidfile pid pairs=(munged:munged slurmctld:slurmctld slurmd:slurmd)
    if ((NODES > 1)); then
        pairs=(munged:munged slurmctld:slurmctld)
        for name in $(node_names); do pairs+=("slurmd:slurmd.$name"); done
    fi
    for pair in "${pairs[@]}" slurmdbd:slurmdbd mariadbd:mariadb; do
        name="${pair%%:*}" pidfile="$RUN/${pair#*:}.pid"
        if [[ "$name" =~ ^(slurmdbd|mariadbd)$ && "$ACCOUNTING" != 1 ]]; then continue; fi
        if pid="$(live_pid "$name" "$pidfile")"; then
            echo "${pair#*:}: running (pid $pid)"
        else
            echo "${pair#*:}: stopped"
            all=3
        fi
    done
    [[ -f "$CONF" ]] && node_state | sed 's/^\([^ ]*\) /node \1: /'
    echo "SLURM_CONF=$CONF"
    return $all
}

main() {
    local args=() purge=""
    while (($#)); do
        case "$1" in
            --nodes)
                [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || die "--nodes ${2:-}: expected a node count >= 1"
                REQUESTED_NODES="$2"
                shift 2 ;;
            --purge) purge=--purge; shift ;;
            *) args+=("$1"); shift ;;
        esac
    done
    set_home "${REQUESTED_NODES:-}"
    load_settings
    export SLURM_CONF="$CONF"
    case "${args[0]:-}" in
        up) cmd_up ;;
        down) cmd_down "$purge" ;;
        status) cmd_status ;;
        env) echo "export SLURM_CONF=$CONF" ;;
        *) echo "usage: $0 up|down [--purge]|status|env [--nodes N]" >&2; exit 2 ;;
    esac
}

main "$@"
