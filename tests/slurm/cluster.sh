#!/usr/bin/env bash
# A throwaway SLURM cluster (munge + slurmctld + slurmd) for tests: one node, or several nodes,
# each a network namespace of its own on this machine.
#
#   tests/slurm/cluster.sh up DIR             install if missing, start, wait until the node is idle
#   tests/slurm/cluster.sh up DIR --nodes N   N (2..8) slurmd hosts, each in its own network and UTS
#                                             namespace (own hostname and address on a private bridge),
#                                             slurmctld in this namespace; wait until all are idle
#   tests/slurm/cluster.sh down DIR           stop only the daemons that `up DIR` started, kill what
#                                             is left in its namespaces, remove its namespaces and links
#
# All SLURM state, spool, logs and pid files live under DIR. Clients find the cluster through
# SLURM_CONF: `source DIR/env.sh` (up also prints the export line).
# Needs root (daemons run as root; munged as the munge user) and apt-get on Debian/Ubuntu.
#
# Several nodes: names derive from a hash of DIR (netns dcifar-<id>-n<i>, bridge dcbr<id>, host-side
# veths dcv<id>n<i>, node and host names dc<id>n<i>), so clusters in different DIRs never collide and
# `up`/`down` find the leftovers of a killed run in the same DIR. The bridge gets a free 10.x.y.0/24
# (.1 = this machine, .11, .12, ... = the nodes); there is no route out of it. Each slurmd runs in a
# mount namespace whose /etc/hosts (DIR/hosts) names the nodes, so jobs resolve node names as on a
# real cluster. Each cluster runs a munged of its own on a socket named from the same hash
# (/run/munge/dcifar-<id>.socket, named in slurm.conf's AuthInfo; a socket is a file, reachable from
# every namespace), so one cluster's `down` never stops the munged another cluster uses.
#
# Any command that fails stops `up` with a line naming it (the ERR trap below), and `up` then stops
# what it started. Under pipefail a pipeline whose grep finds nothing fails, so counts and queries
# that may legitimately be empty are written to succeed (idle_count, node_states).
set -Eeuo pipefail

# A command that fails where set -e would end the script: say which, then clean up as die does
# (once DIR is known). Only in the script's own shell: inside a command substitution errexit is off,
# and a failure there is the substitution's result, reported by the command that used it.
on_error() {
    local rc=$1 line=$2 command=$3
    [[ $BASHPID == "$$" ]] || return "$rc"
    if [[ -n ${DIR:-} ]] && declare -F die >/dev/null; then die "line $line: \`$command\` exited with status $rc"; fi
    echo "[cluster.sh] ERROR: line $line: \`$command\` exited with status $rc" >&2
    exit 1
}
trap 'on_error $? $LINENO "$BASH_COMMAND"' ERR

