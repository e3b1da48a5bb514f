#!/usr/bin/env bash
# Builds kiln-test/node:2 for the job-services tests (tests/e2e/services.rs): kiln-test/busybox:1
# plus the host's own node, GNU tar, gzip and zstd with the shared libraries they load (ldd), so
# no registry is needed and the build takes seconds. Idempotent; needs tests/docker/setup.sh first.
set -euo pipefail
image=kiln-test/node:2
if docker image inspect "$image" >/dev/null 2>&1; then
    exit 0
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
bins=()
for b in node tar gzip zstd; do
    p=$(command -v "$b" || true)
    [ -n "$p" ] && bins+=("$(readlink -f "$p")")
done
for f in "${bins[@]}" $(ldd "${bins[@]}" 2>/dev/null | awk '/=>/ {print $3} $1 ~ /^\// {print $1}' | sort -u); do
    [ -e "$f" ] || continue
    mkdir -p "$ctx/root$(dirname "$f")"
    cp -L "$f" "$ctx/root$f"
done
mkdir -p "$ctx/root/usr/local/bin"
for b in node tar gzip zstd; do
    p=$(command -v "$b" || true)
    [ -n "$p" ] && ln -sf "$(readlink -f "$p")" "$ctx/root/usr/local/bin/$b"
done
# @actions/cache compresses with `zstdmt` and extracts with `unzstd`: zstd's own aliases.
if [ -e "$ctx/root/usr/local/bin/zstd" ]; then
    ln -sf zstd "$ctx/root/usr/local/bin/zstdmt"
    ln -sf zstd "$ctx/root/usr/local/bin/unzstd"
fi
cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM kiln-test/busybox:1
COPY root/ /
DOCKERFILE
docker build -q -t "$image" --label dev.kiln.role=test-image "$ctx" >/dev/null
echo "node-image: built $image"
