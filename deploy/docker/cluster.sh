#!/usr/bin/env bash
# The five-node, two-region Charon cluster of compose.yml, in one command.
#
# Usage: deploy/docker/cluster.sh COMMAND [ARGS]
#
#   up [--build]     build the images if missing (--build: rebuild them),
#                    write the secrets if missing, start everything and wait
#                    until the five nodes are live, converged and in the load
#                    balancer; then print where to reach them
#   down [-v]        stop and remove the containers and networks; -v also
#                    removes the data volumes (the nodes' stores)
#   status           containers, `charonctl cluster members`, `cluster
#                    status`, and the load balancer's view of the nodes
#   ctl ARGS...      charonctl inside a node (CHARON_CTL_NODE, default us1),
#                    e.g. `cluster.sh ctl host add app.example --upstream
#                    http://lb:8000 --wait`
#   logs [-f] [SERVICE...]   the containers' logs (eu1 ... us2, router, lb)
#   partition        cut the WAN: disconnect the router from the us network
#   heal             connect it again
#   build [ARGS]     deploy/docker/build.sh ARGS
#
# Env:
#   CHARON_PROJECT       compose project name, prefix of container names
#                        (default charon)
#   CHARON_NET           first two octets of the three /24 networks
#                        (default 10.213: 10.213.0.0/24 edge, .1 eu, .2 us)
#   CHARON_WAN_DELAY_MS  one-way delay between the regions (default 50)
#   CHARON_PUBLISH       1 (default): publish the lb ports on the host
#                        (compose.publish.yml); 0: do not
#   CHARON_PUBLISH_IP    host address of the published ports (127.0.0.1)
#   CHARON_SECRETS_DIR   where charon.env and admin.token are kept
#                        (default deploy/docker/.secrets)
#   CHARON_UP_TIMEOUT    seconds `up` waits for the cluster (default 180)
#   CHARON_BUILD_FLAGS   flags for build.sh when `up` builds (e.g. --debug)
#   any variable compose.yml reads (CHARON_LOG, CHARON_DRAIN_*...)
# Needs: docker with `docker compose` or `docker-compose`.
# Exit: 0 ok; 1 failure; 2 usage error.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prog=cluster.sh
project="${CHARON_PROJECT:-charon}"
net="${CHARON_NET:-10.213}"
secrets="${CHARON_SECRETS_DIR:-$here/.secrets}"
up_timeout="${CHARON_UP_TIMEOUT:-180}"
nodes=(eu1 eu2 eu3 us1 us2)

usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }
log() { echo "$prog: $*" >&2; }
die() {
    echo "$prog: $*" >&2
    exit 1
}
die_usage() {
    echo "$prog: $*" >&2
    echo "usage: $0 up|down|status|ctl|logs|partition|heal|build (see --help)" >&2
    exit 2
}

[[ $project =~ ^[a-z0-9][a-z0-9_-]*$ ]] ||
    die_usage "CHARON_PROJECT '$project': lower-case letters, digits, '_' and '-' only"
[[ $net =~ ^[0-9]{1,3}\.[0-9]{1,3}$ ]] || die_usage "CHARON_NET '$net': two octets, like 10.213"
secrets="$(mkdir -p "$secrets" && cd "$secrets" && pwd)"
export COMPOSE_PROJECT_NAME="$project" CHARON_NET="$net" CHARON_SECRETS_DIR="$secrets"

compose=()
find_compose() {
    if docker compose version >/dev/null 2>&1; then
        compose=(docker compose)
    elif command -v docker-compose >/dev/null 2>&1; then
        compose=(docker-compose)
    else
        die "neither 'docker compose' nor 'docker-compose' is installed" \
            "(Debian/Ubuntu: apt-get install docker-compose-plugin, or docker-compose)"
    fi
    compose+=(--project-name "$project" --project-directory "$here" -f "$here/compose.yml")
    if [[ ${CHARON_PUBLISH:-1} != 0 ]]; then
        compose+=(-f "$here/compose.publish.yml")
    fi
}

need_docker() {
    docker info >/dev/null 2>&1 || die "no Docker engine answers ('docker info' failed)"
}

