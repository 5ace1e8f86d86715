#!/usr/bin/env bash
# CI: a two-node SLURM cluster on this machine (two slurmd), then the SLURM tests (tests/test_slurm.py) on it.
#
#   bash .ci/slurm.sh [PYTEST_ARGS...]   # install if needed, start, test, stop (e.g. -k preempt)
#   bash .ci/slurm.sh --up               # start and leave running; prints the SLURM_CONF to export
#   bash .ci/slurm.sh --down             # stop what --up started
#
# Needs root and Debian's apt (slurm-wlm, munge; installed only when missing) and the package
# installed with `python3 -m pip install -e ".[dev]"`. Everything it writes (slurm.conf, munge
# key and socket, state, spool, daemon logs) is under $XMDIST_SLURM_DIR (/tmp/xmdist-slurm), so
# /etc/slurm and any munged of the machine are left alone; it runs its own munged on its own
# socket. Running it again stops the daemons it started before (by their pid files) and starts
# afresh. Two nodes, each a slurmd of its own on this machine (own port, spool and log) with
# this machine's CPUs and memory: partition `ci` (the default) holds the first, `ci-2nodes`
# both, for the two-node tests. When the host name does not resolve, or with
# XMDIST_SLURM_NODES=1, the cluster is one node, `localhost`, and the two-node tests skip.
# Jobs run without cgroups (proctrack/linuxproc, task/none), so it also works inside a container.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${XMDIST_SLURM_DIR:-/tmp/xmdist-slurm}
export SLURM_CONF=$DIR/slurm.conf

