#!/usr/bin/env bash
# The MLflow tracking server that every node and the browser use: runs, metrics, artifacts, the model registry.
#
#   deploy/mlflow-server.sh up [--host H] [--port P] [--backend-store-uri URI] [--artifacts URI]
#                              [--run-dir DIR] [-- more `mlflow server` options]
#   deploy/mlflow-server.sh status [--run-dir DIR]
#   deploy/mlflow-server.sh env    [--run-dir DIR]     # the export line, for eval "$(...)"
#   deploy/mlflow-server.sh down   [--run-dir DIR]
#
# Defaults: 127.0.0.1:5050, a SQLite database and an artifact folder in the run folder (runs/mlflow).
# Artifacts go through the server (--serve-artifacts): nodes and browsers need only its HTTP address.
# Production: --backend-store-uri postgresql://USER@HOST/DB (pip install -e .[postgres]) and
# --artifacts s3://BUCKET/PATH (alias --artifacts-destination; boto3, and the AWS_* variables in this shell: the
# server alone talks to the bucket, checked before it starts). --host 0.0.0.0 opens it to every machine that reaches this
# one, with no login: see deploy/README.md before doing that.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
# shellcheck source=deploy/lib.sh
source "$HERE/lib.sh"

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

cmd="${1:-}"
[[ -n "$cmd" ]] || usage
shift
host=127.0.0.1
port=5050
backend=""
artifacts=""
run_dir="${INPAINT_MLFLOW_DIR:-$REPO/runs/mlflow}"
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
    --host) host="$(value "$@")"; shift 2 ;;
    --port) port="$(value "$@")"; shift 2 ;;
    --backend-store-uri) backend="$(value "$@")"; shift 2 ;;
    --artifacts | --artifacts-destination) artifacts="$(value "$@")"; shift 2 ;;
    --run-dir) run_dir="$(value "$@")"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h | --help) usage ;;
    *) echo "error: unknown option $1" >&2; usage ;;
    esac
done
state="$run_dir/mlflow.state"

load_state() {
    [[ -f "$state" ]] || die "no MLflow server in $run_dir (start one with deploy/mlflow-server.sh up)"
    # shellcheck disable=SC1090
    source "$state"
}

