#!/usr/bin/env bash
# A real S3-compatible server on this machine (moto's server mode), for the tests and for trying object storage out.
#
#   deploy/s3-server.sh up [--host H] [--port P] [--bucket NAME]... [--run-dir DIR]
#   deploy/s3-server.sh status [--run-dir DIR]
#   deploy/s3-server.sh env    [--run-dir DIR]     # the export lines (endpoint, credentials), for eval "$(...)"
#   deploy/s3-server.sh down   [--run-dir DIR]
#
# Defaults: 127.0.0.1:9200, one bucket `inpaint`, the run folder $INPAINT_S3_DIR or runs/s3. `up` makes an access
# key of its own, and from then on the server checks every request's signature (wrong credentials are refused, as
# on AWS); s3.env (mode 600) holds AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION.
# The objects live in the server's memory: `down` drops them. pip install -e ".[dev]" brings moto[server].
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
# shellcheck source=deploy/lib.sh
source "$HERE/lib.sh"

usage() {
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

cmd="${1:-}"
[[ -n "$cmd" ]] || usage
shift
host=127.0.0.1
port=9200
buckets=()
run_dir="${INPAINT_S3_DIR:-$REPO/runs/s3}"
while [[ $# -gt 0 ]]; do
    case "$1" in
    --host) host="$(value "$@")"; shift 2 ;;
    --port) port="$(value "$@")"; shift 2 ;;
    --bucket) buckets+=("$(value "$@")"); shift 2 ;;
    --run-dir) run_dir="$(value "$@")"; shift 2 ;;
    -h | --help) usage ;;
    *) echo "error: unknown option $1" >&2; usage ;;
    esac
