#!/usr/bin/env bash
# Soft-RoCE in a throwaway VM: this host's kernel has no RDMA, so RDMA tests boot Debian's
# stock kernel under qemu (TCG, no KVM) with virtme-ng, load rdma_rxe there and give it
# two RDMA devices on the two ends of a veth pair.
#
#   tools/rdma-vm.sh setup                        install what it needs; idempotent
#   tools/rdma-vm.sh run [OPTIONS] -- CMD [ARG…]  boot the VM, run CMD inside, exit with its status
#   tools/rdma-vm.sh perftest [--rounds N]        ib_write_bw and ib_read_lat baselines in one VM
#   tools/rdma-vm.sh perftest-in-guest [N] [write|read|all] [SECS]
#                                                 the same (or one of the two tests), inside
#                                                 a VM that `run` started; SECS: ib_write_bw's
#                                                 -D (default 5; it times the middle, leaving
#                                                 SECS/4 whole seconds out at each end)
#   tools/rdma-vm.sh status                       show what is set up and the cache size
#   tools/rdma-vm.sh clean                        remove the cache (packages stay installed)
#
# run options: --timeout SECS (CMD's limit, default 1200), --rwdir DIR (also writable in
# the guest; repeatable), --mem SIZE (default 1G), --cpus N (default 2).
#
# Inside the guest (the host's root file system, shared read-only, so binaries built on
# the host run as they are; the guest is root with unlimited locked memory):
#
#   rxe0 on pfs-rxa  198.18.77.1/24   <-- veth -->   pfs-rxb  198.18.77.2/24  rxe1
#
# Both ends live in the guest's one network namespace (rdma_rxe in this kernel receives
# only in the initial one), so policy routing sends traffic between the two addresses
# over the veth pair instead of the local loopback: rxe0 → rxe1 crosses a link. The VM
# has no network interface to the outside. CMD sees
#   PFS_RXE_DEVS="rxe0 rxe1"  PFS_RXE_ADDRS="198.18.77.1 198.18.77.2"
#   PFS_RXE_NETDEVS="pfs-rxa pfs-rxb"  PFS_RXE_GIDX="<RoCE v2 IPv4 GID index of each>"
#   PFS_RXE_OUT=<a directory shared read-write with the host, removed after the run>
# and runs in the current directory with the host's PATH and RUST_*, PFS_*, NEXTEST_* and
# CARGO_TERM_* variables. The rest of the guest's file system is writable but thrown away.
#
# Environment: PFS_RXE_BOOT_TIMEOUT (s, default 240), PFS_RXE_MTU (veth MTU, default
# 1500), PFS_RXE_VERBOSE=1 (show the guest kernel's console), PFS_CACHE (cache directory).
#
# The guest kernel (Debian's linux-image-amd64, whose modules include rdma_rxe) is
# downloaded and unpacked into the cache, never installed: installing it would change
# what the host boots. The cache is ${PFS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pfs}.
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
PATH=$PATH:/usr/sbin:/sbin   # depmod, and what vng looks for, when not root
CACHE=${PFS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pfs}
VENV=$CACHE/virtme-ng
KROOT=$CACHE/guest-kernel
VNG_VERSION=1.42
PACKAGES=(qemu-system-x86 busybox-static kmod rdma-core ibverbs-providers ibverbs-utils
    perftest libibverbs-dev librdmacm-dev iproute2 python3-venv)

DEVS=(rxe0 rxe1) NETDEVS=(pfs-rxa pfs-rxb) ADDRS=(198.18.77.1 198.18.77.2)
BOOT_TIMEOUT=${PFS_RXE_BOOT_TIMEOUT:-240}   # host side: launch until the guest runs our script
ACTIVE_TIMEOUT=30                           # guest side: rdma link add until PORT_ACTIVE
MTU=${PFS_RXE_MTU:-1500}                     # the veth pair's; rxe uses the largest RoCE MTU below it
GUEST_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "rdma-vm: $*"; }
die() { echo "rdma-vm: $*" >&2; exit 1; }
is_root() { [ "$(id -u)" = 0 ]; }

