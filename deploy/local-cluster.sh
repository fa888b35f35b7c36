#!/usr/bin/env bash
# A Ray CPU cluster of several nodes on this one machine: a head node and N-1 worker nodes.
#
#   deploy/local-cluster.sh up [--nodes N] [--cpus-per-node C] [--port P] [--dashboard-port D]
#                              [--mode auto|netns|loopback] [--run-dir DIR] [--env-file FILE] [--s3 [--s3-port P]]
#   deploy/local-cluster.sh status [--run-dir DIR]
#   deploy/local-cluster.sh env    [--run-dir DIR]     # the export lines, for eval "$(...)"
#   deploy/local-cluster.sh down   [--run-dir DIR] [--keep-logs]
#
# Defaults: 2 nodes of 1 CPU, the GCS on port 6390 (P+1: Ray's client server, P+2: the head's agent,
# loopback mode: P+k+1 node k's agent), the dashboard and job server on 127.0.0.1:8275, the run folder
# $INPAINT_CLUSTER_DIR or runs/cluster. See deploy/README.md.
# --env-file FILE: every node starts with FILE's `export NAME=VALUE` lines (e.g. a real object store's AWS_*).
# --s3: also start an S3 server (deploy/s3-server.sh, in RUN_DIR/s3) where every node reaches it, before the nodes,
#       and give every node its endpoint and credentials; `down` stops it too.
#
# Modes (how the nodes are kept apart):
#   netns     (root with iproute2) each worker node is a separate host: its own network namespace,
#             joined to the head by a veth pair on a private bridge (10.213.X.0/24, host-only: no route
#             leaves this machine). The head node runs in this machine's namespace at 10.213.X.1, so its
#             dashboard and job server are on 127.0.0.1 here.
#   loopback  (anyone) each node is its own set of `ray start` processes with its own node address
#             (127.0.0.1, 127.0.0.2, ... : all of 127.0.0.0/8 is this machine), ports and temp dir.
#   auto      netns if it works here, else loopback.
#
# Every node gets its own Ray temp dir, Ray token authentication is on (a token made for this cluster,
# in the run folder), the dashboard and job server listen on 127.0.0.1 only. The state (mode, ports,
# addresses, the token) lives in the run folder (default runs/cluster), so `down` works from any shell.
# `down` stops exactly the processes this cluster started (each carries INPAINT_CLUSTER=<id> in its
# environment; `ray stop` would stop every Ray on the machine) and removes the namespaces and bridge.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
# shellcheck source=deploy/lib.sh
source "$HERE/lib.sh"

usage() {
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

cmd="${1:-}"
[[ -n "$cmd" ]] || usage
shift
nodes=2
cpus=1
port=6390
dashboard_port=8275
mode=auto
run_dir="${INPAINT_CLUSTER_DIR:-$REPO/runs/cluster}"
keep_logs=0
env_file=""
with_s3=0
s3_port=9200
while [[ $# -gt 0 ]]; do
    case "$1" in
    --nodes) nodes="$(value "$@")"; shift 2 ;;
    --cpus-per-node) cpus="$(value "$@")"; shift 2 ;;
    --port) port="$(value "$@")"; shift 2 ;;
    --dashboard-port) dashboard_port="$(value "$@")"; shift 2 ;;
    --mode) mode="$(value "$@")"; shift 2 ;;
    --run-dir) run_dir="$(value "$@")"; shift 2 ;;
    --keep-logs) keep_logs=1; shift ;;
    --env-file) env_file="$(value "$@")"; shift 2 ;;
    --s3) with_s3=1; shift ;;
    --s3-port) s3_port="$(value "$@")"; shift 2 ;;
    -h | --help) usage ;;
    *) echo "error: unknown option $1" >&2; usage ;;
    esac
done
state="$run_dir/cluster.state"

# ---------------------------------------------------------------------------------------------
# Helpers


api_nodes() { # count the ALIVE nodes through the dashboard's state API
    curl -fsS --max-time 5 -H "Authorization: Bearer $(cat "$run_dir/auth_token")" \
        "http://127.0.0.1:$DASHBOARD_PORT/api/v0/nodes?limit=100" 2>/dev/null |
        python3 -c 'import json,sys; d=json.load(sys.stdin)["data"]["result"]["result"]; print(sum(n["state"]=="ALIVE" for n in d))' \
            2>/dev/null || echo 0
}

netns_works() {
    [[ "$(id -u)" == 0 ]] && command -v ip >/dev/null || return 1
    local probe="inpaint-probe-$$"
    ip netns add "$probe" 2>/dev/null || return 1
    ip netns del "$probe"
}

