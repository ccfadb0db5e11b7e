#!/usr/bin/env bash
# A real single-node SLURM (munge, slurmctld, slurmd) in a directory, for the launcher tests.
#
#   local_slurm.sh start DIR   install Debian's packages if missing (needs root), write
#                              DIR/slurm.conf, start the daemons, wait until the node is idle,
#                              and print the environment clients need (SLURM_CONF, PATH).
#   local_slurm.sh stop DIR    stop the daemons this script started, by the pids in DIR.
#
# Exit status 3: SLURM cannot be installed or started here (the tests then skip, saying why).
set -euo pipefail

action=${1:?usage: local_slurm.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: local_slurm.sh start|stop DIR}")

unavailable() { echo "local_slurm: $*" >&2; exit 3; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null && return 0
    [ "$(id -u)" = 0 ] || unavailable "SLURM is not installed and installing it needs root"
    command -v apt-get >/dev/null || unavailable "SLURM is not installed and there is no apt-get"
    # Keep the packages from starting services: this script starts its own daemons.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created_policy=1; fi
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            slurmctld slurmd slurm-client munge; } > "$dir/apt.log" 2>&1; then
        [ "$created_policy" = 1 ] && rm -f "$policy"
        unavailable "apt-get install slurmctld slurmd slurm-client munge failed (see $dir/apt.log)"
    fi
    [ "$created_policy" = 1 ] && rm -f "$policy"
    return 0
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_for() {  # wait_for SECONDS COMMAND...: poll until COMMAND succeeds
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.5
    done
}

start() {
    mkdir -p "$dir"
    install_packages
    [ "$(id -u)" = 0 ] || unavailable "starting slurmd needs root"
    [ -e "$dir/slurmctld.pid" ] && unavailable "$dir already holds a started SLURM; stop it first"
    mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/bin" "$dir/munge"
    chown munge: "$dir/munge" && chmod 711 "$dir/munge"  # the socket must be reachable
    runuser -u munge -- mungekey --create --keyfile="$dir/munge/munge.key" --force
    runuser -u munge -- munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/seed"
    wait_for 10 test -S "$dir/munge/munge.socket" || unavailable "munged did not start ($dir/munge/munged.log)"

    local host node name
    host=$(hostname -s)
    node=$(slurmd -C | head -1)  # NodeName=... CPUs=... as this machine has them
    name=$(echo "$node" | sed 's/^NodeName=\([^ ]*\).*/\1/')
    cat > "$dir/slurm.conf" <<CONF
ClusterName=ffntest
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
JobRequeue=1
MinJobAge=3600
ReturnToService=2
SchedulerParameters=bf_interval=5,sched_interval=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$name Default=YES MaxTime=INFINITE State=UP
CONF

    # Without accounting storage sacct fails and submitit sees every job as UNKNOWN:
    # answer submitit's query from squeue instead.
    cat > "$dir/bin/sacct" <<'SACCT'
#!/usr/bin/env bash
ids=""
while [ $# -gt 0 ]; do case "$1" in -j) ids=$2; shift 2;; *) shift;; esac; done
echo "JobID|State|NodeList"
squeue -h -t all -o '%i|%T|%N' ${ids:+-j "$ids"} 2>/dev/null || true
SACCT
    chmod +x "$dir/bin/sacct"

    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -i -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"
    wait_for 30 bash -c "sinfo -h -o %T | grep -q idle" \
        || unavailable "the node did not become idle (logs in $dir/log)"
    echo "SLURM_CONF=$SLURM_CONF"
    echo "PATH=$dir/bin:$PATH"
}

stop() {
    local name pid proc
    if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        # End this cluster's jobs first, so no job step outlives its slurmd.
        export SLURM_CONF="$dir/slurm.conf"
        squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
        wait_for 30 bash -c '[ -z "$(squeue -h -t running,completing -o %i 2>/dev/null)" ]' || true
    fi
    for name in slurmd.pid slurmctld.pid munge/munged.pid; do
        [ -f "$dir/$name" ] || continue
        pid=$(cat "$dir/$name")
        if kill "$pid" 2>/dev/null; then
            for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$dir/$name"
    done
    # A step daemon still running holds a socket in this cluster's spool directory: it is ours.
    for proc in /proc/[0-9]*; do
        [ "$(head -c 10 "$proc/cmdline" 2>/dev/null | tr -d '\0')" = slurmstepd ] || continue
        if ls -l "$proc/fd" 2>/dev/null | grep -q -- "$dir/spool"; then kill -9 "${proc#/proc/}" 2>/dev/null || true; fi
    done
}

case "$action" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: local_slurm.sh start|stop DIR" >&2; exit 2 ;;
esac
