# Sourced by the host scripts of `make test-container`: a running Docker daemon, a
# BuildKit-capable client and a base image, on a machine without a reachable registry.
# Functions: ensure_docker, build_cli, ensure_base_image IMAGE (prints the image to use).

log() { printf '[test-container] %s\n' "$*" >&2; }

ensure_docker() {
    if docker info >/dev/null 2>&1; then return 0; fi
    if ! command -v dockerd >/dev/null 2>&1; then
        [ "$(id -u)" = 0 ] || { log "docker is not installed and this is not root"; return 1; }
        log "installing docker.io and iptables (Debian packages)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            docker.io iptables >/dev/null
    fi
    if ! docker info >/dev/null 2>&1; then
        [ "$(id -u)" = 0 ] || { log "dockerd is not running and this is not root"; return 1; }
        log "starting dockerd (overlay2), log in ${DOCKERD_LOG:-/var/log/dockerd.log}"
        nohup dockerd --storage-driver overlay2 >"${DOCKERD_LOG:-/var/log/dockerd.log}" 2>&1 &
        for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && return 0; sleep 1; done
        log "dockerd did not start; see ${DOCKERD_LOG:-/var/log/dockerd.log}"; return 1
    fi
}

# A docker client that builds with BuildKit (RUN --mount, build secrets): one with the
# buildx plugin, or a client of Docker <= 22 (BuildKit built in). Debian bookworm's
# docker.io (20.10) is the latter; a newer client without buildx is not.
build_cli() {
    if docker buildx version >/dev/null 2>&1; then echo docker; return 0; fi
    for cli in /usr/bin/docker docker; do
        case "$("$cli" version --format '{{.Client.Version}}' 2>/dev/null)" in
            18.*|19.*|20.*|21.*|22.*) echo "$cli"; return 0 ;;
        esac
    done
    log "no docker client that can build with BuildKit: install docker-buildx"; return 1
}

# The base image: IMAGE when present or pullable, else a Debian bookworm minbase made with
# debootstrap from the Debian mirror and imported (about a minute, no registry needed).
ensure_base_image() {
    local image=$1 local_image=qsmprep-base:bookworm
    if docker image inspect "$image" >/dev/null 2>&1; then echo "$image"; return 0; fi
    if timeout 60 docker pull -q "$image" >/dev/null 2>&1; then echo "$image"; return 0; fi
    if docker image inspect "$local_image" >/dev/null 2>&1; then
        log "$image cannot be pulled; using the local $local_image"
        echo "$local_image"; return 0
    fi
    log "$image cannot be pulled; debootstrapping Debian bookworm (minbase) as $local_image"
    command -v debootstrap >/dev/null 2>&1 || { apt-get update -qq && \
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
    local root
    root=$(mktemp -d /var/tmp/qsmprep-rootfs.XXXXXX)
    nice -n 10 debootstrap --variant=minbase bookworm "$root" \
        "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null
    tar -C "$root" -c . | docker import - "$local_image" >/dev/null
    rm -rf "$root"
    echo "$local_image"
}