# ---------------------------------------------------------------------------- setup

missing_packages() {
    local p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' ||
            echo "$p"
    done
}

apt_env() { env DEBIAN_FRONTEND=noninteractive timeout 900 apt-get -q \
    -o Acquire::Retries=2 -o Acquire::http::Timeout=30 "$@"; }

setup_packages() {
    { command -v dpkg-query && command -v apt-get; } >/dev/null ||
        die "needs a Debian-based host with apt-get (install qemu-system-x86, rdma-core, perftest, python3-venv with your package manager)"
    local missing
    mapfile -t missing < <(missing_packages)
    if [ "${#missing[@]}" = 0 ]; then
        say "packages: all installed (${PACKAGES[*]})"
        return
    fi
    is_root || die "missing packages ${missing[*]}: run as root, or sudo apt-get install -y ${missing[*]}"
    say "packages: installing ${missing[*]}"
    say "\$ apt-get update"
    apt_env update -qq >/dev/null ||
        die "apt-get update failed: no network to the Debian mirror? (check /etc/apt/sources.list and the proxy)"
    say "\$ apt-get install -y --no-install-recommends ${missing[*]}"
    apt_env install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        die "apt-get install ${missing[*]} failed: run it by hand to see why"
}

vng_version_ok() {
    [ -x "$VENV/bin/vng" ] &&
        [ "$("$VENV/bin/python3" -c 'import importlib.metadata as m; print(m.version("virtme-ng"))' 2>/dev/null)" = "$VNG_VERSION" ]
}

setup_vng() {
    if vng_version_ok; then
        say "virtme-ng: $VNG_VERSION in $VENV"
        return
    fi
    local py=python3
    [ -x /usr/bin/python3 ] && py=/usr/bin/python3
    "$py" -c 'import venv, ensurepip' 2>/dev/null ||
        die "python3 cannot make a venv with pip: apt-get install python3-venv"
    say "virtme-ng: installing $VNG_VERSION from PyPI into $VENV"
    rm -rf "$VENV"
    mkdir -p "$CACHE"
    "$py" -m venv "$VENV"
    timeout 600 "$VENV/bin/pip" install -q --disable-pip-version-check --timeout 30 \
        "virtme-ng==$VNG_VERSION" ||
        { rm -rf "$VENV"; die "pip install virtme-ng==$VNG_VERSION failed: no network to PyPI? (check pip's proxy/index settings)"; }
    vng_version_ok || die "virtme-ng $VNG_VERSION did not install into $VENV"
}