say() { echo "slurm.sh: $*"; }
die() { echo "slurm.sh: error: $*" >&2; exit 1; }
show_logs() {
    for f in "$DIR"/log/*.log; do
        [ -s "$f" ] && { echo "----- $f (last 20 lines)" >&2; tail -n 20 "$f" >&2; }
    done
    return 0
}

install() {
    local missing=0 cmd
    for cmd in munged slurmctld slurmd sbatch srun scontrol sinfo; do
        command -v "$cmd" >/dev/null || missing=1
    done
    [ "$missing" = 0 ] && return 0
    command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and there is no apt-get to install them"
    say "installing slurm-wlm and munge (apt-get)"
    mkdir -p "$DIR"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge; } \
        >"$DIR/apt.log" 2>&1; then
        tail -n 30 "$DIR/apt.log" >&2
        die "apt-get could not install slurm-wlm and munge (full log: $DIR/apt.log)"
    fi
}

# Stop the daemons this script started (only those: by the pids they wrote, checking the name),
# after cancelling the jobs left on this private cluster.
stop() {
    local name pid _
    if [ -f "$SLURM_CONF" ] && [ -f "$DIR/run/slurmctld.pid" ]; then
        timeout 20 scancel --partition=ci >/dev/null 2>&1 || true
        timeout 20 scancel --partition=ci-2nodes >/dev/null 2>&1 || true
        for _ in $(seq 30); do  # until slurmd has ended their processes
            [ -z "$(timeout 10 squeue -h -o %i 2>/dev/null)" ] && break
            sleep 1
        done
    fi
    local file
    # slurmd-NODE.pid: one slurmd per node; slurmd.pid: written by the one-node version of this script
    for file in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmd.pid" "$DIR/run/slurmctld.pid" "$DIR/run/munged.pid"; do
        [ -f "$file" ] || continue
        name=$(basename "$file" .pid)
        name=${name%%-*}
        pid=$(cat "$file")
        if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
        fi
        rm -f "$file"
    done
}

# The node names. One node: `localhost`. Two: this machine's short host name, which must resolve
# (the templates use the first node's name as the rendezvous host; a 2-node job's node list
# starts with it), and NAME-2, a name only. SLURM cannot give `localhost` a second node: its
# node table maps any name to a lone `localhost` node, so the second would be a duplicate.
node_names() {
    local host
    host=$(uname -n | cut -d. -f1)
    if [ "${XMDIST_SLURM_NODES:-2}" = 2 ] && [ "$host" != localhost ] && getent hosts "$host" >/dev/null; then
        echo "$host $host-2"
    else
        echo localhost
    fi
}

configure() {
    local cpus mem name port=6818 names
    names=$(node_names)
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run" "$DIR/munge"
    mkdir -p "$DIR/state" "$DIR/log" "$DIR/run" "$DIR/munge"
    for name in $names; do mkdir -p "$DIR/spool/$name"; done
    chmod 0700 "$DIR/munge"
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 0400 "$DIR/munge/munge.key"
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc follows OMP_NUM_THREADS otherwise
    mem=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    cat >"$SLURM_CONF" <<CONF
# Written by .ci/slurm.sh: one slurmd per node ($names), all of them this machine at
# 127.0.0.1 with ports of their own; no accounting, no cgroups.
ClusterName=xmdist-ci
SlurmctldHost=$(uname -n | cut -d. -f1)(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: a requeued job waits cred_expire + 1 s before it may start again (default 120 s)
AuthInfo=socket=$DIR/run/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
# %n: the node name, one spool, pid file and log per slurmd
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
MailProg=/bin/true
JobRequeue=1
ReturnToService=2
KillWait=10
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
CONF
    for name in $names; do
        echo "NodeName=$name NodeHostname=localhost NodeAddr=127.0.0.1 Port=$port CPUs=$cpus RealMemory=$mem State=UNKNOWN"
        port=$((port + 1))
    done >>"$SLURM_CONF"
    set -- $names
    # ci: the first node (the single-node tests); ci-2nodes: both, when there are two
    echo "PartitionName=ci Nodes=$1 Default=YES MaxTime=INFINITE State=UP" >>"$SLURM_CONF"
    [ $# = 2 ] && echo "PartitionName=ci-2nodes Nodes=$1,$2 MaxTime=INFINITE State=UP" >>"$SLURM_CONF"
    return 0
}

start() {
    local name names _ state="" want=""
    names=$(awk -F'[= ]' '/^NodeName=/ {print $2}' "$SLURM_CONF" | tr '\n' ' ' | sed 's/ $//')
    munged --socket="$DIR/run/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed" --force \
        || { show_logs; die "munged did not start"; }
    slurmctld -f "$SLURM_CONF" || { show_logs; die "slurmctld did not start"; }
    for name in $names; do
        slurmd -f "$SLURM_CONF" -N "$name" || { show_logs; die "slurmd for node $name did not start"; }
    done
    want=$(for name in $names; do echo "$name idle"; done | LC_ALL=C sort -u | tr '\n' ' ' | sed 's/ $//')
    for _ in $(seq 60); do  # each node once, whatever the partitions it is in
        state=$(sinfo -h -N -o '%N %t' 2>/dev/null | LC_ALL=C sort -u | tr '\n' ' ' | sed 's/ $//' || true)
        [ "$state" = "$want" ] && { say "node(s) $names idle ($(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) CPUs each); SLURM_CONF=$SLURM_CONF"; return 0; }
        sleep 1
    done
    show_logs
    die "the node(s) are not idle after 60 s (sinfo says '${state:-nothing}', expected '$want')"
}

[ "$(id -u)" = 0 ] || die "run as root: it installs packages and starts munged, slurmctld and slurmd as root"
case "${1:-}" in
    --down) stop; exit 0 ;;
    --up) install; stop; trap 'stop' EXIT; configure; start; trap - EXIT; echo "export SLURM_CONF=$SLURM_CONF"; exit 0 ;;
esac

t0=$(date +%s)
install
stop
trap 'stop' EXIT
configure
start
status=0
python3 -m pytest -q -m slurm tests/test_slurm.py -p no:cacheprovider "$@" || status=$?
say "done in $(( $(date +%s) - t0 )) s (install, cluster start, tests)"
[ "$status" = 0 ] || { show_logs; die "SLURM tests failed (pytest exit $status)"; }