free_subnet() { # the first 10.213.X.0/24 no interface or route here uses
    local x used
    used="$(ip -4 route show; ip -4 addr show)"
    for x in $(seq 1 254); do
        grep -q "10\.213\.$x\." <<<"$used" || { echo "10.213.$x"; return; }
    done
    die "no free 10.213.X.0/24 subnet for the cluster's bridge"
}

load_state() {
    [[ -f "$state" ]] || die "no cluster in $run_dir (start one with deploy/local-cluster.sh up)"
    # shellcheck disable=SC1090
    source "$state"
}

# ---------------------------------------------------------------------------------------------
# up

read_env_file() { # FILE: its `export NAME=VALUE` lines as NAME=VALUE (read, never run), one a line
    local line
    [[ -r "$1" ]] || die "no env file $1 (--env-file)"
    while IFS= read -r line || [[ -n "$line" ]]; do
        line="${line#export }"
        [[ "$line" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || continue
        echo "$line"
    done <"$1"
}

start_node() { # index ip netns(or "") extra ray-start args...
    local k="$1" ip="$2" ns="$3"
    shift 3
    local -a prefix=() env=(INPAINT_CLUSTER="$CLUSTER_ID" RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$run_dir/auth_token"
        RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true) node_env=()
    [[ -n "$ns" ]] && prefix=(ip netns exec "$ns")
    # gloo (torch.distributed) binds to what the hostname resolves to (127.0.0.1 here): name the node's interface
    [[ "$MODE" == netns ]] && env+=(GLOO_SOCKET_IFNAME="$(if [[ -n "$ns" ]]; then echo eth0; else echo "$BRIDGE"; fi)")
    # What the node's machine would have: the object store's endpoint and credentials (exported below, never on a
    # command line), and a working directory and temp dir of its own: no folder of this machine is shared.
    local file
    for file in $NODE_ENV_FILES; do mapfile -t -O "${#node_env[@]}" node_env < <(read_env_file "$file"); done
    mkdir -p "$TEMP_ROOT/n$k/cwd" "$TEMP_ROOT/n$k/tmp"
    env+=(TMPDIR="$TEMP_ROOT/n$k/tmp")
    if ! (
        cd "$TEMP_ROOT/n$k/cwd"
        [[ ${#node_env[@]} -eq 0 ]] || export "${node_env[@]}"
        "${prefix[@]}" env -u RAY_ADDRESS "${env[@]}" "$RAY_BIN" start --node-ip-address "$ip" --num-cpus "$cpus" \
            --temp-dir "$TEMP_ROOT/n$k" --disable-usage-stats "$@"
    ) >"$run_dir/node$k.log" 2>&1; then
        tail -n 20 "$run_dir/node$k.log" >&2
        echo "error: node $k ($ip) did not start (log: $run_dir/node$k.log); stopping the rest" >&2
        "$0" down --run-dir "$run_dir" --keep-logs >/dev/null 2>&1 || true
        exit 1
    fi
}

up() {
    [[ "$nodes" =~ ^[1-9][0-9]*$ && "$nodes" -le 16 ]] || die "--nodes must be 1 to 16, got $nodes"
    [[ "$cpus" =~ ^[1-9][0-9]*$ ]] || die "--cpus-per-node must be a positive integer, got $cpus"
    if [[ -n "$env_file" ]]; then
        [[ -r "$env_file" ]] || die "no env file $env_file (--env-file)"
        env_file="$(cd "$(dirname "$env_file")" && pwd)/$(basename "$env_file")"
    fi
    RAY_BIN="$(command -v ray)" || die "no ray command: activate the project's environment (. .venv/bin/activate)"
    command -v curl >/dev/null || die "no curl: apt-get install curl"
    if [[ -f "$state" ]]; then
        # shellcheck disable=SC1090
        source "$state"
        [[ -z "$(marked_pids "INPAINT_CLUSTER=$CLUSTER_ID")" ]] || die "a cluster is already up in $run_dir: deploy/local-cluster.sh down first"
        "$0" down --run-dir "$run_dir" >/dev/null # leftovers of a crashed one
    fi
    case "$mode" in
    auto) if netns_works; then MODE=netns; else MODE=loopback; fi ;;
    netns) netns_works || die "--mode netns needs root and iproute2 (ip netns): use --mode loopback"; MODE=netns ;;
    loopback) MODE=loopback ;;
    *) die "--mode must be auto, netns or loopback, got $mode" ;;
    esac
    # P: the GCS; P+1: Ray's client server; P+2: the head's dashboard agent; loopback mode: P+k+1 node k's agent
    local p last=$((port + 2))
    [[ "$MODE" == loopback ]] && last=$((port + nodes + 1))
    local others=("$dashboard_port")
    [[ "$with_s3" == 1 ]] && others+=("$s3_port")
    for p in $(seq "$port" "$last") "${others[@]}"; do
        port_in_use "$p" && die "port $p is taken on this machine: pick others with --port P (takes P to P+$((last - port))) and --dashboard-port D"
    done

    mkdir -p "$run_dir"
    run_dir="$(cd "$run_dir" && pwd)"
    state="$run_dir/cluster.state"
    CLUSTER_ID="$(python3 -c 'import secrets; print(secrets.token_hex(3))')"
    TEMP_ROOT="${TMPDIR:-/tmp}/inpaint-ray-$CLUSTER_ID" # short: Ray's socket paths must fit in 107 bytes
    DASHBOARD_PORT="$dashboard_port" NODES="$nodes" GCS_PORT="$port"
    (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32), end="")' >"$run_dir/auth_token")
    BRIDGE="" SUBNET="" NAMESPACES=""
    if [[ "$MODE" == netns ]]; then
        exec 9>"${TMPDIR:-/tmp}/inpaint-cluster-subnets.lock"
        flock 9 # until the bridge holds its subnet: two clusters starting at once pick different ones
        SUBNET="$(free_subnet)"
        BRIDGE="inp${CLUSTER_ID}br"
        HEAD_IP="$SUBNET.1"
        for k in $(seq 2 "$nodes"); do NAMESPACES+="inp-$CLUSTER_ID-n$k "; done
    else
        HEAD_IP=127.0.0.1
    fi
    # what `down` needs, written before anything starts so that a failed `up` can be taken down
    cat >"$state" <<EOF
CLUSTER_ID=$CLUSTER_ID
MODE=$MODE
NODES=$nodes
CPUS_PER_NODE=$cpus
HEAD_IP=$HEAD_IP
GCS_PORT=$port
DASHBOARD_PORT=$dashboard_port
TEMP_ROOT=$TEMP_ROOT
BRIDGE=$BRIDGE
SUBNET=$SUBNET
NAMESPACES="$NAMESPACES"
S3=$with_s3
EOF

    # a step that fails from here on takes down what the earlier ones started
    trap '"$0" down --run-dir "$run_dir" --keep-logs >/dev/null 2>&1 || true' ERR
    if [[ "$MODE" == netns ]]; then
        ip link add "$BRIDGE" type bridge
        ip addr add "$HEAD_IP/24" dev "$BRIDGE"
        ip link set "$BRIDGE" up
        for k in $(seq 2 "$nodes"); do
            local ns="inp-$CLUSTER_ID-n$k" host_end="inp${CLUSTER_ID}v$k" node_end="inp${CLUSTER_ID}p$k"
            ip netns add "$ns"
            ip link add "$host_end" type veth peer name "$node_end"
            ip link set "$node_end" netns "$ns"
            ip -n "$ns" link set "$node_end" name eth0
            ip -n "$ns" addr add "$SUBNET.$k/24" dev eth0
            ip -n "$ns" link set eth0 up
            ip -n "$ns" link set lo up
            ip link set "$host_end" master "$BRIDGE"
            ip link set "$host_end" up
        done
        exec 9>&-
    fi

    local started=$SECONDS
    if [[ "$MODE" == netns ]]; then SERVICE_HOST="$HEAD_IP"; else SERVICE_HOST=127.0.0.1; fi
    NODE_ENV_FILES="$env_file" S3="$with_s3"
    if [[ "$with_s3" == 1 ]]; then # where every node reaches it: the bridge (netns) or this machine's loopback
        "$HERE/s3-server.sh" up --host "$SERVICE_HOST" --port "$s3_port" --run-dir "$run_dir/s3" >"$run_dir/s3-up.log" 2>&1 ||
            { cat "$run_dir/s3-up.log" >&2; false; }
        NODE_ENV_FILES+=" $run_dir/s3/s3.env"
    fi
    start_node 1 "$HEAD_IP" "" --head --port "$port" --ray-client-server-port "$((port + 1))" \
        --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" --dashboard-agent-listen-port "$((port + 2))"
    for k in $(seq 2 "$nodes"); do
        if [[ "$MODE" == netns ]]; then
            start_node "$k" "$SUBNET.$k" "inp-$CLUSTER_ID-n$k" --address "$HEAD_IP:$port"
        else # one port space for all: each node's agent gets its own port
            start_node "$k" "127.0.0.$k" "" --address "$HEAD_IP:$port" --dashboard-agent-listen-port "$((port + 1 + k))"
        fi
    done
    local alive=0
    for _ in $(seq 1 60); do
        alive="$(api_nodes)"
        [[ "$alive" == "$nodes" ]] && break
        sleep 1
    done
    [[ "$alive" == "$nodes" ]] || {
        "$0" down --run-dir "$run_dir" --keep-logs >/dev/null 2>&1 || true
        die "only $alive of $nodes nodes joined within 60 s (logs: $run_dir/node*.log)"
    }
    cat >"$run_dir/cluster.env" <<EOF
# source this file (or eval "\$(deploy/local-cluster.sh env)") to use the cluster from a shell
export RAY_ADDRESS=$HEAD_IP:$port
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dashboard_port
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$run_dir/auth_token
# where services every node must reach (the MLflow server) should listen
export INPAINT_SERVICE_HOST=$SERVICE_HOST
EOF
    for file in $NODE_ENV_FILES; do # what the nodes were given (the object store), for drivers and servers here
        echo "[[ -r $file ]] && source $file" >>"$run_dir/cluster.env"
    done
    echo "Ray cluster up in $((SECONDS - started)) s: $nodes nodes × $cpus CPU, mode $MODE"
    print_addresses
}