usage() { echo "usage: $0 up DIR [--nodes N] | $0 down DIR" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
cmd=$1
dir_arg=$2
shift 2
NODES=1
while [[ $# -gt 0 ]]; do
    case $1 in
        --nodes) [[ $# -ge 2 ]] || usage; NODES=$2; shift 2 ;;
        --nodes=*) NODES=${1#--nodes=}; shift ;;
        *) usage ;;
    esac
done
[[ $NODES =~ ^[1-8]$ ]] || { echo "$0: --nodes must be 1..8, got '$NODES'" >&2; exit 2; }
mkdir -p "$dir_arg"
DIR=$(cd "$dir_arg" && pwd)
UP_TIMEOUT_S=${SLURM_TEST_UP_TIMEOUT_S:-60}
# Several nodes: the names of everything this DIR creates outside DIR.
ID=$(printf '%s' "$DIR" | sha1sum | cut -c1-8)
NETNS_PREFIX=dcifar-$ID-n
BRIDGE=dcbr$ID
VETH_PREFIX=dcv${ID}n
NODE_PREFIX=dc${ID}n
NET_LOCK=/run/lock/dist-cifar-test-cluster.lock
MUNGE_SOCKET=/run/munge/dcifar-$ID.socket
MUNGE_LOG=/var/log/munge/dcifar-$ID.log

log() { echo "[cluster.sh] $*" >&2; }

dump_logs() {
    local f
    for f in "$DIR"/log/*.log "$MUNGE_LOG"; do
        [[ -f $f ]] || continue
        echo "----- $f (last 40 lines) -----" >&2
        tail -n 40 "$f" >&2 || true
    done
}

STARTED=0  # set once `up` has started a daemon: a failing `up` stops what it started
die() {
    log "ERROR: $*"
    dump_logs
    if ((STARTED)); then cmd_down >/dev/null 2>&1 || true; fi
    exit 1
}

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null || die "need ${missing[*]} but apt-get is not available"
    log "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >"$DIR/log/apt.log" 2>&1 || true
    apt-get install -y -qq "${missing[@]}" >>"$DIR/log/apt.log" 2>&1 \
        || { tail -n 30 "$DIR/log/apt.log" >&2; die "apt-get install failed"; }
}

# Output read whole, not piped into grep -q: under pipefail an early grep exit can fail ss with SIGPIPE.
port_in_use() { [[ -n $(ss -Hltn "sport = :$1" 2>/dev/null || true) ]]; }

free_port() {  # first port >= $1 that nothing listens on
    local p=$1
    while port_in_use "$p"; do p=$((p + 1)); done
    echo "$p"
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

munge_works() { munge -S "$MUNGE_SOCKET" -n </dev/null 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }

start_munge() {  # this cluster's own munged on $MUNGE_SOCKET (the key is the machine's, shared)
    if alive "$DIR/pid/munged.pid" && munge_works; then return 0; fi
    stop_pidfile "$DIR/pid/munged.pid"
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"  # stale, nothing answers
    # setpriv execs in place (no fork), so $! is munged's own pid.
    STARTED=1
    setpriv --reuid munge --regid munge --init-groups munged --foreground --socket="$MUNGE_SOCKET" \
        --pid-file="/run/munge/dcifar-$ID.pid" --seed-file="/var/lib/munge/dcifar-$ID.seed" \
        --log-file="$MUNGE_LOG" >>"$DIR/log/munged.out" 2>&1 </dev/null &
    echo $! >"$DIR/pid/munged.pid"
    local i
    for i in $(seq 50); do
        munge_works && return 0
        alive "$DIR/pid/munged.pid" || break
        sleep 0.2
    done
    die "munged did not come up"
}

choose_ports() {  # sets ctld_port and slurmd_port (callers declare them local): free here
    ctld_port=$(free_port "${SLURM_TEST_CTLD_PORT:-6817}")
    slurmd_port=$(free_port "${SLURM_TEST_SLURMD_PORT:-$((ctld_port + 1))}")
    [[ $slurmd_port == "$ctld_port" ]] && slurmd_port=$(free_port $((ctld_port + 1)))
    return 0
}

# Declare at least 4 CPUs per node (config_overrides lets slurmd accept more than it has) so a
# 2-task job and a follow-up job can share a 2-core CI machine.
node_cpus() { local n; n=$(nproc); echo $(( n < 4 ? 4 : n )); }

# emit_conf TITLE CTLD_HOST CTLD_ADDR SLURMD_SPOOL SLURMD_FILE NODE_LINES PARTITION_NODES
# prints a slurm.conf (uses ctld_port, slurmd_port). SLURMD_FILE names slurmd's pid and log
# files (run/SLURMD_FILE.pid, log/SLURMD_FILE.log); "%n" in it or the spool dir = the node's name.
emit_conf() {
    local title=$1 ctld_host=$2 ctld_addr=$3 spool=$4 slurmd_file=$5 node_lines=$6 part_nodes=$7
    cat <<EOF
# Generated by tests/slurm/cluster.sh: $title, state under $DIR
ClusterName=distcifar-test
SlurmctldHost=$ctld_host($ctld_addr)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may restart only once the old job credential expires (default 120 s).
AuthInfo=cred_expire=10,socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$spool
MailProg=/bin/true
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/$slurmd_file.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/$slurmd_file.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=5
MinJobAge=3600
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=30
$node_lines
PartitionName=debug Nodes=$part_nodes Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

write_conf() {
    local node ctld_port slurmd_port
    node=$(hostname -s)
    choose_ports
    emit_conf "single-node test cluster" "$node" 127.0.0.1 "$DIR/spool/$node" slurmd \
        "NodeName=$node NodeAddr=127.0.0.1 CPUs=$(node_cpus) State=UNKNOWN" "$node" >"$DIR/slurm.conf"
    mkdir -p "$DIR/spool/$node"
    echo "export SLURM_CONF=$DIR/slurm.conf" >"$DIR/env.sh"
}

# The first node's state; empty while slurmctld does not answer yet.
node_state() { { SLURM_CONF=$DIR/slurm.conf sinfo -h -N -o %T 2>/dev/null || true; } | head -n1; }

cmd_up() {
    mkdir -p "$DIR"/{log,pid,run,state,spool}
    [[ $(id -u) -eq 0 ]] || die "must run as root"
    if alive "$DIR/pid/slurmctld.pid" && alive "$DIR/pid/slurmd.pid" \
        && [[ $(node_state) == idle* ]]; then
        log "cluster in $DIR already up"
        echo "export SLURM_CONF=$DIR/slurm.conf"
        return 0
    fi
    install_packages
    start_munge
    # Choosing two free ports and taking them is one step for concurrent `up`s (of any size).
    local lockfd i
    exec {lockfd}>"$NET_LOCK"
    flock -w 120 "$lockfd" || die "another cluster.sh up holds $NET_LOCK for over 120 s"
    write_conf
    export SLURM_CONF=$DIR/slurm.conf
    # -D keeps them in the foreground so $! is the daemon itself; setsid detaches them from
    # the caller's process group. -i ignores stale state from an earlier run in DIR.
    STARTED=1
    setsid slurmctld -D -i -f "$SLURM_CONF" >>"$DIR/log/slurmctld.out" 2>&1 </dev/null {lockfd}>&- &
    echo $! >"$DIR/pid/slurmctld.pid"
    setsid slurmd -D -f "$SLURM_CONF" -N "$(hostname -s)" >>"$DIR/log/slurmd.out" 2>&1 </dev/null {lockfd}>&- &
    echo $! >"$DIR/pid/slurmd.pid"
    for i in $(seq 100); do
        port_in_use "$(sed -n 's/^SlurmctldPort=//p' "$SLURM_CONF")" \
            && port_in_use "$(sed -n 's/^SlurmdPort=//p' "$SLURM_CONF")" && break
        sleep 0.1
    done
    exec {lockfd}>&-

    local deadline=$((SECONDS + UP_TIMEOUT_S)) state=""
    while ((SECONDS < deadline)); do
        alive "$DIR/pid/slurmctld.pid" || die "slurmctld exited"
        alive "$DIR/pid/slurmd.pid" || die "slurmd exited"
        state=$(node_state)
        case $state in
            idle*) log "node $(hostname -s) idle after ${SECONDS}s"
                   echo "export SLURM_CONF=$SLURM_CONF"; return 0 ;;
            down* | drain* | inval* | fail*)
                   scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    SLURM_CONF=$DIR/slurm.conf scontrol show node >&2 2>/dev/null || true
    die "node not idle after ${UP_TIMEOUT_S}s (last state: '${state}')"
}

# ---- several nodes: network namespaces on a private bridge -------------------------------------

net() {  # an `ip` command of the network setup; its errors go to log/net.log, a failure stops `up`
    ip "$@" 2>>"$DIR/log/net.log" || die "ip $* failed (log/net.log: $(tail -n1 "$DIR/log/net.log" 2>/dev/null))"
}

choose_subnet() {  # SUBNET=10.a.b: a /24 that no address or route of this machine is in
    local h a b k
    local taken
    h=$((16#${ID:0:6}))
    # Read once, then search: `ip ... | grep -q` under pipefail fails when grep stops early (SIGPIPE),
    # which read as "not in use".
    taken=$({ ip -4 -o addr show; ip -4 route show table all; } 2>/dev/null || true)
    for k in $(seq 0 2047); do
        a=$((200 + ((h >> 8) + k / 256) % 50))
        b=$(((h + k) % 256))
        if ! grep -qE "(^|[^0-9.])10\.$a\.$b\." <<<"$taken"; then
            SUBNET=10.$a.$b
            return 0
        fi
    done
    die "no free 10.x.y.0/24 left for the test network"
}

start_network() {  # the bridge (SUBNET.1, this machine) and one namespace per node (SUBNET.1i)
    local i ns veth
    : >"$DIR/log/net.log"
    net link add "$BRIDGE" type bridge
    net addr add "$SUBNET.1/24" dev "$BRIDGE"
    net link set "$BRIDGE" up
    for i in $(seq "$NODES"); do
        ns=$NETNS_PREFIX$i
        veth=$VETH_PREFIX$i
        net netns add "$ns"
        net -n "$ns" link set lo up
        net link add "$veth" type veth peer name eth0 netns "$ns"
        net link set "$veth" master "$BRIDGE" up
        net -n "$ns" addr add "$SUBNET.$((10 + i))/24" dev eth0
        net -n "$ns" link set eth0 up
    done
    # What a node's jobs see as /etc/hosts: every node's name, and this machine's on the bridge.
    {
        echo "127.0.0.1 localhost"
        echo "::1 localhost ip6-localhost ip6-loopback"
        echo "$SUBNET.1 $(hostname -s)"
        for i in $(seq "$NODES"); do echo "$SUBNET.$((10 + i)) $NODE_PREFIX$i"; done
    } >"$DIR/hosts"
}

teardown_network() {  # everything `up --nodes` made outside DIR; a no-op when there is nothing
    local ns pids i link
    local -a all_ns
    all_ns=($(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$NETNS_PREFIX[0-9]+$" || true))
    for ns in "${all_ns[@]}"; do
        # Whatever still runs in the namespace (job steps, tasks) was started by this cluster.
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        if [[ -n $pids ]]; then
            log "stopping processes left in $ns: $(echo $pids)"
            kill -TERM $pids 2>/dev/null || true
            for i in $(seq 25); do [[ -z $(ip netns pids "$ns" 2>/dev/null) ]] && break; sleep 0.2; done
            pids=$(ip netns pids "$ns" 2>/dev/null || true)
            [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
        fi
    done
    # Deleting one end of a veth pair deletes both; a namespace goes once nothing runs in it.
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' \
                  | grep -E "^($VETH_PREFIX[0-9]+|$BRIDGE)$" || true); do
        ip link delete "$link" 2>/dev/null || ! ip link show "$link" >/dev/null 2>&1 \
            || log "WARNING: could not delete link $link"
    done
    for ns in "${all_ns[@]}"; do
        ip netns delete "$ns" 2>/dev/null || log "WARNING: could not delete network namespace $ns"
    done
}

network_exists() {
    local all
    all=$(ip netns list 2>/dev/null || true)
    grep -qE "^$NETNS_PREFIX[0-9]+( |$)" <<<"$all" || ip link show "$BRIDGE" >/dev/null 2>&1
}

write_conf_multi() {
    local ctld_port slurmd_port i lines=""
    # slurmctld's port must be free here; each slurmd has a network namespace of its own.
    choose_ports
    for i in $(seq "$NODES"); do
        lines+="NodeName=$NODE_PREFIX$i NodeAddr=$SUBNET.$((10 + i)) CPUs=$(node_cpus) State=UNKNOWN"$'\n'
        mkdir -p "$DIR/spool/$NODE_PREFIX$i"
    done
    emit_conf "$NODES-node test cluster (netns $NETNS_PREFIX<i>, bridge $BRIDGE, $SUBNET.0/24)" \
        "$(hostname -s)" "$SUBNET.1" "$DIR/spool/%n" "slurmd-%n" "${lines%$'\n'}" \
        "$NODE_PREFIX[1-$NODES]" >"$DIR/slurm.conf"
    echo "export SLURM_CONF=$DIR/slurm.conf" >"$DIR/env.sh"
}

# node_states: "name=state ..." of every node, sorted; empty while slurmctld does not answer yet
node_states() { { SLURM_CONF=$DIR/slurm.conf sinfo -h -N -o '%N=%T' 2>/dev/null || true; } | sort | tr '\n' ' '; }

idle_count() {  # how many of the "name=state ..." words in $1 are idle (0 is an answer, not a failure)
    local word n=0
    for word in $1; do
        if [[ $word == *=idle* ]]; then n=$((n + 1)); fi
    done
    echo "$n"
}

all_slurmd_alive() {
    local i
    for i in $(seq "$NODES"); do alive "$DIR/pid/slurmd-$NODE_PREFIX$i.pid" || return 1; done
}

check_nodes() {  # from inside each slurmd's namespaces: own hostname, every node resolves and answers
    local i j pid node other
    for i in $(seq "$NODES"); do
        node=$NODE_PREFIX$i
        pid=$(cat "$DIR/pid/slurmd-$node.pid")
        [[ $(nsenter -t "$pid" -u hostname) == "$node" ]] || die "slurmd of $node runs with hostname $(nsenter -t "$pid" -u hostname)"
        for j in $(seq "$NODES"); do
            other=$NODE_PREFIX$j
            timeout 5 nsenter -t "$pid" -n -u -m -- bash -c \
                'getent hosts "$1" >/dev/null && exec 3<>"/dev/tcp/$1/$2"' bash "$other" "$SLURMD_PORT" \
                || die "from $node, $other:$SLURMD_PORT (slurmd) does not resolve or answer"
        done
    done
}

cmd_up_multi() {
    mkdir -p "$DIR"/{log,pid,run,state,spool}
    [[ $(id -u) -eq 0 ]] || die "must run as root"
    if [[ -f $DIR/slurm.conf ]] && alive "$DIR/pid/slurmctld.pid" && all_slurmd_alive \
        && [[ $(idle_count "$(node_states)") -eq $NODES ]]; then
        log "cluster in $DIR already up"
        echo "export SLURM_CONF=$DIR/slurm.conf"
        return 0
    fi
    # A leftover of an earlier `up` in this DIR (a killed run, a half-done `down`): start afresh.
    if network_exists || compgen -G "$DIR/pid/*.pid" >/dev/null; then
        log "cleaning up what an earlier run left in $DIR"
        cmd_down >/dev/null 2>&1 || true
    fi
    command -v nsenter >/dev/null && command -v unshare >/dev/null || die "need nsenter and unshare (util-linux)"
    install_packages
    start_munge
    STARTED=1
    # Choosing a subnet and a free port, and taking them, is one step for concurrent `up`s.
    local lockfd
    exec {lockfd}>"$NET_LOCK"
    flock -w 120 "$lockfd" || die "another cluster.sh up holds $NET_LOCK for over 120 s"
    choose_subnet
    start_network
    write_conf_multi
    export SLURM_CONF=$DIR/slurm.conf
    SLURMD_PORT=$(sed -n 's/^SlurmdPort=//p' "$SLURM_CONF")
    local ctld_port i node
    ctld_port=$(sed -n 's/^SlurmctldPort=//p' "$SLURM_CONF")
    setsid slurmctld -D -i -f "$SLURM_CONF" >>"$DIR/log/slurmctld.out" 2>&1 </dev/null {lockfd}>&- &
    echo $! >"$DIR/pid/slurmctld.pid"
    # Each slurmd: its node's network namespace, a UTS namespace with the node's hostname and a
    # mount namespace with DIR/hosts as /etc/hosts; its job steps inherit all three. Every command
    # in the chain execs, so $! is slurmd itself. (nsenter, not `ip netns exec`: that remounts
    # /sys, which hides /sys/fs/cgroup, and slurmd will not start without it.)
    for i in $(seq "$NODES"); do
        node=$NODE_PREFIX$i
        setsid nsenter --net="/run/netns/$NETNS_PREFIX$i" unshare --uts --mount -- bash -c \
            'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"' \
            bash "$node" "$DIR/hosts" slurmd -D -f "$SLURM_CONF" -N "$node" \
            >>"$DIR/log/slurmd-$node.out" 2>&1 </dev/null {lockfd}>&- &
        echo $! >"$DIR/pid/slurmd-$node.pid"
    done
    for i in $(seq 100); do
        port_in_use "$ctld_port" && break
        alive "$DIR/pid/slurmctld.pid" || die "slurmctld exited"
        sleep 0.1
    done
    exec {lockfd}>&-

    local deadline=$((SECONDS + UP_TIMEOUT_S)) states="" idle
    while ((SECONDS < deadline)); do
        alive "$DIR/pid/slurmctld.pid" || die "slurmctld exited"
        for i in $(seq "$NODES"); do
            alive "$DIR/pid/slurmd-$NODE_PREFIX$i.pid" || die "slurmd of $NODE_PREFIX$i exited"
        done
        states=$(node_states)
        idle=$(idle_count "$states")
        if ((idle == NODES)); then
            check_nodes
            log "$NODES nodes idle after ${SECONDS}s: $states(netns $NETNS_PREFIX<i>, $SUBNET.0/24)"
            echo "export SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        for node in $(grep -oE "[^ =]+=(down|drain|inval|fail)[^ ]*" <<<"$states" | cut -d= -f1); do
            scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
        done
        sleep 0.5
    done
    scontrol show node >&2 2>/dev/null || true
    die "not all $NODES nodes idle after ${UP_TIMEOUT_S}s (states: ${states:-none})"
}

stop_pidfile() {  # TERM, then KILL after 10 s; only the pid we recorded
    local f=$1 pid i
    [[ -f $f ]] || return 0
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

cmd_down() {
    if [[ -f $DIR/slurm.conf ]] && alive "$DIR/pid/slurmctld.pid"; then
        # Jobs still running would leave orphaned slurmstepd/task processes behind.
        export SLURM_CONF=$DIR/slurm.conf
        timeout 10 scancel --quiet --user="$(id -un)" 2>/dev/null || true
        local i
        for i in $(seq 30); do
            [[ -z $(timeout 5 squeue -h -o %i -t R,CG,S 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    local f
    stop_pidfile "$DIR/pid/slurmd.pid"
    # Several nodes: each daemon takes a second or two to stop, so TERM them all at once.
    if compgen -G "$DIR/pid/slurmd-*.pid" >/dev/null; then
        for f in "$DIR"/pid/slurmd-*.pid "$DIR/pid/slurmctld.pid" "$DIR/pid/munged.pid"; do
            if alive "$f"; then kill -TERM "$(cat "$f")" 2>/dev/null || true; fi
        done
    fi
    for f in "$DIR"/pid/slurmd-*.pid; do stop_pidfile "$f"; done
    stop_pidfile "$DIR/pid/slurmctld.pid"
    stop_pidfile "$DIR/pid/munged.pid"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" "/run/munge/dcifar-$ID.pid" "/var/lib/munge/dcifar-$ID.seed" "$MUNGE_LOG"
    if network_exists; then
        teardown_network
        log "stopped daemons started in $DIR, removed its network namespaces and links"
    else
        log "stopped daemons started in $DIR"
    fi
}

case $cmd in
    up) if ((NODES > 1)); then cmd_up_multi; else cmd_up; fi ;;
    down) cmd_down ;;
    *) usage ;;
esac
