#!/usr/bin/env bash
# Two "hosts" with one NIC each: network namespaces pfs-a and pfs-b joined by a veth pair.
#
#   tools/topology.sh up [--mtu N] [--queues N]   create (or reshape) it; idempotent
#   tools/topology.sh down                        remove it; idempotent
#   tools/topology.sh status                      show it
#
#   pfs-a: pfs-a0  198.18.0.1/24   <-- veth -->   pfs-b: pfs-b0  198.18.0.2/24
#
# Addresses come from 198.18.0.0/15 (RFC 2544 benchmarking). Transmit checksum offload
# is turned off on both ends, so frames the kernel sends carry full checksums when an
# AF_XDP socket (copy mode) receives them. Enter a namespace with
# `nsenter --net=/run/netns/pfs-a …` rather than `ip netns exec`, which remounts /sys and
# hides bpffs.
set -euo pipefail

NS_A=pfs-a NS_B=pfs-b IF_A=pfs-a0 IF_B=pfs-b0
IP_A=198.18.0.1 IP_B=198.18.0.2
MTU=1500 QUEUES=2

die() { echo "topology: $*" >&2; exit 1; }

in_ns() { local ns=$1; shift; nsenter --net="/run/netns/$ns" "$@"; }

down() {
    for ns in "$NS_A" "$NS_B"; do
        if [ -e "/run/netns/$ns" ]; then ip netns del "$ns" 2>/dev/null || true; fi
    done
    # A veth end left in the host namespace by an interrupted run.
    ip link del "$IF_A" 2>/dev/null || true
    ip link del "$IF_B" 2>/dev/null || true
}

up() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --mtu) MTU=${2:?--mtu needs a value}; shift 2 ;;
            --queues) QUEUES=${2:?--queues needs a value}; shift 2 ;;
            *) die "unknown option $1 (expected --mtu N, --queues N)" ;;
        esac
    done
    case "$MTU" in ''|*[!0-9]*) die "--mtu must be a number, got $MTU" ;; esac
    case "$QUEUES" in ''|*[!0-9]*) die "--queues must be a number, got $QUEUES" ;; esac
    if [ "$MTU" -lt 576 ] || [ "$MTU" -gt 65535 ]; then die "--mtu $MTU out of range 576..65535"; fi
    if [ "$QUEUES" -lt 1 ] || [ "$QUEUES" -gt 16 ]; then die "--queues $QUEUES out of range 1..16"; fi
    [ "$(id -u)" = 0 ] || die "needs root (network namespaces and veth)"
    command -v ethtool >/dev/null || die "needs ethtool (cargo xtask deps installs it)"

    # A half-made topology from a failed run is removed first; a complete one is reshaped.
    if ! { [ -e "/run/netns/$NS_A" ] && [ -e "/run/netns/$NS_B" ] &&
           in_ns "$NS_A" ip link show "$IF_A" >/dev/null 2>&1 &&
           in_ns "$NS_B" ip link show "$IF_B" >/dev/null 2>&1; }; then
        down
        ip netns add "$NS_A"
        ip netns add "$NS_B"
        ip link add "$IF_A" numtxqueues 16 numrxqueues 16 type veth \
            peer name "$IF_B" numtxqueues 16 numrxqueues 16
        ip link set "$IF_A" netns "$NS_A"
        ip link set "$IF_B" netns "$NS_B"
        in_ns "$NS_A" ip addr add "$IP_A/24" dev "$IF_A"
        in_ns "$NS_B" ip addr add "$IP_B/24" dev "$IF_B"
        in_ns "$NS_A" ip link set lo up
        in_ns "$NS_B" ip link set lo up
    fi
    for side in "$NS_A:$IF_A" "$NS_B:$IF_B"; do
        ns=${side%%:*} dev=${side#*:}
        in_ns "$ns" ip link set "$dev" mtu "$MTU"
        in_ns "$ns" ethtool -L "$dev" rx "$QUEUES" tx "$QUEUES" >/dev/null 2>&1 ||
            echo "topology: $dev keeps its queue count (ethtool -L refused $QUEUES)" >&2
        in_ns "$ns" ethtool -K "$dev" tx off >/dev/null 2>&1 || true
        in_ns "$ns" ip link set "$dev" up
    done
    # Wait for the link, then make sure each side can reach the other.
    for _ in $(seq 50); do
        in_ns "$NS_A" ping -c1 -W1 -q "$IP_B" >/dev/null 2>&1 && break
        sleep 0.1
    done
    in_ns "$NS_A" ping -c1 -W1 -q "$IP_B" >/dev/null 2>&1 ||
        die "$IP_A cannot reach $IP_B after setup"
    status
}

status() {
    for side in "$NS_A:$IF_A" "$NS_B:$IF_B"; do
        ns=${side%%:*} dev=${side#*:}
        if [ -e "/run/netns/$ns" ]; then
            q=$(in_ns "$ns" ethtool -l "$dev" 2>/dev/null | awk '/^RX:/{v=$2} END{print v}')
            in_ns "$ns" ip -br addr show dev "$dev" 2>/dev/null |
                awk -v ns="$ns" -v q="${q:-?}" '{print "topology: " ns ": " $0 " rx queues " q}'
            mtu=$(in_ns "$ns" ip -o link show dev "$dev" 2>/dev/null | grep -o ' mtu [0-9]*' | head -1 || true)
            xdp=$(in_ns "$ns" ip -d link show dev "$dev" 2>/dev/null | grep -o 'prog/xdp id [0-9]*' | head -1 || true)
            echo "topology: $ns: $dev${mtu}${xdp:+, XDP program attached (${xdp#prog/xdp })}"
        else
            echo "topology: $ns absent"
        fi
    done
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    up) up "$@" ;;
    down) down; echo "topology: removed" ;;
    status) status ;;
    *) die "usage: $0 up [--mtu N] [--queues N] | down | status" ;;
esac