print_addresses() {
    local k ip
    for k in $(seq 1 "$NODES"); do
        if [[ "$MODE" == netns ]]; then
            ip="$SUBNET.$k"
        else
            ip="127.0.0.$k"
        fi
        if [[ "$k" == 1 ]]; then
            echo "  node 1 (head)  $ip  this machine's network namespace"
        elif [[ "$MODE" == netns ]]; then
            echo "  node $k         $ip  network namespace inp-$CLUSTER_ID-n$k"
        else
            echo "  node $k         $ip  loopback"
        fi
    done
    echo "dashboard and job server  http://127.0.0.1:$DASHBOARD_PORT"
    echo "RAY_ADDRESS               $HEAD_IP:$GCS_PORT   (drivers on this machine)"
    if [[ "$MODE" == netns ]]; then
        echo "MLflow for the nodes      deploy/mlflow-server.sh up --host $HEAD_IP   (the bridge: host-only)"
    fi
    if [[ "${S3:-0}" == 1 ]]; then
        echo "S3 for every node         $(sed -n 's/^ENDPOINT=//p' "$run_dir/s3/s3.state" 2>/dev/null)   (deploy/s3-server.sh --run-dir $run_dir/s3; bucket s3://inpaint)"
    fi
    echo "use it from a shell       source $run_dir/cluster.env   (RAY_ADDRESS, the job server, the auth token)"
}

