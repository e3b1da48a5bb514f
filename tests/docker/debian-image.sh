#!/usr/bin/env bash
# Builds kiln-test/debian:12, a Debian bookworm image with bash, git, nodejs and python3, from a
# debootstrap rootfs (no registry is reachable here), imported with `docker import`. Slow (a few
# minutes); used by the act-testdata corpus on Docker and the Docker benchmarks, not by CI.
set -euo pipefail
tag=kiln-test/debian:12
if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "debian-image: $tag is there"
    exit 0
fi
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
# The mirror apt is configured with (deb822 `URIs:` lines, or one-line `deb URL suite` entries).
mirror=$( { grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}';
            grep -h '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print $2}'; } \
          | grep -v security | head -n1 || true)
mirror=${mirror:-http://deb.debian.org/debian}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "debian-image: debootstrap bookworm from $mirror"
debootstrap --variant=minbase --include=bash,git,nodejs,python3,ca-certificates,procps bookworm "$root" "$mirror" >/tmp/kiln-debootstrap.log 2>&1 || {
    tail -n 30 /tmp/kiln-debootstrap.log; exit 1; }
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' -c 'CMD ["bash"]' - "$tag" >/dev/null
echo "debian-image: built $tag"