done
[[ ${#buckets[@]} -gt 0 ]] || buckets=(inpaint)
state="$run_dir/s3.state"

load_state() {
    [[ -f "$state" ]] || die "no S3 server in $run_dir (start one with deploy/s3-server.sh up)"
    # shellcheck disable=SC1090
    source "$state"
}

up() {
    local moto_bin python_bin
    moto_bin="$(command -v moto_server)" || die "no moto_server command: pip install -e \".[dev]\" (moto[server]) in the project's environment"
    python_bin="$(command -v python)" || die "no python: activate the project's environment (. .venv/bin/activate)"
    command -v curl >/dev/null || die "no curl: apt-get install curl"
    local name
    for name in "${buckets[@]}"; do
        [[ "$name" =~ ^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$ ]] || die "--bucket $name is not a valid S3 bucket name (3-63 of a-z, 0-9, . and -)"
    done
    if [[ -f "$state" ]]; then
        # shellcheck disable=SC1090
        source "$state"
        [[ -z "$(marked_pids "INPAINT_S3=$SERVER_ID")" ]] ||
            die "an S3 server is already up from $run_dir ($ENDPOINT): deploy/s3-server.sh down first"
    fi
    if [[ "$host" != 127.* && "$host" != localhost ]] && command -v ip >/dev/null && ! ip -4 addr show | grep -q "inet $host/"; then
        stale_cluster_address "$host" && die "no address $host on this machine: start the cluster first (deploy/local-cluster.sh up)"
        die "no address $host on this machine: --host takes one of its own addresses (ip -4 addr)"
    fi
    [[ "$host" != 0.0.0.0 ]] || die "--host 0.0.0.0 would open the test server to every machine: give the address the nodes use"
    port_in_use "$port" "$host" && die "port $port is taken on $host: pick another with --port"
    mkdir -p "$run_dir"
    run_dir="$(cd "$run_dir" && pwd)"
    state="$run_dir/s3.state"
    SERVER_ID="$(python3 -c 'import secrets; print(secrets.token_hex(3))')"
    ENDPOINT="http://$host:$port" BUCKETS="${buckets[*]}"
    printf 'SERVER_ID=%q\nENDPOINT=%q\nBUCKETS=%q\n' "$SERVER_ID" "$ENDPOINT" "${buckets[*]}" >"$state"

    local started=$SECONDS
    # The first requests (the user, its policy, its key, the buckets) go unsigned; every later one must be signed
    # with the key made here, as on AWS.
    INPAINT_S3="$SERVER_ID" INITIAL_NO_AUTH_ACTION_COUNT="$((3 + ${#buckets[@]}))" \
        setsid nohup "$moto_bin" -H "$host" -p "$port" >"$run_dir/server.log" 2>&1 </dev/null &
    for _ in $(seq 1 120); do
        http_ok "$ENDPOINT/moto-api/data.json" && break
        if [[ -z "$(marked_pids "INPAINT_S3=$SERVER_ID")" ]]; then
            tail -n 20 "$run_dir/server.log" >&2
            rm -f "$state"
            die "the S3 server exited at start (log: $run_dir/server.log)"
        fi
        sleep 0.25
    done
    http_ok "$ENDPOINT/moto-api/data.json" || {
        "$0" down --run-dir "$run_dir" >/dev/null 2>&1 || true
        die "the S3 server did not answer on $ENDPOINT within 30 s (log: $run_dir/server.log)"
    }
    # the key goes straight into s3.env (mode 600), never onto a command line or the terminal
    if ! (umask 077 && ENDPOINT="$ENDPOINT" "$python_bin" - "${buckets[@]}" >"$run_dir/s3.env" <<'EOF'
import os, sys, boto3
endpoint = os.environ["ENDPOINT"]
unsigned = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
iam = boto3.client("iam", **unsigned)
iam.create_user(UserName="inpaint")
policy = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'
iam.put_user_policy(UserName="inpaint", PolicyName="inpaint-all", PolicyDocument=policy)
key = iam.create_access_key(UserName="inpaint")["AccessKey"]
s3 = boto3.client("s3", **unsigned)
for bucket in sys.argv[1:]:
    s3.create_bucket(Bucket=bucket)
print("# source this file (or eval \"$(deploy/s3-server.sh env)\"): the S3 endpoint and its credentials (secret)")
print(f"export AWS_ENDPOINT_URL={endpoint}")
print(f"export AWS_ACCESS_KEY_ID={key['AccessKeyId']}")
print(f"export AWS_SECRET_ACCESS_KEY={key['SecretAccessKey']}")
print("export AWS_DEFAULT_REGION=us-east-1")
print("export AWS_EC2_METADATA_DISABLED=true")  # no instance role to ask for on this machine
EOF
    ); then
        "$0" down --run-dir "$run_dir" >/dev/null 2>&1 || true
        die "the S3 server did not take its user, key and buckets (log: $run_dir/server.log)"
    fi
    echo "S3 server up in $((SECONDS - started)) s"
    print_addresses
}

print_addresses() {
    echo "endpoint              $ENDPOINT   (moto; signed requests only)"
    echo "buckets               $(sed -E 's/(^| )/\1s3:\/\//g' <<<"$BUCKETS")"
    echo "use it from a shell   source $run_dir/s3.env   (AWS_ENDPOINT_URL and the credentials)"
}

status() {
    load_state
    local pids
    pids="$(marked_pids "INPAINT_S3=$SERVER_ID" | wc -l)"
    local host="${ENDPOINT#http://}"
    if ! stale_cluster_address "${host%:*}" && http_ok "$ENDPOINT/moto-api/data.json"; then
        echo "S3 server $SERVER_ID: up at $ENDPOINT, $pids processes"
    else
        echo "S3 server $SERVER_ID: not answering at $ENDPOINT, $pids processes"
        return 1
    fi
}

down() {
    if [[ ! -f "$state" ]]; then
        echo "no S3 server in $run_dir: nothing to stop"
        return 0
    fi
    # shellcheck disable=SC1090
    source "$state"
    local count left
    count="$(stop_marked "INPAINT_S3=$SERVER_ID")"
    left="$(marked_pids "INPAINT_S3=$SERVER_ID" | tr '\n' ' ')"
    [[ -z "$left" ]] || die "processes $left of the S3 server $SERVER_ID are still running"
    rm -f "$state" "$run_dir/s3.env"
    echo "S3 server $SERVER_ID down: $count processes stopped (its objects, kept in memory, are gone)"
}

case "$cmd" in
up) up ;;
down) down ;;
status) status ;;
env)
    [[ -f "$run_dir/s3.env" ]] || die "no S3 server in $run_dir (start one with deploy/s3-server.sh up)"
    grep '^export' "$run_dir/s3.env"
    ;;
-h | --help) usage ;;
*) echo "error: unknown command $cmd" >&2; usage ;;
esac