# ---------------------------------------------------------------------------------------------
# status, env, down

status() {
    load_state
    local pids alive
    pids="$(marked_pids "INPAINT_CLUSTER=$CLUSTER_ID" | wc -l)"
    alive="$(api_nodes)"
    echo "cluster $CLUSTER_ID ($MODE): $alive of $NODES nodes alive, $pids processes"
    print_addresses
    [[ "$alive" == "$NODES" ]]
}

down() {
    if [[ ! -f "$state" ]]; then
        echo "no cluster in $run_dir: nothing to stop"
        return 0
    fi
    # shellcheck disable=SC1090
    source "$state"
    local count left
    count="$(stop_marked "INPAINT_CLUSTER=$CLUSTER_ID")"
    left="$(marked_pids "INPAINT_CLUSTER=$CLUSTER_ID" | tr '\n' ' ')"
    [[ "${S3:-0}" != 1 ]] || "$HERE/s3-server.sh" down --run-dir "$run_dir/s3" >/dev/null || left+="(the S3 server) "
    if [[ "$MODE" == netns ]]; then
        for ns in $NAMESPACES; do ip netns del "$ns" 2>/dev/null || true; done
        [[ -z "$BRIDGE" ]] || ip link del "$BRIDGE" 2>/dev/null || true
    fi
    [[ "$keep_logs" == 1 ]] || rm -rf "$TEMP_ROOT"
    [[ -z "$left" ]] || die "processes $left of cluster $CLUSTER_ID are still running"
    rm -f "$state" "$run_dir/cluster.env" "$run_dir/auth_token"
    echo "Ray cluster $CLUSTER_ID down: $count processes stopped$([[ "$MODE" == netns ]] && echo ", namespaces and bridge removed")"
}

case "$cmd" in
up) up ;;
down) down ;;
status) status ;;
env)
    [[ -f "$run_dir/cluster.env" ]] || die "no cluster in $run_dir (start one with deploy/local-cluster.sh up)"
    grep '^export' "$run_dir/cluster.env"
    ;;
-h | --help) usage ;;
*) echo "error: unknown command $cmd" >&2; usage ;;
esac
