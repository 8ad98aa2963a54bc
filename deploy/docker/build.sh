#!/usr/bin/env bash
# Build Charon's container images from this workspace without pulling any
# image (every image is FROM scratch, filled from the build host).
#
# Usage: deploy/docker/build.sh [--release | --debug] [--no-cargo]
#                               [--tag TAG] [IMAGE...]
#
# IMAGE is any of (default: all three):
#   node     charon:TAG          charon-node + charonctl, their shared
#                                libraries, CA roots, user charon (10001),
#                                data dir /var/lib/charon as a volume
#   haproxy  charon-haproxy:TAG  the host's haproxy + its libraries (the
#                                front load balancer of compose.yml)
#   router   charon-router:TAG   dash, sleep, ip, tc + libraries and
#                                router.sh: the WAN router of compose.yml
#
# Options:
#   --release    build the binaries with `cargo build --release` (default;
#                about 4 minutes from cold on 2 cores)
#   --debug      use the debug profile instead (faster to build, a larger
#                image; debug info is stripped when `strip` exists)
#   --no-cargo   do not run cargo: use the binaries already in target/
#   --tag TAG    image tag (default: local)
#   -h, --help   this text
#
# The build contexts go to target/docker/<image>/ (rootfs/, the Dockerfile
# and manifest.txt, the list of every path put into the image).
# Needs: docker, cargo (unless --no-cargo), ldd; haproxy for `haproxy`,
# iproute2 (ip, tc), dash and coreutils' sleep for `router`.
# Env:   CARGO (default cargo), DOCKER (default docker).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
profile=release
run_cargo=1
tag=local
images=()
cargo="${CARGO:-cargo}"
docker="${DOCKER:-docker}"

usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }
log() { echo "build.sh: $*" >&2; }
die() {
    echo "build.sh: $*" >&2
    exit 1
}

