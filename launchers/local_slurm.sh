#!/usr/bin/env bash
# A real SLURM (munge, slurmctld, slurmd) in a directory, for the launcher tests.
#
#   local_slurm.sh start DIR             install Debian's packages if missing (needs root), write
#                                        DIR/slurm.conf, start the daemons, wait until the node is
#                                        idle, and print the environment clients need (SLURM_CONF,
#                                        PATH).
#   local_slurm.sh start DIR --nodes N   the same with N hosts of its own: each a network and a UTS
#                                        namespace (hostname ffn-hI, address 198.18.T.(10+I) on a
#                                        bridge with no uplink and no default route, a hosts file in
#                                        /etc/netns/NS/hosts naming every host) running its own
#                                        `slurmd -N ffn-hI`; munged and slurmctld stay on this
#                                        machine, on the bridge's address. DIR is the hosts' one
#                                        file system, as NFS is on a cluster. Also printed:
#                                        FFN_CLUSTER_HOSTS (namespace:hostname:address ...).
#   local_slurm.sh exec DIR I CMD...     run CMD on host I of DIR's cluster (what the tests use).
#   local_slurm.sh kill-host DIR I       host I dies: every process on it is killed at once.
#   local_slurm.sh start-host DIR I      start host I's slurmd again (SLURM returns it to service).
#   local_slurm.sh block-port DIR I PORT host I drops TCP to PORT (an nft rule inside its namespace).
#   local_slurm.sh links DIR             the hosts' links on the bridge, host 0 first (for ip, tc).
#   local_slurm.sh stop DIR              stop the daemons this script started, by the pids in DIR,
#                                        then remove every namespace, link and hosts file of DIR's
#                                        cluster by name (also after a crash).
#
# Exit status 3: SLURM, or the namespaces, cannot be had here (the tests then skip, saying why).
set -euo pipefail

usage="usage: local_slurm.sh start|stop DIR [--nodes N]"
action=${1:?$usage}
dir=$(realpath -m "${2:?$usage}")
nodes=0  # 0: the one-node cluster on this machine's own network
if [ "${3:-}" = --nodes ]; then nodes=${4:?$usage}; fi
case "$nodes" in ''|*[!0-9]*) echo "$usage" >&2; exit 2 ;; esac
# Every name the cluster makes derives from DIR, so `stop DIR` finds them even without its files.
tag=$(printf %s "$dir" | sha256sum | head -c 6)
subnet=198.18.$((16#${tag:0:2})) # RFC 2544's test range: a /24 of it per cluster
bridge=ffnb$tag

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

install_network_tools() {
    command -v ip >/dev/null && command -v nft >/dev/null && command -v tc >/dev/null && return 0
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || unavailable "iproute2 and nftables are missing"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 nftables; } \
        > "$dir/apt-net.log" 2>&1 || unavailable "apt-get install iproute2 nftables failed (see $dir/apt-net.log)"
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

    local host node name ctl_addr=127.0.0.1 nodes_conf partition_nodes
    host=$(hostname -s)
    node=$(slurmd -C | head -1)  # NodeName=... CPUs=... as this machine has them
    name=$(echo "$node" | sed 's/^NodeName=\([^ ]*\).*/\1/')
    nodes_conf="$node NodeAddr=127.0.0.1 State=UNKNOWN"
    partition_nodes=$name
    if [ "$nodes" -gt 0 ]; then
        make_hosts "$host"
        ctl_addr=$subnet.1
        nodes_conf=$(for i in $(seq 0 $((nodes - 1))); do
            echo "${node/NodeName=$name/NodeName=ffn-h$i} NodeAddr=$subnet.$((10 + i)) State=UNKNOWN"
        done)
        partition_nodes=ffn-h[0-$((nodes - 1))]
    fi
    cat > "$dir/slurm.conf" <<CONF
ClusterName=ffntest
SlurmctldHost=${host}(${ctl_addr})
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
SlurmdTimeout=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.%n.log
$nodes_conf
PartitionName=debug Nodes=$partition_nodes Default=YES MaxTime=INFINITE State=UP
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
    if [ "$nodes" -gt 0 ]; then
        for i in $(seq 0 $((nodes - 1))); do
            start_host "$i"
        done
        wait_for 60 bash -c "[ \"\$(sinfo -h -N -t idle -o %N | sort -u | wc -l)\" = $nodes ]" \
            || unavailable "the $nodes hosts did not become idle (logs in $dir/log)"
        echo "FFN_CLUSTER_HOSTS=$(for i in $(seq 0 $((nodes - 1))); do printf 'ffn%s-h%d:ffn-h%d:%s.%d ' "$tag" "$i" "$i" "$subnet" $((10 + i)); done)"
    else
        slurmd -f "$SLURM_CONF"
        wait_for 30 bash -c "sinfo -h -o %T | grep -q idle" \
            || unavailable "the node did not become idle (logs in $dir/log)"
    fi
    echo "SLURM_CONF=$SLURM_CONF"
    echo "PATH=$dir/bin:$PATH"
}

on_host() {  # on_host I CMD...: run CMD on host I (its network, hostname and hosts file)
    local i=$1; shift
    # Not `ip netns exec`: it mounts a sysfs of its own, without the cgroup tree slurmd reads.
    exec nsenter --net="/run/netns/ffn$tag-h$i" unshare --mount --uts --propagation private \
        sh -c 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"' \
        "/etc/netns/ffn$tag-h$i/hosts" "ffn-h$i" "$@"
}

start_host() {  # start_host I: host I's slurmd (again, after kill_host)
    mkdir -p "$dir/spool/ffn-h$1"
    ( on_host "$1" slurmd -N "ffn-h$1" -f "$dir/slurm.conf" )
}

kill_host() {  # kill_host I: host I dies: every process on it, at once (its namespace stays)
    local pids
    pids=$(ip netns pids "ffn$tag-h$1")
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null
    rm -f "$dir/slurmd.ffn-h$1.pid"
    return 0
}

block_port() {  # block_port I PORT: host I drops what comes to PORT (a firewall on that host)
    ip netns exec "ffn$tag-h$1" nft add table inet ffn_test
    ip netns exec "ffn$tag-h$1" nft add chain inet ffn_test input '{ type filter hook input priority 0; }'
    ip netns exec "ffn$tag-h$1" nft add rule inet ffn_test input tcp dport "$2" drop
}

make_hosts() {  # make_hosts CONTROLLER_NAME: the namespaces, the bridge, the links and hosts files
    local controller=$1 i ns
    install_network_tools
    ip netns add "ffn$tag-probe" 2>/dev/null || unavailable "cannot make network namespaces here (ip netns add failed)"
    ip netns delete "ffn$tag-probe"
    unshare --uts true 2>/dev/null || unavailable "cannot make UTS namespaces here (unshare --uts failed)"
    remove_hosts  # what a crashed run of this DIR left behind
    ip link add "$bridge" type bridge
    ip addr add "$subnet.1/24" dev "$bridge"
    ip link set "$bridge" up
    for i in $(seq 0 $((nodes - 1))); do
        ns=ffn$tag-h$i
        ip netns add "$ns"
        ip link add "ffv${tag}h$i" type veth peer name eth0 netns "$ns"
        ip link set "ffv${tag}h$i" master "$bridge" up
        ip -n "$ns" addr add "$subnet.$((10 + i))/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
        mkdir -p "/etc/netns/$ns"
        {
            echo "127.0.0.1 localhost"
            echo "$subnet.1 $controller"
            for j in $(seq 0 $((nodes - 1))); do echo "$subnet.$((10 + j)) ffn-h$j"; done
        } > "/etc/netns/$ns/hosts"
    done
}

remove_hosts() {  # every namespace, link and hosts file of DIR's cluster, by name
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^ffn$tag-" || true); do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns delete "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E "^(ffv${tag}h[0-9]+|$bridge)$" || true); do
        ip link delete "$link" 2>/dev/null || true
    done
}

