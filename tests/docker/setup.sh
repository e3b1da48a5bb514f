#!/usr/bin/env bash
# Ensures a Docker engine for the docker plugin's tests: installs Debian's docker.io when dockerd
# is missing, starts dockerd when `docker info` fails, waits (bounded) for the socket, and builds
# the local test images (no registry is reachable). Idempotent; cheap when all is there.
#
# Images:
#   kiln-test/busybox:1  FROM scratch + Debian's busybox-static (sh, env, sleep, kill, find…)
#   kiln-test/httpd:1    busybox's httpd on :8080 with a HEALTHCHECK (a service for the tests)
# Tools: docker-registry (a local registry the force_pull test runs on loopback).
set -euo pipefail

log() { printf 'docker-setup: %s\n' "$*"; }

apt_updated=
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
        log "cannot install $* (needs root and apt-get): install Docker, then run this again"
        exit 1
    fi
    if [ -z "$apt_updated" ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if ! command -v dockerd >/dev/null 2>&1; then
    log "dockerd is missing: installing docker.io"
    apt_install docker.io
fi
if ! command -v docker >/dev/null 2>&1; then
    log "the docker client is missing: installing docker.io"
    apt_install docker.io
fi

if ! docker info >/dev/null 2>&1; then
    log "starting dockerd"
    nohup dockerd >/tmp/kiln-dockerd.log 2>&1 &
    for _ in $(seq 1 60); do
        if [ -S /var/run/docker.sock ] && docker info >/dev/null 2>&1; then
            break
        fi
        sleep 1
    done
    if ! docker info >/dev/null 2>&1; then
        log "dockerd did not come up within 60 s; its log:"
        tail -n 50 /tmp/kiln-dockerd.log || true
        exit 1
    fi
fi
log "engine: $(docker version --format '{{.Server.Version}} (API {{.Server.APIVersion}})')"

if ! docker image inspect kiln-test/busybox:1 >/dev/null 2>&1; then
    if ! dpkg -s busybox-static >/dev/null 2>&1; then
        log "installing busybox-static"
        apt_install busybox-static
    fi
    ctx=$(mktemp -d)
    trap 'rm -rf "$ctx"' EXIT
    cp /bin/busybox "$ctx/busybox"
    cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
CMD ["sh"]
DOCKERFILE
    log "building kiln-test/busybox:1"
    DOCKER_BUILDKIT=0 docker build -q -t kiln-test/busybox:1 "$ctx" >/dev/null
fi
if ! docker image inspect kiln-test/httpd:1 >/dev/null 2>&1; then
    ctx=$(mktemp -d)
    cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM kiln-test/busybox:1
RUN mkdir -p /www && echo service-ok > /www/index.html
HEALTHCHECK --interval=1s --timeout=2s --retries=30 CMD wget -q -O /dev/null http://127.0.0.1:8080/ || exit 1
CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]
DOCKERFILE
    log "building kiln-test/httpd:1"
    DOCKER_BUILDKIT=0 docker build -q -t kiln-test/httpd:1 "$ctx" >/dev/null
    rm -rf "$ctx"
fi
# Debian's registry (distribution 2.x) for the force_pull test, which starts its own instance on
# a loopback port; the package's system service is not started.
if ! command -v docker-registry >/dev/null 2>&1; then
    log "installing docker-registry"
    apt_install docker-registry
fi
log "ready"