# The unpacked kernel: $KROOT/boot/vmlinuz-<kver> and $KROOT/lib/modules/<kver>.
guest_kver() {
    local m
    for m in "$KROOT"/lib/modules/*/kernel/drivers/infiniband/sw/rxe/rdma_rxe.ko*; do
        [ -e "$m" ] || continue
        m=${m#"$KROOT"/lib/modules/}
        echo "${m%%/*}"
        return
    done
    return 1
}

kernel_ok() {
    local kver
    kver=$(guest_kver) || return 1
    [ -r "$KROOT/boot/vmlinuz-$kver" ] && [ -s "$KROOT/lib/modules/$kver/modules.dep" ]
}

# Module trees a virtio guest never loads; dropping them shrinks the cache by about half.
PRUNE=(drivers/gpu drivers/media drivers/net/wireless drivers/net/ethernet drivers/staging
    drivers/bluetooth drivers/iio drivers/infiniband/hw drivers/scsi drivers/usb drivers/hid
    drivers/input drivers/isdn drivers/mmc drivers/platform drivers/hwmon drivers/thunderbolt
    drivers/gnss drivers/nfc sound net/wireless net/bluetooth net/mac80211)

setup_kernel() {
    if kernel_ok; then
        say "guest kernel: $(guest_kver) in $KROOT"
        return
    fi
    { command -v dpkg-deb && command -v depmod; } >/dev/null ||
        die "needs dpkg-deb and depmod (apt-get install dpkg kmod)"
    local pkg dl tmp deb kver
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [ -n "$pkg" ] || die "apt knows no linux-image-amd64: run apt-get update (as root) first"
    say "guest kernel: downloading $pkg (not installing it) into $KROOT"
    dl=$(mktemp -d "$CACHE/.dl.XXXXXX")
    tmp=$KROOT.new
    rm -rf "$tmp"
    # shellcheck disable=SC2064 # expand now: the paths are fixed
    trap "rm -rf '$dl' '$tmp'" EXIT
    (cd "$dl" && timeout 900 apt-get -q -o APT::Sandbox::User=root -o Acquire::Retries=2 \
        -o Acquire::http::Timeout=30 download "$pkg" >/dev/null) ||
        die "apt-get download $pkg failed: no network to the Debian mirror, or stale lists (apt-get update)"
    deb=$(echo "$dl"/*.deb)
    [ -f "$deb" ] || die "apt-get download $pkg left no .deb"
    say "guest kernel: unpacking $(basename "$deb") with dpkg-deb -x"
    mkdir -p "$tmp"
    dpkg-deb -x "$deb" "$tmp"
    rm -rf "$dl"
    kver=$(KROOT=$tmp guest_kver) ||
        die "$pkg has no rdma_rxe module; the guest kernel needs CONFIG_RDMA_RXE=m"
    local d
    for d in "${PRUNE[@]}"; do rm -rf "$tmp/lib/modules/$kver/kernel/$d"; done
    rm -rf "$tmp/usr/share/doc" "$tmp/usr/lib/linux" "$tmp/lib/firmware"
    depmod -a -b "$tmp" "$kver"
    chmod a+r "$tmp/boot/vmlinuz-$kver"
    rm -rf "$KROOT"
    mv "$tmp" "$KROOT"
    trap - EXIT
    kernel_ok || die "unpacked kernel in $KROOT is incomplete"
    say "guest kernel: $kver ready"
}

setup() {
    [ "$(uname -m)" = x86_64 ] || die "x86_64 hosts only (the guest kernel is Debian's amd64)"
    local t0=$SECONDS
    mkdir -p "$CACHE"
    setup_packages
    setup_vng
    setup_kernel
    say "setup done in $((SECONDS - t0)) s; cache $(du -sh "$CACHE" | cut -f1) in $CACHE"
}

status() {
    local missing
    mapfile -t missing < <(missing_packages)
    if [ "${#missing[@]}" = 0 ]; then say "packages: installed"; else say "packages: missing ${missing[*]}"; fi
    if vng_version_ok; then say "virtme-ng: $VNG_VERSION in $VENV"; else say "virtme-ng: absent"; fi
    if kernel_ok; then say "guest kernel: $(guest_kver) in $KROOT"; else say "guest kernel: absent"; fi
    if [ -d "$CACHE" ]; then say "cache: $(du -sh "$CACHE" | cut -f1) in $CACHE"; fi
}

# ---------------------------------------------------------------------------- host side of run

require_setup() {
    local missing
    mapfile -t missing < <(missing_packages)
    { [ "${#missing[@]}" = 0 ] && vng_version_ok && kernel_ok; } ||
        die "not set up (missing: ${missing[*]:+packages ${missing[*]} }$(vng_version_ok || echo 'virtme-ng ')$(kernel_ok || echo 'guest kernel')): run tools/rdma-vm.sh setup"
    command -v qemu-system-x86_64 >/dev/null || die "no qemu-system-x86_64: apt-get install qemu-system-x86"
}

run_vm() {
    local cmd_timeout=1200 mem=1G cpus=2 rwdirs=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --timeout) cmd_timeout=${2:?--timeout needs seconds}; shift 2 ;;
            --rwdir) rwdirs+=("$(readlink -f "${2:?--rwdir needs a directory}")"); shift 2 ;;
            --mem) mem=${2:?--mem needs a size}; shift 2 ;;
            --cpus) cpus=${2:?--cpus needs a count}; shift 2 ;;
            --) shift; break ;;
            *) die "unknown option $1 (usage: run [--timeout SECS] [--rwdir DIR] [--mem SIZE] [--cpus N] -- CMD [ARG…])" ;;
        esac
    done
    [ $# -gt 0 ] || die "run needs a command: tools/rdma-vm.sh run -- CMD [ARG…]"
    case "$cmd_timeout" in ''|*[!0-9]*) die "--timeout must be whole seconds, got $cmd_timeout" ;; esac
    case "$cpus" in ''|*[!0-9]*|0) die "--cpus must be a positive count, got $cpus" ;; esac
    case "$MTU" in ''|*[!0-9]*) die "PFS_RXE_MTU must be a number, got $MTU" ;; esac
    if [ "$MTU" -lt 576 ] || [ "$MTU" -gt 65535 ]; then die "PFS_RXE_MTU $MTU out of range 576..65535"; fi
    local d
    for d in "${rwdirs[@]}"; do [ -d "$d" ] || die "--rwdir $d is not a directory"; done
    require_setup

    local kver rundir
    kver=$(guest_kver)
    rundir=$(mktemp -d "${TMPDIR:-/tmp}/pfs-rdma-vm.XXXXXX")
    chmod 0777 "$rundir"
    # shellcheck disable=SC2064 # expand now: the path is fixed
    trap "rm -rf '$rundir'" EXIT
    printf '%s\0' "$@" >"$rundir/cmd"
    printf '%s\n' "$cmd_timeout" >"$rundir/timeout"
    printf '%s\n' "$PWD" >"$rundir/cwd"
    printf '%s\n' "$MTU" >"$rundir/mtu"
    # CMD gets the host's PATH (after the system directories) and its RUST_*, PFS_*,
    # NEXTEST_* and CARGO_TERM_* variables; nothing else of the host's environment.
    printf '%s\n' "$PATH" >"$rundir/path"
    local v
    : >"$rundir/env"
    for v in $(compgen -e); do
        case "$v" in
            RUST_*|PFS_*|NEXTEST_*|CARGO_TERM_*) printf '%s=%s\0' "$v" "${!v}" >>"$rundir/env" ;;
        esac
    done
    mkfifo "$rundir/out" "$rundir/err"

    local vng_args=(--run "$KROOT/boot/vmlinuz-$kver" --disable-kvm --force-9p
        -m "$mem" -p "$cpus" --user root --rwdir "$rundir")
    [ "${PFS_RXE_VERBOSE:-0}" = 0 ] || vng_args+=(--verbose)
    for d in "${rwdirs[@]}"; do vng_args+=(--rwdir "$d"); done
    vng_args+=(--exec "bash $(printf %q "$SELF") __guest $(printf %q "$rundir")")

    # The whole run is bounded; booting is bounded separately by watching for the
    # guest's first sign of life. qemu's output goes through a pipe (written straight
    # to a regular file it gets cut short).
    local total=$((BOOT_TIMEOUT + ACTIVE_TIMEOUT + cmd_timeout + 60)) t0=$SECONDS
    say "booting $kver under TCG (-m $mem -p $cpus), then: $*"
    cat "$rundir/out" &
    local out_pid=$!
    cat "$rundir/err" >&2 &
    local err_pid=$!
    PATH="$VENV/bin:$PATH" timeout -k 10 "$total" vng "${vng_args[@]}" \
        <"/dev/null" >"$rundir/out" 2>"$rundir/err" &
    local vm_pid=$! booted='' boot_failed=''
    # Stopping this script (Ctrl-C, a CI timeout) stops the VM too: timeout passes the
    # signal on to qemu, which background jobs of a script would otherwise not get.
    # shellcheck disable=SC2064 # expand now: the pids and path are fixed
    trap "kill -TERM $vm_pid $out_pid $err_pid 2>/dev/null || true; rm -rf '$rundir'" EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM HUP
    while kill -0 "$vm_pid" 2>/dev/null; do
        if [ -z "$booted" ] && [ -e "$rundir/booted" ]; then
            booted=$((SECONDS - t0))
        fi
        if [ -z "$booted" ] && [ $((SECONDS - t0)) -ge "$BOOT_TIMEOUT" ]; then
            echo "rdma-vm: the guest did not start within ${BOOT_TIMEOUT} s (TCG on a busy host? raise PFS_RXE_BOOT_TIMEOUT)" >&2
            kill -TERM "$vm_pid" 2>/dev/null || true
            boot_failed=1
            break
        fi
        sleep 0.2
    done
    local vm_rc=0
    wait "$vm_pid" || vm_rc=$?
    wait "$out_pid" "$err_pid" || true
    local wall=$((SECONDS - t0))
    [ -z "$boot_failed" ] || exit 1
    if [ ! -s "$rundir/status" ]; then
        [ "$vm_rc" = 124 ] && die "the VM ran past its ${total} s limit and was stopped"
        [ -n "$booted" ] || die "the VM exited (status $vm_rc) before the guest started: rerun with PFS_RXE_VERBOSE=1 to see its console"
        die "the guest ended (VM status $vm_rc) without reporting CMD's status"
    fi
    local rc
    rc=$(cat "$rundir/status")
    [ "$rc" != setup-failed ] || die "the guest's RDMA set-up failed (its reason is above)"
    say "VM done in ${wall} s (guest up after ${booted:-?} s); CMD exited with $rc"
    return "$rc"
}

# ---------------------------------------------------------------------------- guest side

gdie() { echo "rdma-vm (guest): $*" >&2; echo setup-failed >"$RUNDIR/status"; exit 1; }

# Index of the RoCE v2 GID holding IPv4 address $2 on device $1.
ipv4_gid_index() {
    local dev=$1 hex want f i o
    IFS=. read -r -a o <<<"$2"
    hex=$(printf '%02x%02x:%02x%02x' "${o[0]}" "${o[1]}" "${o[2]}" "${o[3]}")
    want="0000:0000:0000:0000:0000:ffff:$hex"
    for f in /sys/class/infiniband/"$dev"/ports/1/gids/*; do
        i=${f##*/}
        if [ "$(cat "$f" 2>/dev/null)" = "$want" ] &&
            [ "$(cat "/sys/class/infiniband/$dev/ports/1/gid_attrs/types/$i" 2>/dev/null)" = "RoCE v2" ]; then
            echo "$i"
            return
        fi
    done
    return 1
}

