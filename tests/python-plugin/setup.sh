#!/usr/bin/env bash
# The Python example plugin's requirements (grpcio and friends), for tests/e2e/python_plugin.rs
# and its TLS variant. Idempotent; cheap when they are there.
set -euo pipefail
cd "$(dirname "$0")/../.."
probe="import grpc, grpc_tools, grpc_health.v1, grpc_status, google.protobuf"
if python3 -c "$probe" >/dev/null 2>&1; then
    echo "python-plugin-setup: requirements present"
    exit 0
fi
python3 -m pip install -q --disable-pip-version-check -r examples/python-plugin/requirements.txt
python3 -c "$probe"
echo "python-plugin-setup: requirements installed"
