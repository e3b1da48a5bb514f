#!/usr/bin/env bash
# Ensures what the LXC backend's tests need: Debian's LXC tools and the `debian` template
# (lxc, lxc-templates, debootstrap, rsync, distro-info), and the base container of
# debian:bookworm, built by the plugin itself (`kiln-plugin-lxc prepare`, the code path of a
# first job) into /var/cache/kiln/lxc/debian-bookworm-<recipe hash>. Idempotent: with the base
# cached (same recipe hash) it takes a second; a cold build debootstraps from the mirror apt
# uses and takes a few minutes. Needs root (LXC system containers).
set -euo pipefail
cd "$(dirname "$0")/../.."

log() { printf 'lxc-setup: %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
    log "not root: LXC system containers need root; the lxc tests will say they did not run"
    exit 0
fi
missing=()
for p in lxc lxc-templates debootstrap rsync distro-info; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
start=$(date +%s)
KILN_LOG="${KILN_LOG_SETUP:-info}" cargo run -q --locked -p kiln-plugin-lxc -- prepare debian:bookworm
log "base of debian:bookworm ready ($(( $(date +%s) - start )) s)"
