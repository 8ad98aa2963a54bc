#!/usr/bin/env bash
# Restart the nodes of a Charon cluster one at a time, without dropping users.
#
# Usage:
#   deploy/rolling-restart.sh --endpoint URL --token-file FILE \
#       [--deadline 30s] [--spread 10s] [--timeout 10m] \
#       --restart-cmd 'CMD {node}' NODE...
#
# For each NODE, in the order given:
#   1. check: NODE is a member, and no other live member is draining or
#      drained (one node out of service at a time);
#   2. `charonctl node drain NODE --deadline D --spread S --wait`: /readyz
#      says 503 (load balancers stop sending), the listeners close, open
#      HTTP connections end, WebSocket tunnels get Close 1001 from the
#      deadline on, spread over S;
#   3. run the restart command with every {node} replaced by NODE. It must
#      return once the process was told to restart, e.g.
#        'systemctl restart charon@{node}'
#        'kill -TERM $(cat /run/charon/{node}.pid)'   (under a supervisor)
#      A drained node exits at once on SIGTERM, and starts again drained;
#   4. wait until NODE is live again as a new process (a new gossip
#      generation in `charonctl cluster members`) and `charonctl cluster
#      status` says converged (it has caught up on the writes it missed);
#   5. `charonctl node undrain NODE`, then wait until `charonctl node status
#      NODE` says serving;
# and print one line per node with how long each step took.
#
# Options:
#   --endpoint URL     gRPC API of a node (charonctl's --endpoint). Repeat it
#                      to give several: for each NODE the first endpoint that
#                      is not NODE itself is used, so one run can roll the
#                      whole cluster. An endpoint that is NODE is refused: it
#                      goes away during the restart.
#   --token-file FILE  file holding an API bearer token
#   --deadline DUR     when the drained node's tunnels get Close 1001 (30s)
#   --spread DUR       tunnel closes spread over this long (10s; at least 1s)
#   --timeout DUR      the most each node may take from drain to serving
#                      (10m)
#   --restart-cmd CMD  run with `bash -c` after {node} is replaced by NODE
#   -h, --help         this text
# DUR is a number and a unit (ms, s, m, h): 90s, 5m, 1m30s.
# NODE is a name or id as `charonctl cluster members` lists them (letters,
# digits, '.', '_', '-': it goes into a shell command).
#
# Env:   CHARONCTL   the charonctl binary (default: charonctl on PATH)
# Needs: jq, and timeout (coreutils).
# Exit:  0 every node restarted and serving; 1 a step failed: the script
#        stops there and leaves that node as it was (drained, so that it
#        takes no traffic: look at it, then `charonctl node undrain NODE`);
#        2 usage error.
set -euo pipefail

prog=rolling-restart
charonctl="${CHARONCTL:-charonctl}"
endpoints=() token_file="" deadline=30s spread=10s timeout=10m restart_cmd="" nodes=()

# The comment block at the top of this file.
usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }
die_usage() {
    echo "$prog: $*" >&2
    echo "usage: $0 --endpoint URL --token-file FILE [--deadline 30s] [--spread 10s]" \
        "[--timeout 10m] --restart-cmd 'CMD {node}' NODE... (see --help)" >&2
    exit 2
}
log() { echo "$prog: $*" >&2; }
fail() {
    echo "$prog: FAILED: $*" >&2
    exit 1
}

# Milliseconds since the epoch, in $now (no subshell).
clock() {
    local t=${EPOCHREALTIME/[.,]/}
    now=$((t / 1000))
}

# A duration (90s, 5m, 1m30s, 500ms, 1h) in milliseconds, in $dur_ms.
parse_duration() {
    local rest=$1 n unit
    dur_ms=0
    [[ $rest =~ ^([0-9]+(ms|s|m|h))+$ ]] || return 1
    while [[ $rest =~ ^([0-9]+)(ms|s|m|h)(.*)$ ]]; do
        n=$((10#${BASH_REMATCH[1]}))
        unit=${BASH_REMATCH[2]}
        rest=${BASH_REMATCH[3]}
        case $unit in
            ms) dur_ms=$((dur_ms + n)) ;;
            s) dur_ms=$((dur_ms + n * 1000)) ;;
            m) dur_ms=$((dur_ms + n * 60000)) ;;
            h) dur_ms=$((dur_ms + n * 3600000)) ;;
        esac
    done
}

# 1234 -> "1.2s"
secs() { printf '%d.%ds' $(($1 / 1000)) $((($1 % 1000) / 100)); }

