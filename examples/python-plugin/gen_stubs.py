#!/usr/bin/env python3
"""Generates the Python stubs of the kiln backend protocol.

Runs ``grpc_tools.protoc`` on ``proto/backend/v1/backend.proto`` of this repository and writes
``backend/v1/backend_pb2.py`` and ``backend/v1/backend_pb2_grpc.py`` into ``generated/`` next to
this file (or the directory given as the first argument). Equivalent to::

    python -m grpc_tools.protoc -I proto --python_out=DIR --grpc_python_out=DIR \\
        proto/backend/v1/backend.proto

``plugin.py`` calls :func:`ensure_stubs` at start-up, so running this script by hand is only
needed to regenerate after editing the proto (the plugin also regenerates when the proto is
newer than the stubs). The output is written to a temporary directory and renamed into place,
so concurrent start-ups never see half-written stubs.
"""

import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
PROTO_ROOT = os.path.join(REPO, "proto")
PROTO_FILE = os.path.join(PROTO_ROOT, "backend", "v1", "backend.proto")
DEFAULT_OUT = os.path.join(HERE, "generated")
STUBS = ("backend_pb2.py", "backend_pb2_grpc.py")


def _stub_paths(out):
    return [os.path.join(out, "backend", "v1", name) for name in STUBS]


def up_to_date(out=DEFAULT_OUT):
    """Whether the stubs in ``out`` exist and are newer than the proto file."""
    try:
        proto_mtime = os.path.getmtime(PROTO_FILE)
        return all(os.path.getmtime(p) >= proto_mtime for p in _stub_paths(out))
    except OSError:
        return False


def generate(out=DEFAULT_OUT):
    """Runs protoc into a fresh temporary directory and moves the result to ``out``."""
    from grpc_tools import protoc  # imported here: only generation needs grpcio-tools

    try:
        from importlib.resources import files

        well_known = str(files("grpc_tools") / "_proto")
    except (ImportError, TypeError):  # pragma: no cover - very old Pythons
        import pkg_resources

        well_known = pkg_resources.resource_filename("grpc_tools", "_proto")

    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".stubs-", dir=parent)
    try:
        code = protoc.main(
            [
                "grpc_tools.protoc",
                "-I" + PROTO_ROOT,
                "-I" + well_known,
                "--python_out=" + tmp,
                "--grpc_python_out=" + tmp,
                PROTO_FILE,
            ]
        )
        if code != 0:
            raise RuntimeError("grpc_tools.protoc failed with status %d" % code)
        old = None
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=".stubs-old-", dir=parent)
            os.rename(out, os.path.join(old, "x"))
        try:
            os.rename(tmp, out)
        except OSError:
            # Another process won the race: its stubs are as good as ours.
            if not up_to_date(out):
                raise
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_stubs(out=None):
    """Generates the stubs unless they are up to date, and puts their directory on
    ``sys.path``. The directory is ``out``, else ``$KILN_PYTHON_STUBS`` when set, else
    ``generated/`` next to this file, or a per-user temporary directory when that one cannot
    be written (a read-only checkout)."""
    out = out or os.environ.get("KILN_PYTHON_STUBS") or DEFAULT_OUT
    if not up_to_date(out):
        try:
            generate(out)
        except OSError:
            if out != DEFAULT_OUT:
                raise
            out = os.path.join(tempfile.gettempdir(), "kiln-python-plugin-stubs-%d" % os.getuid())
            if not up_to_date(out):
                generate(out)
    if out not in sys.path:
        sys.path.insert(0, out)
    return out


if __name__ == "__main__":
    target = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    generate(target)
    print("stubs written to %s" % target)
