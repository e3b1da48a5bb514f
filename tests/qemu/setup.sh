#!/usr/bin/env bash
# Ensures what the qemu plugin's tests need: QEMU (qemu-system-x86, qemu-utils; with
# --no-install-recommends, so a newer qemu-utils already installed is kept), the host's cloud
# kernel, debootstrap, busybox-static and cpio for the image build, then builds (or finds, by
# its recipe's hash) the guest image debian-bookworm in /var/cache/kiln/qemu. The container
# tests also need the Docker test images of tests/docker/setup.sh (copied into the guests).
# Idempotent; a few minutes the first time (debootstrap), a second when the image is cached.
set -euo pipefail
cd "$(dirname "$0")/../.."
log() { printf 'qemu-setup: %s\n' "$*"; }
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v qemu-img >/dev/null || missing+=(qemu-utils)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v cpio >/dev/null || missing+=(cpio)
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
ls /boot/vmlinuz-*-cloud-amd64 >/dev/null 2>&1 || missing+=(linux-image-cloud-amd64)
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
images=$(bash plugins/qemu/images/build.sh)
log "images in $images: $(ls "$images" | tr '\n' ' ')"