while (($#)); do
    case $1 in
        --release) profile=release ;;
        --debug) profile=debug ;;
        --no-cargo) run_cargo=0 ;;
        --tag)
            (($# >= 2)) || die "--tag needs a value"
            tag=$2
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        node | haproxy | router) images+=("$1") ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done
((${#images[@]})) || images=(node haproxy router)

"$docker" info >/dev/null 2>&1 || die "no Docker engine answers ('$docker info' failed)"

# Copies FILE (following symlinks) to ROOT at the same path, or at DEST.
put() {
    local root=$1 file=$2 dest=${3:-$2}
    mkdir -p "$root$(dirname "$dest")"
    cp -L "$file" "$root$dest"
}

# Copies the shared libraries BIN needs (as `ldd` resolves them on this host)
# into ROOT, at the paths ldd gives: the dynamic loader (the binary's
# interpreter) and every `name => /path` line.
put_libs() {
    local root=$1 bin=$2 out line lib
    out=$(ldd "$bin" 2>&1) || {
        case $out in
            *"not a dynamic executable"*) return 0 ;;
            *) die "ldd $bin failed: $out" ;;
        esac
    }
    while IFS= read -r line; do
        case $line in
            *"not found"*) die "ldd $bin: a library is missing on this host: $line" ;;
            *linux-vdso* | *linux-gate*) continue ;;
            *"=> /"*) lib=${line#*=> } ;;
            *[[:space:]]/*) lib=${line#"${line%%/*}"} ;;
            *) continue ;;
        esac
        lib=${lib%% (*}
        [[ -e $root$lib ]] || put "$root" "$lib"
    done <<<"$out"
}

# A fresh context directory for image $1: $ctx, $root.
new_context() {
    ctx="$repo/target/docker/$1"
    root="$ctx/rootfs"
    rm -rf "$ctx"
    mkdir -p "$root"
}

# Lists every path of the context's rootfs (and data/ as /var/lib/charon)
# into manifest.txt: "type path" lines, sorted (type d, f or l).
write_manifest() {
    (
        cd "$root"
        find . -mindepth 1 \( -type d -printf 'd /%P\n' \) -o \( -type l -printf 'l /%P\n' \) \
            -o \( -type f -printf 'f /%P\n' \)
        if [[ -d $ctx/data ]]; then
            echo "d /var/lib/charon"
        fi
    ) | LC_ALL=C sort -k2 -u >"$ctx/manifest.txt"
}

docker_build() {
    local name=$1 dockerfile=$2
    cp "$dockerfile" "$ctx/Dockerfile"
    write_manifest
    echo "build.sh: docker build $name:$tag ($(wc -l <"$ctx/manifest.txt") paths)" >&2
    DOCKER_BUILDKIT=0 "$docker" build --quiet -t "$name:$tag" "$ctx" >/dev/null 2> >(grep -v -e DEPRECATED -e 'legacy builder' -e buildx -e 'docs.docker.com' -e BuildKit -e 'environment-variable' -e '^ *$' >&2 || true)
    echo "build.sh: built $name:$tag ($("$docker" image inspect -f '{{.Size}}' "$name:$tag" | awk '{printf "%.1f MB", $1 / 1e6}'))" >&2
}

build_node() {
    if ((run_cargo)); then
        local flags=()
        [[ $profile == release ]] && flags=(--release)
        echo "build.sh: cargo build ${flags[*]} -p charon-node -p charonctl" >&2
        (cd "$repo" && "$cargo" build "${flags[@]}" -p charon-node -p charonctl)
    fi
    local bin dir="$repo/target/$profile" newer
    for bin in charon-node charonctl; do
        [[ -x $dir/$bin ]] || die "$dir/$bin is missing: build it (drop --no-cargo)"
        newer=$(find "$repo/node" "$repo/ctl" "$repo/proto" -newer "$dir/$bin" \
            \( -name '*.rs' -o -name '*.proto' -o -name Cargo.toml \) -print -quit 2>/dev/null || true)
        [[ -z $newer ]] || log "warning: $dir/$bin is older than ${newer#"$repo/"}: the image" \
            "gets a stale binary (drop --no-cargo to rebuild)"
    done
    new_context node
    for bin in charon-node charonctl; do
        put "$root" "$dir/$bin" "/usr/local/bin/$bin"
        # Debug info only makes the image bigger; symbols stay for backtraces.
        if command -v strip >/dev/null 2>&1; then
            strip --strip-debug "$root/usr/local/bin/$bin"
        fi
        put_libs "$root" "$dir/$bin"
    done
    local ca=/etc/ssl/certs/ca-certificates.crt
    [[ -r $ca ]] || die "$ca is missing: install the CA roots (apt-get install ca-certificates)"
    put "$root" "$ca"
    mkdir -p "$root/etc"
    echo 'charon:x:10001:10001:Charon:/var/lib/charon:/sbin/nologin' >"$root/etc/passwd"
    echo 'charon:x:10001:' >"$root/etc/group"
    echo 'hosts: files dns' >"$root/etc/nsswitch.conf"
    mkdir -p "$ctx/data"
    chmod 0700 "$ctx/data"
    docker_build charon "$here/Dockerfile"
}

build_haproxy() {
    local bin
    bin=$(command -v haproxy 2>/dev/null || echo /usr/sbin/haproxy)
    [[ -x $bin ]] || die "haproxy is not installed on this host (apt-get install haproxy)"
    new_context haproxy
    put "$root" "$bin" /usr/sbin/haproxy
    put_libs "$root" "$bin"
    mkdir -p "$root/etc/haproxy"
    echo 'haproxy:x:10002:10002:HAProxy:/nonexistent:/sbin/nologin' >"$root/etc/passwd"
    echo 'haproxy:x:10002:' >"$root/etc/group"
    echo 'hosts: files dns' >"$root/etc/nsswitch.conf"
    cp "$here/haproxy.cfg" "$root/etc/haproxy/haproxy.cfg"
    docker_build charon-haproxy "$here/Dockerfile.haproxy"
}

build_router() {
    local tool path
    new_context router
    for tool in dash sleep ip tc; do
        path=$(PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" 2>/dev/null) ||
            die "$tool is not installed on this host (dash, coreutils, iproute2)"
        put "$root" "$path" "/bin/$tool"
        put_libs "$root" "$path"
    done
    ln -s dash "$root/bin/sh"
    # tc's delay distributions (netem ... distribution normal).
    local dist
    for dist in /usr/lib/x86_64-linux-gnu/tc /usr/lib/tc /usr/lib64/tc; do
        if [[ -d $dist ]]; then
            mkdir -p "$root$dist"
            cp "$dist"/*.dist "$root$dist/" 2>/dev/null || true
            break
        fi
    done
    put "$root" "$here/router.sh" /usr/local/bin/charon-router
    docker_build charon-router "$here/Dockerfile.router"
}

for image in "${images[@]}"; do
    "build_$image"
done
