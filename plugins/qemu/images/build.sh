#!/usr/bin/env bash
# Builds the kiln QEMU guest image `debian-bookworm`, reproducibly and without loop mounts:
#   debootstrap (Debian bookworm, from the mirror apt uses) → this directory's kiln-init and
#   kiln-boot → the host's cloud kernel modules → `mkfs.ext4 -d` on a sparse raw file →
#   `qemu-img convert` to qcow2. The kernel (the host's linux-image-cloud-amd64) and a minimal
#   initramfs (busybox-static, the virtio modules, initramfs-init) are kept next to the disk and
#   booted with -kernel/-initrd.
#
# Output (cached by the recipe's content hash: this script, kiln-init, kiln-boot, the package
# list and the kernel version):
#   $KILN_QEMU_CACHE/<hash>/{disk.qcow2,vmlinuz,initrd.img,recipe}
#   $KILN_QEMU_CACHE/images/debian-bookworm -> ../<hash>      (the plugin's --image-dir)
# KILN_QEMU_CACHE defaults to /var/cache/kiln/qemu. Prints the image directory. Needs root
# (debootstrap). Takes a few minutes; a second run with the same recipe is instant.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${KILN_QEMU_CACHE:-/var/cache/kiln/qemu}
name=debian-bookworm
packages=bash,git,nodejs,python3,ca-certificates,procps,iproute2,kmod,e2fsprogs,docker.io,tini,iptables,xz-utils
log() { printf 'qemu-image: %s\n' "$*" >&2; }

kver=$(ls /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sed 's|/boot/vmlinuz-||' | sort -V | tail -n1 || true)
if [ -z "$kver" ]; then
    log "no cloud kernel in /boot: installing linux-image-cloud-amd64"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends linux-image-cloud-amd64 >/dev/null
    kver=$(ls /boot/vmlinuz-*-cloud-amd64 | sed 's|/boot/vmlinuz-||' | sort -V | tail -n1)
fi
hash=$( { cat "$here/build.sh" "$here/kiln-init" "$here/kiln-boot" "$here/initramfs-init"; echo "$packages $kver"; } | sha256sum | cut -c1-16)
out="$cache/$hash"
if [ -f "$out/disk.qcow2" ] && [ -f "$out/recipe" ]; then
    mkdir -p "$cache/images" && ln -sfn "../$hash" "$cache/images/$name"
    log "$name is there ($out)"
    echo "$cache/images"
    exit 0
fi
for tool in debootstrap:debootstrap mkfs.ext4:e2fsprogs qemu-img:qemu-utils busybox:busybox-static cpio:cpio; do
    command -v "${tool%%:*}" >/dev/null || {
        log "installing ${tool#*:}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${tool#*:}" >/dev/null; }
done
mirror=$( { grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}';
            grep -h '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print $2}'; } \
          | grep -v security | head -n1 || true)
mirror=${mirror:-http://deb.debian.org/debian}
mkdir -p "$cache"
work=$(mktemp -d "$cache/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root="$work/root"
# The debootstrap tree is cached on its own (by the package list), so a change to kiln-init or
# kiln-boot rebuilds the disk in seconds.
base="$cache/rootfs-$(echo "bookworm $packages" | sha256sum | cut -c1-16).tar"
if [ ! -f "$base" ]; then
    log "debootstrap bookworm from $mirror (a few minutes)"
    debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
        tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" --numeric-owner -cf "$base.tmp" . && mv "$base.tmp" "$base"
else
    mkdir -p "$root" && tar -C "$root" --numeric-owner -xf "$base"
fi
install -m 0755 "$here/kiln-init" "$root/sbin/kiln-init"
install -m 0755 "$here/kiln-boot" "$root/usr/local/sbin/kiln-boot"
mkdir -p "$root/lib/modules"
cp -a "/lib/modules/$kver" "$root/lib/modules/"
echo 'kiln-vm' >"$root/etc/hostname"
printf '127.0.0.1 localhost kiln-vm\n::1 localhost\n' >"$root/etc/hosts"
printf '/dev/vda / ext4 rw 0 1\n' >"$root/etc/fstab"
# dockerd: json-file logs (the docker plugin reads them); no iptables (setting up its chains
# takes ~15 s under TCG, and containers need no NAT: nothing outside the VM is reachable
# anyway; containers on one bridge network reach each other without it).
mkdir -p "$root/etc/docker"
printf '{"log-driver":"json-file","iptables":false,"ip-masq":false}\n' >"$root/etc/docker/daemon.json"
log "mkfs.ext4 -d (no loop mount) and qemu-img convert"
truncate -s 8G "$work/disk.raw"
mkfs.ext4 -q -F -L kiln-root -E root_owner=0:0 -d "$root" "$work/disk.raw"
qemu-img convert -f raw -O qcow2 "$work/disk.raw" "$work/disk.qcow2"
cp "/boot/vmlinuz-$kver" "$work/vmlinuz"
# A minimal initramfs: busybox-static, the virtio modules for the root disk, initramfs-init.
ird="$work/initramfs"
mkdir -p "$ird/bin" "$ird/dev" "$ird/proc" "$ird/sys" "$ird/root" "$ird/lib/modules"
cp "$(command -v busybox)" "$ird/bin/busybox"
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    cp "$(modinfo -k "$kver" -n "$m")" "$ird/lib/modules/$m.ko"
done
install -m 0755 "$here/initramfs-init" "$ird/init"
(cd "$ird" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -1) >"$work/initrd.img"
printf 'name=%s\nkernel=%s\npackages=%s\nmirror=%s\n' "$name" "$kver" "$packages" "$mirror" >"$work/recipe"
mkdir -p "$out"
mv "$work/disk.qcow2" "$work/vmlinuz" "$work/initrd.img" "$out/"
mv "$work/recipe" "$out/recipe"
mkdir -p "$cache/images" && ln -sfn "../$hash" "$cache/images/$name"
log "built $name in $out"
echo "$cache/images"