while (($#)); do
    case $1 in
        --endpoint | --token-file | --deadline | --spread | --timeout | --restart-cmd)
            (($# >= 2)) || die_usage "$1 needs a value"
            case $1 in
                --endpoint) endpoints+=("$2") ;;
                --token-file) token_file=$2 ;;
                --deadline) deadline=$2 ;;
                --spread) spread=$2 ;;
                --timeout) timeout=$2 ;;
                --restart-cmd) restart_cmd=$2 ;;
            esac
            shift
            ;;
        --endpoint=* | --token-file=* | --deadline=* | --spread=* | --timeout=* | --restart-cmd=*)
            die_usage "write '${1%%=*} VALUE', not '${1%%=*}=VALUE'"
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        --)
            shift
            nodes+=("$@")
            break
            ;;
        -*) die_usage "unknown option $1" ;;
        *) nodes+=("$1") ;;
    esac
    shift
done

((${#endpoints[@]})) || die_usage "--endpoint is required"
[[ -n $token_file ]] || die_usage "--token-file is required"
[[ -n $restart_cmd ]] || die_usage "--restart-cmd is required"
((${#nodes[@]})) || die_usage "name at least one NODE"
[[ -r $token_file ]] || die_usage "cannot read the token file $token_file"
# charonctl takes whole seconds above 0 (0 would mean "the node's default").
if ! parse_duration "$deadline" || ((dur_ms == 0)); then
    die_usage "--deadline $deadline: not a duration above 0 like 30s or 1m30s"
fi
if ! parse_duration "$spread" || ((dur_ms == 0)); then
    die_usage "--spread $spread: not a duration above 0 like 10s"
fi
parse_duration "$timeout" || die_usage "--timeout $timeout: not a duration like 10m"
timeout_ms=$dur_ms
((timeout_ms > 0)) || die_usage "--timeout must be more than 0"
[[ $restart_cmd == *"{node}"* ]] ||
    log "warning: the restart command has no {node}: it is the same for every node"
for node in "${nodes[@]}"; do
    [[ $node =~ ^[A-Za-z0-9._-]+$ ]] ||
        die_usage "node '$node': only letters, digits, '.', '_' and '-' (it goes into a shell command)"
done
for tool in jq timeout; do
    command -v "$tool" >/dev/null 2>&1 || die_usage "$tool is required but not installed"
done
if ! command -v "$charonctl" >/dev/null 2>&1; then
    die_usage "charonctl not found ('$charonctl'); put it on PATH or set CHARONCTL"
fi

# charonctl against endpoint $ep; stderr passes through.
ctl() { "$charonctl" --endpoint "$ep" --token-file "$token_file" "$@"; }

# charonctl with its output captured in $out (stdout and stderr); returns
# its status. For polls, where one failed call is not yet a failure.
ctl_capture() {
    local status=0
    out=$("$charonctl" --endpoint "$ep" --token-file "$token_file" "$@" 2>&1) || status=$?
    return "$status"
}

# Deadline bookkeeping of the node being restarted: $left_ms, $left_s.
time_left() {
    clock
    left_ms=$((node_deadline - now))
    left_s=$(((left_ms + 999) / 1000))
    ((left_ms > 0))
}

# The poll interval of the waits below (not a wait for a condition: each
# wait polls its condition and is bounded by --timeout).
pause() { sleep 0.25; }

# Picks the endpoint for $node: the first one that answers and is not $node.
# Sets $ep and $members (that endpoint's `cluster members -o json`).
pick_endpoint() {
    local e self problems=""
    for e in "${endpoints[@]}"; do
        ep=$e
        if ! ctl_capture cluster members -o json; then
            problems+=$'\n'"  $e: ${out//$'\n'/ }"
            continue
        fi
        if ! self=$(jq -r '[.[] | select(.self)][0] | "\(.name) \(.node_id)"' <<<"$out"); then
            problems+=$'\n'"  $e: unexpected answer to cluster members: ${out:0:200}"
            continue
        fi
        if [[ " $self " == *" $node "* ]]; then
            problems+=$'\n'"  $e: is $node itself, which goes away during its restart"
            continue
        fi
        members=$out
        return 0
    done
    fail "no endpoint to restart $node through:$problems
  give an --endpoint of another node (repeat --endpoint to give several)"
}

# The member record of $node in $members (by name or id), or "".
member_of() {
    jq -c --arg n "$node" '[.[] | select(.name == $n or .node_id == $n)][0] // empty' <<<"$members"
}

total_start=0
clock
total_start=$now
restarted=0
for node in "${nodes[@]}"; do
    clock
    node_start=$now
    node_deadline=$((now + timeout_ms))

    # 1. Checks. The node restarted last is back in service by the word of
    # the endpoint that undrained it; the endpoint picked here may hear of
    # it a gossip round later, so a node out of service is waited for (up
    # to --timeout) before this one is refused.
    while :; do
        pick_endpoint
        record=$(member_of)
        [[ -n $record ]] || fail "$node is not a member of the cluster (as $ep sees it);" \
            "members: $(jq -r '[.[].name] | join(", ")' <<<"$members")"
        generation=$(jq -r '.generation' <<<"$record")
        node_id=$(jq -r '.node_id' <<<"$record")
        busy=$(jq -r --arg id "$node_id" \
            '.[] | select(.node_id != $id and .live and .status != "serving") | "\(.name) (\(.status))"' \
            <<<"$members")
        [[ -n $busy ]] || break
        time_left || fail "refusing to drain $node while other nodes are out of service: ${busy//$'\n'/, }"
        pause
    done
    dead=$(jq -r --arg id "$node_id" '.[] | select(.node_id != $id and (.live | not)) | .name' <<<"$members")
    [[ -z $dead ]] || log "warning: not live as $ep sees it: ${dead//$'\n'/, } (going on with $node)"
    log "$node: draining (deadline $deadline, spread $spread) via $ep"

    # 2. Drain and follow it.
    time_left || fail "$node: --timeout $timeout passed before the drain"
    status=0
    ctl node drain "$node" --deadline "$deadline" --spread "$spread" --wait \
        --wait-timeout "${left_s}s" >&2 || status=$?
    case $status in
        0) ;;
        4) fail "$node: still not drained after --timeout $timeout; it is left draining (the drain goes on)" ;;
        *) fail "$node: 'charonctl node drain --wait' failed (status $status, see above);" \
            "$node may be left draining: check 'charonctl node status $node'" ;;
    esac
    clock
    drained_at=$now

    # 3. Restart.
    cmd=$restart_cmd
    pattern='{node}'
    cmd=${cmd//"$pattern"/$node}
    log "$node: drained in $(secs $((drained_at - node_start))); restarting: $cmd"
    time_left || fail "$node: --timeout $timeout passed before the restart; it is left drained"
    status=0
    timeout "${left_s}s" bash -c "$cmd" >&2 || status=$?
    ((status == 0)) || fail "$node: the restart command failed (status $status): $cmd;" \
        "$node is left drained"
    clock
    restart_returned=$now

    # 4. Back as a new process, and caught up.
    back_at=0 why="no answer yet"
    while :; do
        if ctl_capture cluster members -o json; then
            members=$out
            record=$(member_of)
            if [[ -z $record ]]; then
                why="$node is not listed by $ep"
            elif [[ $(jq -r '.generation' <<<"$record") == "$generation" ]]; then
                why="$node has not restarted yet (still generation $generation)"
            elif [[ $(jq -r '.live' <<<"$record") != true ]]; then
                why="$node (new generation) is not live yet"
            else
                if ((back_at == 0)); then
                    clock
                    back_at=$now
                fi
                if ctl_capture cluster status; then
                    if [[ $out == converged* ]]; then
                        break
                    fi
                    why="${out%%$'\n'*}"
                else
                    why="cluster status: ${out//$'\n'/ }"
                fi
            fi
        else
            why="cluster members via $ep: ${out//$'\n'/ }"
        fi
        time_left || fail "$node: not back within --timeout $timeout after the restart: $why;" \
            "$node is left drained"
        pause
    done
    clock
    converged_at=$now
    new_generation=$(jq -r '.generation' <<<"$record")

    # 5. Back in service.
    if ! ctl_capture node undrain "$node"; then
        fail "$node: undrain failed: ${out//$'\n'/ }; $node is left drained"
    fi
    # Serving by its drain record (node status) and by its own word in
    # gossip (cluster members, which the next node's check reads): the
    # second lags the first by a replication and a gossip round.
    while :; do
        if ctl_capture node status "$node" -o json; then
            state=$(jq -r '"\(.status) \(.live)"' <<<"$out")
            if [[ $state == "serving true" ]]; then
                if ctl_capture cluster members -o json; then
                    members=$out
                    gossiped=$(member_of | jq -r '.status // "missing"')
                    [[ $gossiped == serving ]] && break
                    why="cluster members says $gossiped"
                else
                    why="cluster members: ${out//$'\n'/ }"
                fi
            else
                why="node status says ${state/ true/, live}"
                why=${why/ false/, not live}
            fi
        else
            why="node status: ${out//$'\n'/ }"
        fi
        time_left || fail "$node: not serving within --timeout $timeout after the undrain: $why"
        pause
    done
    clock
    restarted=$((restarted + 1))
    echo "$node: restarted in $(secs $((now - node_start))):" \
        "drain $(secs $((drained_at - node_start)))," \
        "restart $(secs $((back_at - drained_at)))" \
        "(command $(secs $((restart_returned - drained_at))))," \
        "catch-up $(secs $((converged_at - back_at)))," \
        "undrain $(secs $((now - converged_at)));" \
        "generation $generation -> $new_generation"
done
clock
echo "all $restarted node(s) restarted in $(secs $((now - total_start)))"
