# Helpers shared by the deploy/ scripts (sourced, not run).

die() {
    echo "error: $*" >&2
    exit 1
}

stale_cluster_address() { # host: a local cluster's bridge address (10.213.X.Y) that this machine no longer has
    # Connecting there would leave through the default route: never try it.
    [[ "$1" == 10.213.* ]] || return 1
    ! ip -4 addr show 2>/dev/null | grep -q "inet ${1%.*}\."
}

port_in_use() { # port [host]: does something accept connections there (from this network namespace)?
    (exec 3<>"/dev/tcp/${2:-127.0.0.1}/$1") 2>/dev/null
}

marked_pids() { # NAME=VALUE: the processes whose environment carries NAME=VALUE, and all their descendants
    # (Ray's workers and dashboard modules write their title over /proc/PID/environ: they are found as children)
    local seeds
    seeds="$(grep -lzx -- "$1" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 | tr '\n' ' ' || true)"
    [[ -n "$seeds" ]] || return 0
    ps -eo pid=,ppid= | awk -v seeds="$seeds" -v self="$$" '
        { parent[$1] = $2 }
        END {
            n = split(seeds, s, " "); for (i = 1; i <= n; i++) keep[s[i]] = 1
            do { grew = 0; for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; grew = 1 } } while (grew)
            for (p in keep) if ((p in parent) && p != self) print p
        }'
}

stop_marked() { # NAME=VALUE: SIGTERM those processes, SIGKILL what is left after 5 s; prints how many there were
    # (Ray's GCS server and autoscaler monitor outlive a SIGTERM by far more than that; they keep no state to save)
    local pids count
    pids="$(marked_pids "$1")"
    count="$(grep -c . <<<"$pids" || true)"
    # shellcheck disable=SC2086
    [[ -z "$pids" ]] || kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 25); do
        pids="$(marked_pids "$1")"
        [[ -z "$pids" ]] && break
        sleep 0.2
    done
    # shellcheck disable=SC2086
    [[ -z "$pids" ]] || { kill -KILL $pids 2>/dev/null || true; sleep 0.3; }
    echo "$count"
}

http_ok() { # url [curl options...]: does it answer 2xx within 5 s?
    local url="$1"
    shift
    curl -fsS -o /dev/null --max-time 5 "$@" "$url" 2>/dev/null
}

value() { # the value after an option, or a usage error
    [[ $# -ge 2 && -n "$2" ]] || { echo "error: $1 needs a value" >&2; exit 2; }
    echo "$2"
}