up() {
    local mlflow_bin
    mlflow_bin="$(command -v mlflow)" || die "no mlflow command: activate the project's environment (. .venv/bin/activate)"
    command -v curl >/dev/null || die "no curl: apt-get install curl"
    if [[ -f "$state" ]]; then
        # shellcheck disable=SC1090
        source "$state"
        [[ -z "$(marked_pids "INPAINT_MLFLOW=$SERVER_ID")" ]] ||
            die "an MLflow server is already up from $run_dir ($TRACKING_URI): deploy/mlflow-server.sh down first"
    fi
    local probe="$host"
    [[ "$host" == 0.0.0.0 ]] && probe=127.0.0.1
    if [[ "$host" != 0.0.0.0 && "$host" != 127.* && "$host" != localhost ]] && command -v ip >/dev/null &&
        ! ip -4 addr show | grep -q "inet $host/"; then
        stale_cluster_address "$host" && die "no address $host on this machine: start the cluster first (deploy/local-cluster.sh up)"
        die "no address $host on this machine: --host takes one of its own addresses (ip -4 addr), or 0.0.0.0"
    fi
    port_in_use "$port" "$probe" && die "port $port is taken on $probe: pick another with --port"
    if [[ "$artifacts" == *://* && "$artifacts" != file://* ]]; then # the server reads and writes the bucket itself
        if [[ "$artifacts" == s3://* ]]; then
            "$(dirname "$mlflow_bin")/python" -c 'import boto3' 2>/dev/null ||
                die "MLflow needs boto3 to serve artifacts from $artifacts: pip install boto3 (pip install -e \".[dev]\" has it)"
        fi
        local problem
        problem="$("$(dirname "$mlflow_bin")/python" -m inpaint.storage check "$artifacts" 2>&1)" ||
            die "${problem#error: } (the artifacts of --artifacts)"
    fi
    mkdir -p "$run_dir"
    run_dir="$(cd "$run_dir" && pwd)"
    state="$run_dir/mlflow.state"
    backend="${backend:-sqlite:///$run_dir/mlflow.db}"
    artifacts="${artifacts:-$run_dir/artifacts}"
    SERVER_ID="$(python3 -c 'import secrets; print(secrets.token_hex(3))')"
    TRACKING_URI="http://$probe:$port" BACKEND="$backend" ARTIFACTS="$artifacts"
    if [[ "$host" == 0.0.0.0 ]]; then
        echo "warning: --host 0.0.0.0: anyone who reaches this machine on port $port can read, change and delete" \
            "every run and model, with no login (see deploy/README.md)" >&2
    fi
    (umask 077 && printf 'SERVER_ID=%q\nTRACKING_URI=%q\nBACKEND=%q\nARTIFACTS=%q\n' \
        "$SERVER_ID" "$TRACKING_URI" "$backend" "$artifacts" >"$state") # the backend URI may hold a password

    # The UI's own requests carry its origin, which MLflow's CORS check allows for localhost only: a server
    # on another address (the cluster's bridge) must allow its own origin, or the UI shows no runs.
    if [[ "$host" != 127.0.0.1 && "$host" != 0.0.0.0 && " ${extra[*]} " != *" --cors-allowed-origins "* ]]; then
        extra+=(--cors-allowed-origins "http://$host:$port,http://127.0.0.1:$port,http://localhost:$port")
    fi

    local started=$SECONDS
    # One worker and no job runner: MLflow 3's defaults (4 workers, a Huey job runner) take 13 s to start
    # here instead of 5-6 s, for nothing this project uses.
    # An S3-compatible store's endpoint (MinIO, deploy/s3-server.sh): MLflow's own variable, from the AWS one
    local -a store_env=()
    local endpoint="${MLFLOW_S3_ENDPOINT_URL:-${AWS_ENDPOINT_URL_S3:-${AWS_ENDPOINT_URL:-}}}"
    [[ -z "$endpoint" ]] || store_env=(MLFLOW_S3_ENDPOINT_URL="$endpoint")
    # shellcheck disable=SC2097,SC2098
    INPAINT_MLFLOW="$SERVER_ID" MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true \
        env "${store_env[@]}" setsid nohup "$mlflow_bin" server \
        --host "$host" --port "$port" --workers 1 \
        --backend-store-uri "$backend" \
        --serve-artifacts --artifacts-destination "$artifacts" \
        "${extra[@]}" >"$run_dir/server.log" 2>&1 </dev/null &
    for _ in $(seq 1 120); do
        http_ok "$TRACKING_URI/health" && break
        if [[ -z "$(marked_pids "INPAINT_MLFLOW=$SERVER_ID")" ]]; then
            tail -n 20 "$run_dir/server.log" >&2
            rm -f "$state"
            die "the MLflow server exited at start (log: $run_dir/server.log)"
        fi
        sleep 0.5
    done
    if ! http_ok "$TRACKING_URI/health"; then
        "$0" down --run-dir "$run_dir" >/dev/null 2>&1 || true
        die "the MLflow server did not answer on $TRACKING_URI within 60 s (log: $run_dir/server.log)"
    fi
    echo "export MLFLOW_TRACKING_URI=$TRACKING_URI" >"$run_dir/mlflow.env"
    echo "MLflow server up in $((SECONDS - started)) s"
    print_addresses
}

print_addresses() {
    echo "tracking URI and UI   $TRACKING_URI"
    echo "backend store         $(sed -E 's#://[^/@]*@#://***@#' <<<"$BACKEND")   (credentials hidden)"
    echo "artifacts             $(sed -E 's#://[^/@]*@#://***@#' <<<"$ARTIFACTS") (served through the server)"
    echo "use it from a shell   source $run_dir/mlflow.env   (MLFLOW_TRACKING_URI)"
}

status() {
    load_state
    local pids host="${TRACKING_URI#http://}"
    pids="$(marked_pids "INPAINT_MLFLOW=$SERVER_ID" | wc -l)"
    if ! stale_cluster_address "${host%:*}" && http_ok "$TRACKING_URI/health"; then
        echo "MLflow server $SERVER_ID: up at $TRACKING_URI, $pids processes"
    else
        echo "MLflow server $SERVER_ID: not answering at $TRACKING_URI, $pids processes"
        return 1
    fi
}

down() {
    if [[ ! -f "$state" ]]; then
        echo "no MLflow server in $run_dir: nothing to stop"
        return 0
    fi
    # shellcheck disable=SC1090
    source "$state"
    local count left
    count="$(stop_marked "INPAINT_MLFLOW=$SERVER_ID")"
    left="$(marked_pids "INPAINT_MLFLOW=$SERVER_ID" | tr '\n' ' ')"
    [[ -z "$left" ]] || die "processes $left of the MLflow server $SERVER_ID are still running"
    rm -f "$state" "$run_dir/mlflow.env"
    if [[ "$ARTIFACTS" == *://* ]]; then
        echo "MLflow server $SERVER_ID down: $count processes stopped (runs stay in $run_dir, artifacts in $ARTIFACTS)"
    else
        echo "MLflow server $SERVER_ID down: $count processes stopped (runs and artifacts stay in $run_dir)"
    fi
}

case "$cmd" in
up) up ;;
down) down ;;
status) status ;;
env)
    [[ -f "$run_dir/mlflow.env" ]] || die "no MLflow server in $run_dir (start one with deploy/mlflow-server.sh up)"
    cat "$run_dir/mlflow.env"
    ;;
-h | --help) usage ;;
*) echo "error: unknown command $cmd" >&2; usage ;;
esac
