# Network namespaces for a multi-node cluster on one machine; sourced by slurm/cluster.sh.
#
# One bridge on the host (SUBNET.1), one namespace per node with a veth end called `pv0` and
# the address SUBNET.(10+i), its own hostname (node<i>) and its own /etc/hosts (a bind mount in
# the node's private mount namespace). Nothing is routed or forwarded: the nodes reach each
# other and the host's bridge address, and nothing else. Every name starts with NET_PREFIX, so
# `down` deletes only what `up` made (and two clusters with different prefixes coexist).
#
# Expects from cluster.sh: H, ETC, RUN, LOG, CONF, NODE, NODES, PORT_BASE, SUBNET, NET_PREFIX,
# log(), die().

bridge_name() { echo "${NET_PREFIX}br0"; }
netns_name() { echo "${NET_PREFIX}ns$1"; }  # node index
node_name() { echo "node$1"; }
node_addr() { echo "$SUBNET.$((10 + $1))"; }
bridge_addr() { echo "$SUBNET.1"; }
node_names() { local i; for ((i = 1; i <= NODES; i++)); do node_name "$i"; done; }

# Node state lines and readiness, for one node (localhost) or many.
all_nodes() { if ((NODES > 1)); then node_names | paste -sd,; else echo "$NODE"; fi; }
# One line per node ("node1 idle"); ready when every node answers and takes jobs.
node_state() { sinfo -h -N -n "$(all_nodes)" -o "%N %T" 2>/dev/null; }
node_ready() {
    local states
    states="$(node_state)" || return 1
    [[ "$(grep -cE ' (idle|mixed|allocated)$' <<<"$states")" == "$NODES" ]]
}
# What `up` prints: "localhost: idle" for one node, "node1: idle, node2: idle" for several.
node_summary() { node_state | sed 's/ /: /' | paste -sd, | sed 's/,/, /g'; }

check_net_settings() {
    [[ "$SUBNET" =~ ^10\.[0-9]{1,3}\.[0-9]{1,3}$ ]] \
        || die "PREFVEC_SLURM_SUBNET=$SUBNET: expected the first three octets of a private 10.x.y.0/24"
    # veth names are NET_PREFIX + "v" + index: Linux allows 15 characters.
    [[ "$NET_PREFIX" =~ ^[a-z][a-z0-9]{1,8}$ ]] \
        || die "PREFVEC_SLURM_NET_PREFIX=$NET_PREFIX: expected 2-9 lower-case letters/digits"
    ((NODES >= 1 && NODES <= 50)) || die "--nodes $NODES: expected 1 to 50"
}

# The hosts file every node sees as /etc/hosts: the nodes by name, and the controller's host.
write_hosts() {
    local i
    {
        echo "127.0.0.1 localhost"
        echo "$(bridge_addr) $(hostname -s)"
        for ((i = 1; i <= NODES; i++)); do echo "$(node_addr "$i") $(node_name "$i")"; done
    } >"$ETC/hosts.nodes"
}

net_up() {
    check_net_settings
    local br i ns
    br="$(bridge_name)"
    if ! ip link show "$br" >/dev/null 2>&1; then
        # Refuse a subnet that is already in use here: our bridge would shadow its routes.
        [[ -z "$(ip -4 -o addr show to "$SUBNET.0/24")" ]] \
            || die "subnet $SUBNET.0/24 is already in use on this machine; set PREFVEC_SLURM_SUBNET"
        ip link add "$br" type bridge
        ip addr add "$(bridge_addr)/24" dev "$br"
        ip link set "$br" up
    fi
    for ((i = 1; i <= NODES; i++)); do
        ns="$(netns_name "$i")"
        [[ -e "/run/netns/$ns" ]] && continue
        ip netns add "$ns"
        ip link add "${NET_PREFIX}v$i" type veth peer name "${NET_PREFIX}p$i"
        ip link set "${NET_PREFIX}p$i" netns "$ns"
        ip link set "${NET_PREFIX}v$i" master "$br"
        ip link set "${NET_PREFIX}v$i" up
        # The same interface name on every node: GLOO_SOCKET_IFNAME=pv0 works on all of them.
        ip -n "$ns" link set "${NET_PREFIX}p$i" name pv0
        ip -n "$ns" addr add "$(node_addr "$i")/24" dev pv0
        ip -n "$ns" link set pv0 up
        ip -n "$ns" link set lo up
    done
    write_hosts
}

net_down() {
    local i
    for ((i = 1; i <= NODES; i++)); do
        # Deleting the namespace deletes its veth end, and with it the peer on the bridge.
        if [[ -e "/run/netns/$(netns_name "$i")" ]]; then ip netns del "$(netns_name "$i")"; fi
        if ip link show "${NET_PREFIX}v$i" >/dev/null 2>&1; then ip link del "${NET_PREFIX}v$i"; fi
    done
    if ip link show "$(bridge_name)" >/dev/null 2>&1; then ip link del "$(bridge_name)"; fi
}

# slurmd of node i inside its namespace. `ip netns exec` would remount /sys and hide the cgroup
# mounts slurmd needs ("No filesystem mounted on /sys/fs/cgroup"); nsenter --net keeps the host's
# mounts, and unshare gives the node its own hostname and /etc/hosts. The bind mount lives in
# the daemon's private mount namespace and disappears with it: nothing to undo on the host.
start_node_slurmd() {  # index
    local ns name
    ns="$(netns_name "$1")" name="$(node_name "$1")"
    nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private \
        sh -c "hostname $name && mount --bind '$ETC/hosts.nodes' /etc/hosts && exec slurmd -f '$CONF'" \
        9>&- || die "slurmd of $name failed, see $LOG/slurmd.$name.log"
}

# slurm.conf lines of the multi-node cluster (the one-node cluster writes its own).
node_conf_lines() {  # cpus mem_mb
    local i
    echo "SlurmdPidFile=$RUN/slurmd.%n.pid"
    echo "SlurmdLogFile=$LOG/slurmd.%n.log"
    # slurmd in a namespace connects back to srun on the host (or on node1, for srun in a batch
    # script): a fixed range keeps those ports next to the cluster's others.
    echo "SrunPortRange=$((PORT_BASE + 10))-$((PORT_BASE + 39))"
    for ((i = 1; i <= NODES; i++)); do
        echo "NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") CPUs=$1 RealMemory=$2 State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP"
}