stop() {
    local name pid proc
    if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        # End this cluster's jobs first, so no job step outlives its slurmd.
        export SLURM_CONF="$dir/slurm.conf"
        squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
        wait_for 30 bash -c '[ -z "$(squeue -h -t running,completing -o %i 2>/dev/null)" ]' || true
    fi
    for name in "$dir"/slurmd.*pid "$dir"/slurmctld.pid "$dir"/munge/munged.pid; do
        [ -f "$name" ] || continue
        pid=$(cat "$name")
        if kill "$pid" 2>/dev/null; then
            for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$name"
    done
    # A step daemon still running holds a socket in this cluster's spool directory: it is ours.
    for proc in /proc/[0-9]*; do
        [ "$(head -c 10 "$proc/cmdline" 2>/dev/null | tr -d '\0')" = slurmstepd ] || continue
        if ls -l "$proc/fd" 2>/dev/null | grep -q -- "$dir/spool"; then kill -9 "${proc#/proc/}" 2>/dev/null || true; fi
    done
    # After a crash the pid files may be gone: the daemons started with this DIR's files are ours.
    for proc in /proc/[0-9]*; do
        if tr '\0' ' ' < "$proc/cmdline" 2>/dev/null | grep -qE -- "(-f |--socket=)$dir/(slurm\.conf|munge/)"; then
            kill -9 "${proc#/proc/}" 2>/dev/null || true
        fi
    done
    command -v ip >/dev/null && remove_hosts
    return 0
}

case "$action" in
    start) start ;;
    stop) stop ;;
    exec) shift 2; i=${1:?usage: local_slurm.sh exec DIR I CMD...}; shift; on_host "$i" "$@" ;;
    kill-host) kill_host "${3:?usage: local_slurm.sh kill-host DIR I}" ;;
    block-port) block_port "${3:?usage: local_slurm.sh block-port DIR I PORT}" "${4:?usage: local_slurm.sh block-port DIR I PORT}" ;;
    links) ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E "^ffv${tag}h[0-9]+$" | sort -t h -k 2 -n ;;
    tag) echo "$tag" ;;
    start-host) start_host "${3:?usage: local_slurm.sh start-host DIR I}" ;;
    *) echo "$usage" >&2; exit 2 ;;
esac