guest() {
    RUNDIR=$1
    export PATH=$GUEST_PATH
    date +%s.%N >"$RUNDIR/booted"
    trap 'gdie "set-up failed at line $LINENO: $BASH_COMMAND"' ERR
    local t0=$SECONDS
    modprobe rdma_rxe || gdie "modprobe rdma_rxe failed (the guest kernel's modules are in $KROOT)"
    # rdma_ucm makes /dev/infiniband/rdma_cm, which rdma_cm (librdmacm) needs.
    modprobe rdma_ucm || gdie "modprobe rdma_ucm failed"
    modprobe veth || gdie "modprobe veth failed"
    command -v rdma >/dev/null || gdie "no rdma tool in the guest: apt-get install iproute2 on the host"

    MTU=$(cat "$RUNDIR/mtu")
    local a=${NETDEVS[0]} b=${NETDEVS[1]} ipa=${ADDRS[0]} ipb=${ADDRS[1]}
    ip link set lo up
    ip link add "$a" type veth peer name "$b"
    local s
    for s in all default "$a" "$b"; do
        sysctl -qw "net.ipv4.conf.$s.rp_filter=0" "net.ipv4.conf.$s.accept_local=1" >/dev/null
    done
    ip addr add "$ipa/24" dev "$a"
    ip addr add "$ipb/24" dev "$b"
    ip link set "$a" mtu "$MTU"
    ip link set "$b" mtu "$MTU"
    ip link set "$a" up
    ip link set "$b" up
    # Both addresses are local, so by default the kernel would deliver between them over
    # loopback. Locally sent packets to the peer address go out of the other end of the
    # veth instead; arriving packets still find the local table (moved behind).
    ip rule add pref 100 lookup local
    ip rule del pref 0 lookup local
    ip route add "$ipb" dev "$a" src "$ipa" table 101
    ip route add "$ipa" dev "$b" src "$ipb" table 102
    ip rule add pref 10 iif lo to "$ipb" lookup 101
    ip rule add pref 11 iif lo to "$ipa" lookup 102

    rdma link add "${DEVS[0]}" type rxe netdev "$a" || gdie "rdma link add ${DEVS[0]} failed"
    rdma link add "${DEVS[1]}" type rxe netdev "$b" || gdie "rdma link add ${DEVS[1]} failed"
    local dev state i
    for i in $(seq $((ACTIVE_TIMEOUT * 10))); do
        state=ok
        for dev in "${DEVS[@]}"; do
            grep -q ACTIVE "/sys/class/infiniband/$dev/ports/1/state" 2>/dev/null || state=
        done
        [ -n "$state" ] && break
        sleep 0.1
    done
    for dev in "${DEVS[@]}"; do
        grep -q ACTIVE "/sys/class/infiniband/$dev/ports/1/state" 2>/dev/null ||
            gdie "$dev not PORT_ACTIVE after ${ACTIVE_TIMEOUT} s: $(cat "/sys/class/infiniband/$dev/ports/1/state" 2>/dev/null || echo no such device)"
    done
    local gidx=() g
    for i in 0 1; do
        for _ in $(seq 50); do
            g=$(ipv4_gid_index "${DEVS[$i]}" "${ADDRS[$i]}") && break
            sleep 0.1
        done
        [ -n "$g" ] || gdie "${DEVS[$i]} has no RoCE v2 GID for ${ADDRS[$i]}"
        gidx+=("$g")
    done
    # The peer must be reached over the veth pair, not loopback.
    ping -c1 -W5 -q -I "$ipa" "$ipb" >/dev/null 2>&1 || gdie "$ipa cannot reach $ipb over $a"
    ip route get "$ipb" from "$ipa" | grep -q " dev $a " ||
        gdie "traffic from $ipa to $ipb would not use $a: $(ip route get "$ipb" from "$ipa" | head -1)"
    echo "rdma-vm (guest): ${DEVS[0]} on $a $ipa (GID ${gidx[0]}), ${DEVS[1]} on $b $ipb (GID ${gidx[1]}): PORT_ACTIVE after $((SECONDS - t0)) s"

    local envs=() e
    mapfile -d '' envs <"$RUNDIR/env"
    for e in "${envs[@]}"; do export "${e?}"; done
    PATH=$GUEST_PATH:$(cat "$RUNDIR/path")
    export PFS_RXE_DEVS="${DEVS[*]}" PFS_RXE_ADDRS="${ADDRS[*]}" PFS_RXE_NETDEVS="${NETDEVS[*]}"
    export PFS_RXE_GIDX="${gidx[*]}" PFS_RXE_OUT=$RUNDIR HOME=${HOME:-/root}
    ulimit -l unlimited
    trap - ERR
    local cmd=() cmd_timeout cwd rc=0
    mapfile -d '' cmd <"$RUNDIR/cmd"
    cmd_timeout=$(cat "$RUNDIR/timeout")
    cwd=$(cat "$RUNDIR/cwd")
    cd "$cwd" 2>/dev/null || cd /
    timeout -k 5 "$cmd_timeout" "${cmd[@]}" </dev/null || rc=$?
    [ "$rc" = 124 ] && echo "rdma-vm (guest): ${cmd[0]} ran past its ${cmd_timeout} s limit and was stopped" >&2
    echo "$rc" >"$RUNDIR/status"
    sync
}