# 24 random bytes as 48 hex characters.
random_hex() { od -An -tx1 -N24 /dev/urandom | tr -d ' \n'; }

ensure_secrets() {
    if [[ ! -s $secrets/charon.env ]]; then
        local cluster_secret admin_token
        cluster_secret=$(random_hex)
        admin_token=$(random_hex)
        chmod 0700 "$secrets"
        (
            umask 077
            printf '%s\n' "# Written by deploy/docker/cluster.sh; the nodes read it (env_file)." \
                "CHARON_CLUSTER_SECRET=$cluster_secret" \
                "CHARON_ADMIN_TOKEN=$admin_token" \
                "CHARON_TOKEN=$admin_token" >"$secrets/charon.env"
            printf '%s\n' "$admin_token" >"$secrets/admin.token"
        )
        log "wrote new secrets to $secrets (charon.env, admin.token)"
    fi
}

ensure_images() {
    local force=$1 missing=() image
    for image in "${CHARON_IMAGE:-charon:local}" "${CHARON_HAPROXY_IMAGE:-charon-haproxy:local}" \
        "${CHARON_ROUTER_IMAGE:-charon-router:local}"; do
        docker image inspect "$image" >/dev/null 2>&1 || missing+=("$image")
    done
    if ((force)) || ((${#missing[@]})); then
        ((force)) || log "building the missing images: ${missing[*]}"
        # shellcheck disable=SC2086 # CHARON_BUILD_FLAGS is a list of flags
        "$here/build.sh" ${CHARON_BUILD_FLAGS:-}
    fi
}

container() { echo "$project-$1"; }

# charonctl inside node $1.
ctl_in() {
    local node=$1
    shift
    docker exec -i "$(container "$node")" /usr/local/bin/charonctl "$@"
}

# One HTTP GET with bash's /dev/tcp: prints the status code (000 when it
# cannot connect). Args: address port path [Host header].
http_status() {
    local addr=$1 port=$2 path=$3 host=${4:-$1} line
    if ! exec 3<>"/dev/tcp/$addr/$port" 2>/dev/null; then
        echo 000
        return
    fi
    printf 'GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$path" "$host" >&3
    if IFS= read -r -t 5 line <&3; then
        line=${line#HTTP/1.? }
        echo "${line:0:3}"
    else
        echo 000
    fi
    exec 3<&- 3>&-
}

# The body of GET path on addr:port (the HAProxy stats CSV is small).
http_body() {
    local addr=$1 port=$2 path=$3 body
    exec 3<>"/dev/tcp/$addr/$port" 2>/dev/null || return 1
    printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$path" "$addr" >&3
    body=$(timeout 5 cat <&3 || true)
    exec 3<&- 3>&-
    printf '%s\n' "${body#*$'\r\n\r\n'}"
}

lb_addr() { echo "$net.0.2"; }

# "eu1 UP" lines: the load balancer's view of the nodes (backend nodes_http).
lb_view() {
    http_body "$(lb_addr)" 8404 '/;csv' | awk -F, '$1 == "nodes_http" && $2 != "BACKEND" { print $2, $18 }'
}

cmd_up() {
    local build=0
    while (($#)); do
        case $1 in
            --build) build=1 ;;
            *) die_usage "up: unknown argument '$1'" ;;
        esac
        shift
    done
    need_docker
    find_compose
    ensure_secrets
    ensure_images "$build"
    local start=$SECONDS
    log "starting ${nodes[*]}, router and lb (project $project, networks $net.{0,1,2}.0/24)"
    "${compose[@]}" up -d --remove-orphans
    local deadline=$((SECONDS + up_timeout)) why="" out up
    while :; do
        if out=$(ctl_in eu1 cluster status -o json 2>&1); then
            if [[ $(jq -r '[.converged, ([.members[] | select(.live)] | length)] | "\(.[0]) \(.[1])"' <<<"$out" 2>/dev/null) == "true 5" ]]; then
                up=$(lb_view | awk '$2 == "UP"' | wc -l)
                ((up == 5)) && break
                why="the load balancer sees $up of 5 nodes up"
            else
                why="cluster status: $(jq -c '{converged, live: [.members[] | select(.live) | .name]}' <<<"$out" 2>/dev/null || echo "$out")"
            fi
        else
            why="eu1: ${out//$'\n'/ }"
        fi
        ((SECONDS < deadline)) || {
            "${compose[@]}" ps >&2 || true
            die "the cluster was not up within ${up_timeout}s: $why (see: $0 logs)"
        }
        sleep 0.5
    done
    log "cluster up in $((SECONDS - start))s: 5 nodes live and converged, 5 in the load balancer"
    if docker logs "$(container router)" 2>&1 | grep -q 'netem unavailable'; then
        log "warning: this kernel has no tc netem: the regions are joined WITHOUT the WAN delay"
    fi
    endpoints
}

endpoints() {
    local ip
    if [[ ${CHARON_PUBLISH:-1} != 0 ]]; then
        ip=${CHARON_PUBLISH_IP:-127.0.0.1}
    else
        ip=$(lb_addr)
    fi
    cat <<EOF
  load balancer    http://$ip:8080  (https://$ip:8443, statistics http://$ip:8404/)
  gRPC API         eu1 $ip:7071  eu2 $ip:7072  eu3 $ip:7073  us1 $ip:7074  us2 $ip:7075
  node HTTP        eu1 $ip:8081 ... us2 $ip:8085;  /readyz: $ip:9091 ... $ip:9095
  charonctl        $0 ctl cluster members
                   charonctl --endpoint http://$ip:7074 --token-file $secrets/admin.token cluster status
  demo upstream    http://lb:8000 (as the nodes see it)
EOF
}

cmd_down() {
    local flags=(--remove-orphans)
    while (($#)); do
        case $1 in
            -v | --volumes) flags+=(--volumes) ;;
            *) die_usage "down: unknown argument '$1'" ;;
        esac
        shift
    done
    need_docker
    find_compose
    "${compose[@]}" down "${flags[@]}"
}

cmd_status() {
    need_docker
    find_compose
    "${compose[@]}" ps
    echo
    ctl_in "${CHARON_CTL_NODE:-us1}" cluster members || true
    echo
    ctl_in "${CHARON_CTL_NODE:-us1}" cluster status || true
    echo
    echo "load balancer (backend nodes_http):"
    lb_view | sed 's/^/  /' || true
    if docker logs "$(container router)" 2>&1 | grep -q 'netem unavailable'; then
        echo "WAN delay: not injected (this kernel has no tc netem)"
    else
        echo "WAN delay: ${CHARON_WAN_DELAY_MS:-50} ms one way (router: $(docker logs "$(container router)" 2>&1 | grep -c 'netem)') interfaces)"
    fi
}

# The name of compose network $1 (eu or us) and the router's address on it.
router_net() {
    local name="${project}_$1" subnet
    subnet=$(docker network inspect -f '{{range .IPAM.Config}}{{.Subnet}}{{end}}' "$name") ||
        die "network $name not found: is the cluster up?"
    router_ip="${subnet%.*}.254"
    net_name=$name
}

cmd_partition() {
    need_docker
    router_net us
    docker network disconnect "$net_name" "$(container router)"
    log "partitioned: the router left $net_name; eu and us cannot reach each other"
}

cmd_heal() {
    need_docker
    router_net us
    docker network connect --ip "$router_ip" "$net_name" "$(container router)"
    log "healed: the router is back on $net_name ($router_ip)"
}

(($#)) || die_usage "name a command"
command=$1
shift
case $command in
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    status) cmd_status ;;
    ctl)
        need_docker
        ctl_in "${CHARON_CTL_NODE:-us1}" "$@"
        ;;
    logs)
        need_docker
        find_compose
        "${compose[@]}" logs "$@"
        ;;
    partition) cmd_partition ;;
    heal) cmd_heal ;;
    build) exec "$here/build.sh" "$@" ;;
    endpoints) endpoints ;;
    -h | --help) usage ;;
    *) die_usage "unknown command '$command'" ;;
esac
