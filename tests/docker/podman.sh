#!/usr/bin/env bash
# Serves Podman's Docker-compatible API on a unix socket, for running the docker plugin's
# conformance suite and e2e tests against Podman instead of dockerd:
#
#   bash tests/docker/podman.sh            # prints the socket (only that, on stdout)
#   DOCKER_HOST=unix:///run/kiln-podman.sock cargo nextest run -p kiln-e2e -E 'test(docker)'
#
# Installs Debian's podman and catatonit (the docker plugin runs its primary containers with an
# init process; Podman's is catatonit) when missing, copies the local test images from dockerd
# (no registry is reachable), and starts `podman system service`. Idempotent.
#
# On these sandboxed machines Podman's default ulimits (nofile and nproc raised to the maximum)
# cannot be set by runc ("error setting rlimit type 7: operation not permitted"): a
# containers.conf with ulimits the machine allows is written, unless one exists.
set -euo pipefail
sock=/run/kiln-podman.sock
log() { printf 'podman-setup: %s\n' "$*" >&2; }

if ! command -v podman >/dev/null 2>&1 || [ ! -x /usr/libexec/podman/catatonit ]; then
    log "installing podman and catatonit"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman catatonit >/dev/null
fi
if [ ! -f /etc/containers/containers.conf ]; then
    mkdir -p /etc/containers
    nofile=$(ulimit -Hn)
    [ "$nofile" = unlimited ] && nofile=1048576
    cat >/etc/containers/containers.conf <<EOF
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=20000:20000"]
EOF
    log "wrote /etc/containers/containers.conf (ulimits this machine allows)"
fi
# Always a fresh service, started from `/`: one left by an earlier run may have a working
# directory that is gone, and then every container it starts fails ("write child: broken pipe").
if pkill -f "podman system service --time=0 unix://$sock" 2>/dev/null; then
    log "stopped the service of an earlier run"
    sleep 1
fi
log "starting podman system service on $sock"
cd /
nohup podman system service --time=0 "unix://$sock" </dev/null >/tmp/kiln-podman.log 2>&1 &
for _ in $(seq 1 30); do
    DOCKER_HOST="unix://$sock" docker version >/dev/null 2>&1 && break
    sleep 1
done
for image in kiln-test/busybox:1 kiln-test/httpd:1; do
    if ! podman image exists "$image" && docker image inspect "$image" >/dev/null 2>&1; then
        log "copying $image from dockerd"
        docker save "$image" | podman load >/dev/null
    fi
done
log "engine: $(DOCKER_HOST="unix://$sock" docker version --format '{{.Server.Version}} (API {{.Server.APIVersion}})')"
echo "unix://$sock"