# ---------------------------------------------------------------------------- perftest (guest)

# Inside `run` (also callable there directly, e.g. interleaved with pfs-bench): N rounds
# of one server on rxe1 (198.18.77.2) and one client on rxe0 (198.18.77.1) connecting to
# it, so every packet crosses the veth pair. Each tool is limited to 90 s. $3: ib_write_bw's
# -D in seconds (default 5: 1 s of warm-up, 3 s timed, 1 s left out at the end).
perftest_guest() {
    local rounds=${1:-1} tests=${2:-all} secs=${3:-5}
    case "$rounds" in ''|*[!0-9]*|0) die "rounds must be a positive count, got $rounds" ;; esac
    case "$tests" in write|read|all) ;; *) die "tests must be write, read or all, got $tests" ;; esac
    # perftest times the middle of a -D run: from D/4 (whole seconds) to D - D/4.
    case "$secs" in ''|*[!0-9]*) die "ib_write_bw's duration must be whole seconds, got $secs" ;; esac
    if [ "$secs" -lt 4 ] || [ "$secs" -gt 60 ]; then
        die "ib_write_bw's duration must be 4 to 60 s (it leaves D/4 out at each end), got $secs"
    fi
    if [ -z "${PFS_RXE_DEVS:-}" ] || [ -z "${PFS_RXE_OUT:-}" ] || [ -z "${PFS_RXE_GIDX:-}" ]; then
        die "perftest-in-guest runs inside the VM only: tools/rdma-vm.sh run -- tools/rdma-vm.sh perftest-in-guest [N] [write|read|all] [SECS]"
    fi
    read -r -a devs <<<"$PFS_RXE_DEVS"
    read -r -a addrs <<<"$PFS_RXE_ADDRS"
    read -r -a gidx <<<"$PFS_RXE_GIDX"
    read -r -a nets <<<"$PFS_RXE_NETDEVS"
    local out=$PFS_RXE_OUT port=18515 limit=90

    # $1: tool, $2: log name, rest: common arguments
    one() {
        local tool=$1 log=$2 rc=0 spid
        shift 2
        local srv=("$tool" -d "${devs[1]}" -i 1 -x "${gidx[1]}" -p "$port" "$@")
        local cli=("$tool" -d "${devs[0]}" -i 1 -x "${gidx[0]}" -p "$port" "$@" "${addrs[1]}")
        echo "\$ ${srv[*]} &"
        echo "\$ ${cli[*]}"
        timeout -k 5 "$limit" "${srv[@]}" >"$out/$log.server" 2>&1 &
        spid=$!
        for _ in $(seq 100); do
            ss -Hltn "sport = :$port" 2>/dev/null | grep -q . && break
            sleep 0.1
        done
        timeout -k 5 "$limit" "${cli[@]}" >"$out/$log.client" 2>&1 || rc=$?
        wait "$spid" || true
        if [ "$rc" != 0 ]; then
            cat "$out/$log.server" "$out/$log.client" >&2
            echo "rdma-vm (guest): $tool exited with $rc$([ "$rc" = 124 ] && echo " (ran past ${limit} s)")" >&2
            return 1
        fi
    }
    # The result row: the first line after the header that starts with the message size.
    row() { awk -v s="$2" '$1 == s && NF >= 4 {print; exit}' "$1"; }
    bytes() { cat "/sys/class/net/$1/statistics/tx_bytes"; }

    positive() { awk -v v="$1" 'BEGIN {exit !(v ~ /^[0-9]+(\.[0-9]+)?$/ && v + 0 > 0)}'; }
    # perftest turns cycles into time with a CPU frequency it samples when it starts;
    # under TCG on a busy host the sample can fail, and the result is inf or 0. Such a
    # run is repeated (3 tries). $1: tool, $2: log name, $3: message size, $4: the
    # column to check, rest: arguments. Sets RESULT to the result row.
    measure() {
        local tool=$1 log=$2 size=$3 col=$4 try
        shift 4
        for try in 1 2 3; do
            one "$tool" "$log" "$@" || return 1
            RESULT=$(row "$out/$log.client" "$size")
            if [ -z "$RESULT" ]; then
                cat "$out/$log.client" >&2
                echo "rdma-vm (guest): no result in $tool's output" >&2
                return 1
            fi
            positive "$(awk -v c="$col" '{print $c}' <<<"$RESULT")" && return
            echo "rdma-vm (guest): $tool gave no finite result (its CPU-frequency sample failed): try $try of 3" >&2
        done
        return 1
    }

    local r bw bws=() lats=() tx0 tx1 tmin ttyp tavg p99 line
    for r in $(seq "$rounds"); do
        line="rdma-vm: round $r:"
        if [ "$tests" != read ]; then
            tx0=$(bytes "${nets[0]}")
            # Columns: bytes iterations BW-peak BW-average(MiB/s) MsgRate
            measure ib_write_bw write_bw 65536 4 -s 65536 -D "$secs" -F -q 1 || return 1
            tx1=$(bytes "${nets[0]}")
            bw=$(awk '{print $4}' <<<"$RESULT")
            bws+=("$bw")
            line+=" ib_write_bw 64 KiB ${bw} MiB/s ($(( (tx1 - tx0) / 1048576 )) MiB left ${nets[0]});"
        fi
        if [ "$tests" != write ]; then
            # Columns: bytes iterations t_min t_max t_typical t_avg t_stdev p99 p99.9 (µs)
            measure ib_read_lat read_lat 2 5 -s 2 -n 2000 -F || return 1
            read -r _ _ tmin _ ttyp tavg _ p99 _ <<<"$RESULT"
            lats+=("$ttyp")
            line+=" ib_read_lat 2 B typical ${ttyp} µs (min ${tmin}, avg ${tavg}, p99 ${p99})"
        fi
        echo "$line"
    done
    median() { sort -g | awk '{v[NR] = $1} END {if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
    local mbw mlat summary="rdma-vm: perftest"
    echo "rdma-vm: perftest baseline, soft-RoCE ${devs[0]} (${addrs[0]}) -> ${devs[1]} (${addrs[1]}) over veth, TCG guest:"
    if [ ${#bws[@]} -gt 0 ]; then
        mbw=$(printf '%s\n' "${bws[@]}" | median)
        echo "rdma-vm:   ib_write_bw -s 65536 -D $secs, BW average in MiB/s (perftest's \"MB/sec\" is 2^20 B/s): ${bws[*]}"
        echo "rdma-vm:   median of ${rounds}: write $mbw MiB/s = $(awk -v b="$mbw" 'BEGIN{printf "%.1f", b * 1.048576}') MB/s"
        summary+=" write_bw_MiBps=$mbw"
    fi
    if [ ${#lats[@]} -gt 0 ]; then
        mlat=$(printf '%s\n' "${lats[@]}" | median)
        echo "rdma-vm:   ib_read_lat -s 2 -n 2000, t_typical (median) in µs, full round trip: ${lats[*]}"
        echo "rdma-vm:   median of ${rounds}: 2-byte read $mlat µs"
        summary+=" read_lat_typical_us=$mlat"
    fi
    echo "$summary rounds=$rounds"
}

perftest() {
    local rounds=1
    while [ $# -gt 0 ]; do
        case "$1" in
            --rounds) rounds=${2:?--rounds needs a count}; shift 2 ;;
            *) die "unknown option $1 (usage: perftest [--rounds N])" ;;
        esac
    done
    case "$rounds" in ''|*[!0-9]*|0) die "--rounds must be a positive count, got $rounds" ;; esac
    run_vm --timeout $((rounds * 200)) -- bash "$SELF" perftest-in-guest "$rounds"
}

verb=${1:-}
[ $# -gt 0 ] && shift
case "$verb" in
    setup) setup ;;
    run) run_vm "$@" ;;
    perftest) perftest "$@" ;;
    status) status ;;
    clean) rm -rf "$CACHE"; say "removed $CACHE" ;;
    __guest) guest "$@" ;;
    perftest-in-guest) perftest_guest "$@" ;;
    *) die "usage: $0 setup | run [--timeout SECS] [--rwdir DIR] [--mem SIZE] [--cpus N] -- CMD [ARG…] | perftest [--rounds N] | perftest-in-guest [N] [write|read|all] [SECS] | status | clean" ;;
esac
