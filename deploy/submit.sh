#!/usr/bin/env bash
# Submit a job to the Ray cluster with `ray job submit`, after checking that the head node, its job
# server and the MLflow server are there (one line naming the one that is not, exit 1).
#
#   deploy/submit.sh [--cluster-dir DIR] [--mlflow-dir DIR] [ray job submit options] -- python jobs/train.py ...
#   deploy/submit.sh -- python jobs/tune.py ...
#
# Addresses come from $RAY_ADDRESS (the head node, host:port), $RAY_API_SERVER_ADDRESS (its job server,
# http://host:port) and $MLFLOW_TRACKING_URI where set, else from the files that deploy/local-cluster.sh
# and deploy/mlflow-server.sh write in their run folders (default runs/cluster and runs/mlflow).
# The job ships this repository as its working_dir (files .gitignore names stay behind) and gets
# MLFLOW_TRACKING_URI as a runtime_env variable, on the driver and every worker.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
# shellcheck source=deploy/lib.sh
source "$HERE/lib.sh"

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

cluster_dir="${INPAINT_CLUSTER_DIR:-$REPO/runs/cluster}"
mlflow_dir="${INPAINT_MLFLOW_DIR:-$REPO/runs/mlflow}"
submit_opts=()
value() { # the value after an option, or a usage error
    [[ $# -ge 2 && -n "$2" ]] || { echo "error: $1 needs a value" >&2; exit 2; }
    echo "$2"
}
while [[ $# -gt 0 ]]; do
    case "$1" in
    --cluster-dir) cluster_dir="$(value "$@")"; shift 2 ;;
    --mlflow-dir) mlflow_dir="$(value "$@")"; shift 2 ;;
    --) shift; break ;;
    -h | --help) usage ;;
    *) submit_opts+=("$1"); shift ;;
    esac
done
[[ $# -gt 0 ]] || { echo "error: no entrypoint: put the job's command after --" >&2; usage; }

# The cluster's addresses and auth token, unless this shell already names a cluster.
if [[ -z "${RAY_API_SERVER_ADDRESS:-}" && -f "$cluster_dir/cluster.env" ]]; then
    # shellcheck disable=SC1091
    source "$cluster_dir/cluster.env"
fi
if [[ -z "${MLFLOW_TRACKING_URI:-}" && -f "$mlflow_dir/mlflow.env" ]]; then
    # shellcheck disable=SC1091
    source "$mlflow_dir/mlflow.env"
fi
job_server="${RAY_API_SERVER_ADDRESS:-}"
if [[ -z "$job_server" && "${RAY_ADDRESS:-}" == http* ]]; then
    job_server="$RAY_ADDRESS"
fi

# 1. the head node (its GCS), when we know its address
if [[ -n "${RAY_ADDRESS:-}" && "$RAY_ADDRESS" != http* && "$RAY_ADDRESS" != auto ]]; then
    gcs="${RAY_ADDRESS#ray://}"
    ! stale_cluster_address "${gcs%:*}" ||
        die "no Ray head node at $gcs: that local cluster is down (deploy/local-cluster.sh up, then source its cluster.env)"
    port_in_use "${gcs##*:}" "${gcs%:*}" ||
        die "no Ray head node at $gcs: start the cluster (deploy/local-cluster.sh up) or set RAY_ADDRESS"
elif [[ -z "$job_server" ]]; then
    die "no Ray head node: none started in $cluster_dir and RAY_ADDRESS is not set (deploy/local-cluster.sh up)"
fi

# 2. the head node's job server (the dashboard)
[[ -n "$job_server" ]] || die "no Ray job server: set RAY_API_SERVER_ADDRESS=http://HEAD:DASHBOARD_PORT"
auth=()
if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" && -r "$RAY_AUTH_TOKEN_PATH" ]]; then
    auth=(-H "Authorization: Bearer $(cat "$RAY_AUTH_TOKEN_PATH")")
elif [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
    auth=(-H "Authorization: Bearer $RAY_AUTH_TOKEN")
fi
code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "${auth[@]}" "$job_server/api/version" || true)"
case "$code" in
2*) ;;
401 | 403) die "the Ray job server at $job_server refused the request (HTTP $code): give it the cluster's token" \
    "(source $cluster_dir/cluster.env, or set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH)" ;;
000) die "no Ray job server at $job_server (the head node's dashboard is not answering): start the cluster" \
    "(deploy/local-cluster.sh up) or set RAY_API_SERVER_ADDRESS" ;;
*) die "no Ray job server at $job_server (HTTP $code from /api/version): is it a Ray dashboard?" ;;
esac

# 3. the MLflow server, reachable from the nodes
uri="${MLFLOW_TRACKING_URI:-}"
[[ -n "$uri" ]] ||
    die "no MLflow server: none started in $mlflow_dir and MLFLOW_TRACKING_URI is not set (deploy/mlflow-server.sh up)"
[[ "$uri" == http://* || "$uri" == https://* ]] ||
    die "MLFLOW_TRACKING_URI=$uri is not an MLflow server: every node must reach it, start one (deploy/mlflow-server.sh up)"
service_host="${INPAINT_SERVICE_HOST:-127.0.0.1}"
if [[ "$service_host" != 127.0.0.1 && "$uri" =~ ^https?://(127\.|localhost[:/]|\[::1\]) ]]; then
    die "the MLflow server at $uri listens on this machine's loopback, which the nodes in their own network" \
        "namespaces cannot reach: start it with deploy/mlflow-server.sh up --host $service_host"
fi
mlflow_host="${uri#*://}"
mlflow_host="${mlflow_host%%[:/]*}"
! stale_cluster_address "$mlflow_host" ||
    die "no MLflow server at $uri: that address was a local cluster's, which is down (deploy/mlflow-server.sh up)"
http_ok "$uri/health" ||
    die "no MLflow server at $uri: start it (deploy/mlflow-server.sh up) or set MLFLOW_TRACKING_URI"

exec ray job submit --address "$job_server" --working-dir "$REPO" \
    --runtime-env-json "{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"$uri\"}}" \
    "${submit_opts[@]}" -- "$@"
