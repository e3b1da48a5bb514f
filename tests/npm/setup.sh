#!/usr/bin/env bash
# npm for the tests that install real clients from the npm registry (the job services'
# @actions/cache and @actions/artifact, the Node.js example plugin's @grpc/grpc-js): installs
# Debian's npm when it is missing. Idempotent; cheap when npm is there.
set -euo pipefail
if ! command -v npm >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null
fi
echo "npm $(npm --version), node $(node --version)"
