#!/bin/sh
# The WAN router of the compose cluster (image charon-router, run as
# /usr/local/bin/charon-router). POSIX sh: the image has dash, not bash.
#
# Every region network is created with com.docker.network.bridge.inhibit_ipv4,
# so its gateway address (x.y.z.1) is not on the host's bridge: this router
# takes it, on every network it is attached to, and the nodes' default route
# goes through it. Traffic inside a region stays on its bridge; traffic
# between regions crosses the router, where the WAN delay is added.
#
# Every 0.5 s it makes sure that:
#   - each interface holds its network's gateway address (x.y.z.1/len), so
#     `docker network disconnect` + `connect` (a partition and its healing)
#     needs nothing else;
#   - with WAN_DELAY_MS > 0, each interface has a netem qdisc adding that
#     delay (and WAN_JITTER_MS) to every packet leaving it: one-way delay
#     WAN_DELAY_MS between the regions, round trip twice that.
# When the kernel has no sch_netem, it says so once per interface and goes
# on routing without delay.
#
# Env: WAN_DELAY_MS (default 0), WAN_JITTER_MS (default 0).
set -u

delay=${WAN_DELAY_MS:-0}
jitter=${WAN_JITTER_MS:-0}
netem_done=" "   # interfaces with netem in place or known not to take it
nl='
'

log() { echo "charon-router: $*"; }

netem_args() {
    if [ "$jitter" != 0 ]; then
        echo "delay ${delay}ms ${jitter}ms distribution normal"
    else
        echo "delay ${delay}ms"
    fi
}

ensure() {
    addrs=$(ip -br -4 addr show 2>&1) || { log "ip: $addrs"; return; }
    old_ifs=$IFS
    IFS=$nl
    for line in $addrs; do
        IFS=$old_ifs
        # eth0@if13  UP  10.213.1.254/24 10.213.1.1/24: split into words.
        # shellcheck disable=SC2086
        set -- $line
        [ $# -ge 3 ] || continue
        ifname=${1%%@*}
        [ "$ifname" = lo ] && continue
        first=$3
        shift 2
        all=" $* "
        addr=${first%/*}
        plen=${first#*/}
        gw=${addr%.*}.1
        case $all in
            *" $gw/"*) ;;
            *)
                if out=$(ip addr add "$gw/$plen" dev "$ifname" 2>&1); then
                    log "$ifname: took the gateway address $gw/$plen"
                else
                    log "$ifname: cannot add $gw/$plen: $out"
                fi
                ;;
        esac
        if [ "$delay" != 0 ]; then
            case $netem_done in *" $ifname "*) continue ;; esac
            # shellcheck disable=SC2046 # netem_args is several words
            if out=$(tc qdisc replace dev "$ifname" root netem $(netem_args) 2>&1); then
                log "$ifname: WAN delay $(netem_args) (netem)"
            else
                log "$ifname: netem unavailable ($out): WAN delay NOT injected on this kernel (CONFIG_NET_SCH_NETEM)"
            fi
            netem_done="$netem_done$ifname "
        fi
    done
    IFS=$old_ifs
    # An interface that went away (network disconnected) gets netem again
    # when it comes back.
    kept=" "
    # Newlines to spaces.
    # shellcheck disable=SC2086,SC2116
    flat=$(echo $addrs)
    for i in $netem_done; do
        case " $flat " in *" $i"[@\ ]*) kept="$kept$i " ;; esac
    done
    netem_done=$kept
}

log "started; WAN delay ${delay}ms one way, jitter ${jitter}ms"
trap 'exit 0' TERM INT
while :; do
    ensure
    sleep 0.5 &
    wait $!
done
