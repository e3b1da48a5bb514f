#!/usr/bin/env python3
"""A kiln backend plugin written in Python with grpcio: a host-style backend.

It speaks ``kiln.backend.v1`` (``proto/backend/v1/backend.proto``; behaviour in
``proto/backend/v1/README.md``) and shows that the plugin boundary does not depend on Rust.

* An environment is a private directory ``ROOT/<id>/`` (mode 0700) holding ``workspace/``,
  ``temp/``, ``tool-cache/``, ``runner/`` and ``env.json``: the owner labels, the spec hash
  (a replayed create is idempotent, another spec is ALREADY_EXISTS) and the paths. It is written
  before anything else, so ``ListEnvironments`` works from the files after a restart.
* The primary container is ``host``: the environment's own process space. The three container
  layers are declared UNSUPPORTED and answer UNIMPLEMENTED.
* An exec is one subprocess in its own process group with exactly the requested environment
  (plus ``path_prepend``); output is streamed in chunks as it comes; the stream ends with exactly
  one ``Exited`` frame when the main process exits (output is then drained briefly; background
  children keep running until the environment is removed). Timeouts, a cancelled stream and
  ``SignalExec`` run the kill sequence on the process group: the signal, the grace, SIGKILL.
  Groups are logged in ``ROOT/<id>/pgids`` (with the leader's start time and the kernel boot
  id), so ``Remove`` finds them after a plugin restart, and kills a group only when ``/proc``
  shows that it still belongs to the environment.
* Declared features: ``stdin``, ``exec_files`` and ``exec_timeout``. Not declared: ``tty``,
  ``local_copy``, ``image_build``, ``health`` (requests needing them answer UNIMPLEMENTED).

Run it as kiln runs a managed plugin::

    python3 examples/python-plugin/plugin.py --root /tmp/pyp \\
        --listen unix:///tmp/pyp.sock --exit-on-stdin-eof

or on TCP with mutual TLS (``--tls-ca``, ``--tls-cert``, ``--tls-key``), or plaintext TCP for
tests only (``--listen tcp://127.0.0.1:7443 --insecure``). Stubs are generated on first start
(see ``gen_stubs.py``).
"""

import argparse
import errno
import hashlib
import json
import logging
import os
import platform
import queue
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from concurrent import futures

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

try:
    import grpc
    from google.protobuf import any_pb2, json_format
    from google.rpc import status_pb2
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_status import rpc_status
except ImportError as missing:  # pragma: no cover - depends on the installation
    sys.stderr.write(
        "python-plugin: %s; install the requirements: pip install -r %s\n"
        % (missing, os.path.join(HERE, "requirements.txt"))
    )
    sys.exit(2)

import archive  # noqa: E402  (after the sys.path set-up)
import gen_stubs  # noqa: E402

gen_stubs.ensure_stubs()

from backend.v1 import backend_pb2 as pb  # noqa: E402
from backend.v1 import backend_pb2_grpc as pb_grpc  # noqa: E402

log = logging.getLogger("python-plugin")

PLUGIN_NAME = "python-host"
PLUGIN_VERSION = "0.1.0"
PROTOCOL_VERSION = 1
#: Request metadata: the client's protocol version(s), comma-separated.
PROTOCOL_VERSION_HEADER = "kiln-protocol-version"
#: Response metadata: this process's instance id.
INSTANCE_ID_HEADER = "kiln-instance-id"
SERVICE_NAME = "kiln.backend.v1.Backend"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

PRIMARY = "host"
META_FILE = "env.json"
GROUPS_FILE = "pgids"
OUTPUT_CHUNK = 64 * 1024
KEEPALIVE_S = 10.0
DRAIN_QUIET_S = 0.1
DRAIN_MAX_S = 0.5
DEFAULT_GRACE_S = 2.0
DEFAULT_COLLECT_LIMIT = 1024 * 1024
COLLECT_BUDGET = 8 * 1024 * 1024
#: Variables of the plugin's own environment reported as the primary container's image_env.
BASE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
NO_CONTAINERS = (
    "the python host plugin runs steps directly on this machine; configure a docker plugin "
    "for container:, services: and docker steps"
)

ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
LABEL_KEY_RE = re.compile(r"^[a-z0-9.-]{1,63}$")

# ---------------------------------------------------------------------------------------------
# Errors


class PluginError(Exception):
    """A failed call: a gRPC code, a lowercase message, and the ErrorDetail fields."""

    def __init__(self, code, message, fault=pb.FAULT_UNSPECIFIED, retryable=False, field=""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.fault = fault
        self.retryable = retryable
        self.field = field

    def status(self):
        """The ``grpc.Status`` carrying a ``google.rpc.Status`` with the packed ErrorDetail."""
        detail = any_pb2.Any()
        # Any.Pack uses "type.googleapis.com/" + the full name: kiln.backend.v1.ErrorDetail.
        detail.Pack(pb.ErrorDetail(fault=self.fault, retryable=self.retryable, field=self.field))
        return rpc_status.to_status(
            status_pb2.Status(code=self.code.value[0], message=self.message, details=[detail])
        )


def invalid(message, field="", fault=pb.FAULT_USER):
    return PluginError(grpc.StatusCode.INVALID_ARGUMENT, message, fault, field=field)


def not_found(message, field=""):
    return PluginError(grpc.StatusCode.NOT_FOUND, message, field=field)


def already_exists(message, field=""):
    return PluginError(grpc.StatusCode.ALREADY_EXISTS, message, field=field)


def failed_precondition(message, field="", fault=pb.FAULT_USER):
    return PluginError(grpc.StatusCode.FAILED_PRECONDITION, message, fault, field=field)


def unimplemented(message, field=""):
    return PluginError(grpc.StatusCode.UNIMPLEMENTED, message, pb.FAULT_CONFIG, field=field)


def permission_denied(message, field=""):
    return PluginError(grpc.StatusCode.PERMISSION_DENIED, message, pb.FAULT_USER, field=field)


def unavailable(message):
    return PluginError(
        grpc.StatusCode.UNAVAILABLE, message, pb.FAULT_INFRASTRUCTURE, retryable=True
    )


def internal(message, field=""):
    return PluginError(grpc.StatusCode.INTERNAL, message, pb.FAULT_INFRASTRUCTURE, field=field)


def io_error(what, err, field=""):
    """An OSError as RESOURCE_EXHAUSTED (disk full, quota) or INTERNAL."""
    import errno

    message = "%s: %s" % (what, err.strerror or err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return PluginError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, message, pb.FAULT_INFRASTRUCTURE, True, field
        )
    return internal(message, field)


def validate_id(value, field):
    """Caller-chosen ids: ``[a-z0-9-]{1,63}``, not starting or ending with ``-``."""
    if not ID_RE.match(value):
        raise invalid(
            "%s %s is not a valid id: use 1 to 63 characters of [a-z0-9-], not starting or "
            "ending with '-'" % (field, json.dumps(value)),
            field,
        )


def validate_labels(labels, field):
    for key in labels:
        if not LABEL_KEY_RE.match(key):
            raise invalid(
                'label key "%s" is not valid: use 1 to 63 characters of [a-z0-9.-]' % key, field
            )


# ---------------------------------------------------------------------------------------------
# Processes and process groups (never kill by PID alone)


def signal_group(pgid, sig):
    """Sends ``sig`` to the process group; returns whether the group existed."""
    if pgid <= 1:
        return False
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError as e:
        log.warning("cannot signal process group %d: %s", pgid, e)
        return False


def _read_stat(pid):
    """``(pgrp, start_ticks, zombie)`` of a process from ``/proc``, or None."""
    try:
        with open("/proc/%s/stat" % pid, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 1 :].split()
    try:
        return int(fields[2]), int(fields[19]), fields[0] in ("Z", "X")
    except (IndexError, ValueError):
        return None


def start_time(pid):
    """Start time of a process in clock ticks since boot; 0 when unknown."""
    s = _read_stat(pid)
    return s[1] if s else 0


def proc_table():
    """Processes of this machine by process group: ``{pgrp: [(pid, start, zombie)]}``."""
    table = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if not name.isdigit():
            continue
        s = _read_stat(name)
        if s:
            table.setdefault(s[0], []).append((int(name), s[1], s[2]))
    return table


def has_proc():
    return os.path.exists("/proc/self/stat")


def groups_alive(pgids):
    """Of ``pgids``, the groups with living (non-zombie) members."""
    signallable = []
    for g in pgids:
        try:
            if g > 1:
                os.killpg(g, 0)
                signallable.append(g)
        except ProcessLookupError:
            pass
        except PermissionError:
            signallable.append(g)
    if not signallable or not has_proc():
        return signallable
    table = proc_table()
    return [g for g in signallable if any(not z for _, _, z in table.get(g, ()))]


def _references(pid, directory):
    """Whether a process works inside ``directory`` or names it in its environment."""
    try:
        cwd = os.readlink("/proc/%d/cwd" % pid)
        if cwd == directory or cwd.startswith(directory + "/"):
            return True
    except OSError:
        pass
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            environ = f.read()
    except OSError:
        return False
    needle = directory.encode()
    for m in re.finditer(re.escape(needle), environ):
        after = environ[m.end() : m.end() + 1]
        if after in (b"", b"/", b"\0", b":"):
            return True
    return False


def group_belongs(table, pgid, start, directory):
    """Whether a recorded group still exists and belongs to the environment: its recorded
    leader is alive (same start time), or a member started no earlier and refers to the
    environment's directory."""
    members = [m for m in table.get(pgid, ()) if not m[2]]
    if not members:
        return False
    if start and any(pid == pgid and s == start for pid, s, _ in members):
        return True
    return any(s >= start and _references(pid, directory) for pid, s, _ in members)


def kernel_boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# Environments


def now_ms():
    return int(time.time() * 1000)


def go_os():
    return {"darwin": "darwin", "win32": "windows"}.get(
        sys.platform, sys.platform.rstrip("0123456789")
    )


def go_arch():
    machine = platform.machine().lower()
    return {
        "x86_64": "amd64",
        "amd64": "amd64",
        "aarch64": "arm64",
        "arm64": "arm64",
        "i386": "386",
        "i686": "386",
        "ppc64le": "ppc64le",
        "s390x": "s390x",
        "riscv64": "riscv64",
    }.get(machine, machine)


def spec_hash(req):
    """Hash of everything a replayed create must repeat (not ``created_at_unix_ms``)."""
    o = req.owner
    spec = {
        "label": req.label,
        "options": json_format.MessageToDict(req.options),
        "hints": [req.hints.job_container, req.hints.service_containers, req.hints.step_containers],
        "owner": {
            "runner_id": o.runner_id,
            "boot_id": o.boot_id,
            "job_id": o.job_id,
            "parent_environment_id": o.parent_environment_id,
            "expires_at_unix_ms": o.expires_at_unix_ms,
            "labels": dict(o.labels),
        },
    }
    data = json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()


def owner_message(o):
    return pb.Owner(
        runner_id=o["runner_id"],
        boot_id=o["boot_id"],
        job_id=o["job_id"],
        parent_environment_id=o["parent_environment_id"],
        created_at_unix_ms=o["created_at_unix_ms"],
        expires_at_unix_ms=o["expires_at_unix_ms"],
        labels=o["labels"],
    )


def write_file_atomically(path, data, mode=0o600):
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def read_meta(directory):
    """``env.json`` of an environment directory, or None when there is none."""
    try:
        with open(os.path.join(directory, META_FILE), "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise internal("%s/%s is unreadable: %s" % (directory, META_FILE, e)) from e


class Group:
    """A process group an exec of the environment started."""

    def __init__(self, pgid, start, handle=None):
        self.pgid = pgid
        self.start = start
        self.handle = handle


class Env:
    """An environment known to this plugin process; its state lives in its directory."""

    def __init__(self, directory, meta, exec_ids, groups):
        self.id = meta["id"]
        self.dir = directory
        self.meta = meta
        self.lock = threading.Lock()
        self.removed = False
        self.exec_ids = exec_ids
        self.groups = groups

    def environment(self):
        p = self.meta["paths"]
        return pb.Environment(
            id=self.id,
            primary_container_id=PRIMARY,
            os=go_os(),
            arch=go_arch(),
            paths=pb.Paths(
                workspace=p["workspace"],
                temp=p["temp"],
                tool_cache=p["tool_cache"],
                runner_files=p["runner_files"],
                home=p["home"],
            ),
            path_variable="PATH",
            path_separator=":",
            owner=owner_message(self.meta["owner"]),
        )

    def ensure_tree(self):
        p = self.meta["paths"]
        for d in (p["workspace"], p["temp"], p["tool_cache"], p["runner_files"]):
            os.makedirs(d, 0o700, exist_ok=True)

    def log_group(self, pgid, start, kernel_boot, exec_id):
        """Appends a started group to the ``pgids`` log (called with the lock held)."""
        line = "%d %d %s %s\n" % (pgid, start, kernel_boot or "-", exec_id)
        try:
            fd = os.open(
                os.path.join(self.dir, GROUPS_FILE), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
            )
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError as e:
            log.warning("environment %s: cannot write the process group log: %s", self.id, e)


def read_groups(directory, kernel_boot):
    """Exec ids and groups (of the current boot) from an environment's ``pgids`` log."""
    ids, groups = set(), []
    try:
        with open(os.path.join(directory, GROUPS_FILE)) as f:
            lines = f.read().splitlines()
    except OSError:
        return ids, groups
    for line in lines:
        fields = line.split(" ")
        if len(fields) != 4:
            continue
        ids.add(fields[3])
        try:
            pgid, start = int(fields[0]), int(fields[1])
        except ValueError:
            continue
        if pgid > 1 and kernel_boot and fields[2] == kernel_boot:
            groups.append(Group(pgid, start))
    return ids, groups


def inside(directory, path, field):
    """Checks that ``path`` is absolute, has no ``..`` and lies inside ``directory``
    (lexically: the host backend runs the workflow's code as this user anyway)."""
    if not path.startswith("/"):
        raise invalid('%s "%s" is not an absolute path' % (field, path), field)
    if ".." in path.split("/"):
        raise invalid("%s \"%s\" contains '..'" % (field, path), field)
    norm = os.path.normpath(path)
    if norm != directory and not norm.startswith(directory + "/"):
        raise permission_denied(
            '%s "%s" is outside the environment\'s directory %s' % (field, path, directory), field
        )
    return norm


def resolve_inside(directory, path, field, follow_last=True):
    """Like :func:`inside`, with the symlinks of the existing part of the path resolved (the
    last component too unless ``follow_last`` is false)."""
    if not path.startswith("/"):
        raise invalid('%s "%s" is not an absolute path' % (field, path), field)
    if ".." in path.split("/"):
        raise invalid("%s \"%s\" contains '..'" % (field, path), field)
    norm = os.path.normpath(path)
    head, last = (norm, "") if follow_last else os.path.split(norm)
    rest = []
    while not os.path.lexists(head) and head != "/":
        head, name = os.path.split(head)
        rest.append(name)
    resolved = os.path.join(os.path.realpath(head), *reversed(rest))
    if last:
        resolved = os.path.join(resolved, last)
    if resolved != directory and not resolved.startswith(directory + "/"):
        raise permission_denied(
            '%s "%s" is outside the environment\'s directory' % (field, path), field
        )
    return resolved


# ---------------------------------------------------------------------------------------------
# Execs


class ExecHandle:
    """A running or finished exec, reachable by id from any connection."""

    def __init__(self, exec_id, env_id, proc, with_stdin):
        self.exec_id = exec_id
        self.env_id = env_id
        self.proc = proc
        self.pgid = proc.pid if proc else 0
        self.done = threading.Event()
        self.streaming = True
        self.timed_out = False
        self.ended_at = None
        self.with_stdin = with_stdin
        self.stdin_lock = threading.Lock()
        self.stdin = proc.stdin if (proc and with_stdin) else None
        if not proc:
            self.done.set()

    def terminate(self, grace):
        """The kill sequence: SIGTERM to the group now; SIGKILL after ``grace`` if the main
        process still runs, or if other members are still there then."""
        signal_group(self.pgid, signal.SIGTERM)

        def escalate():
            started = time.monotonic()
            if not self.done.wait(grace):
                signal_group(self.pgid, signal.SIGKILL)
                return
            time.sleep(max(0.0, grace - (time.monotonic() - started)))
            if groups_alive([self.pgid]):
                signal_group(self.pgid, signal.SIGKILL)

        threading.Thread(target=escalate, name="kill-%s" % self.exec_id, daemon=True).start()

    def close_stdin(self):
        if self.stdin is not None and self.stdin_lock.acquire(blocking=False):
            try:
                if self.stdin is not None:
                    try:
                        self.stdin.close()
                    except OSError:
                        pass
                    self.stdin = None
            finally:
                self.stdin_lock.release()


def _open_parent(root, path, create):
    """A directory descriptor of ``path``'s parent below ``root``, walked one component at a
    time with O_NOFOLLOW: a symlink in a parent position is refused (PermissionError),
    missing directories are created when ``create``. Returns (fd, final name)."""
    rel = os.path.relpath(path, root)
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or parts[0] == ".." or ".." in parts:
        raise PermissionError("%s is outside %s" % (path, root))
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in parts[:-1]:
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                nfd = os.open(name, flags, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                nfd = os.open(name, flags, dir_fd=fd)
            except (NotADirectoryError, OSError) as e:
                if isinstance(e, FileNotFoundError):
                    raise
                raise PermissionError(
                    "%s: a symlink or a non-directory in a parent position" % path
                ) from e
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd, parts[-1]


def stage(root, path, content, mode):
    """Writes a staged file with exactly ``mode`` (0 means 0644), creating parents, never
    through a symlink: one in a parent position is refused, one at ``path`` replaced."""
    mode = (mode & 0o7777) or 0o644
    dfd, name = _open_parent(root, path, True)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, mode, dir_fd=dfd)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            os.unlink(name, dir_fd=dfd)
            fd = os.open(name, flags | os.O_EXCL, mode, dir_fd=dfd)
    finally:
        os.close(dfd)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
        os.fchmod(f.fileno(), mode)


def read_beneath(root, path, bound):
    """At most ``bound + 1`` bytes of the regular file ``path`` below ``root``; None when it
    is missing, a symlink, behind one, or not a regular file."""
    try:
        dfd, name = _open_parent(root, path, False)
    except OSError:
        return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    finally:
        os.close(dfd)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return None
        return fh.read(bound + 1)


def collect_files(root, paths, names, limit):
    """Reads the files to collect, each bounded by ``limit`` and all by COLLECT_BUDGET, never
    through a symlink (a GITHUB_ENV linked outside the environment comes back missing)."""
    budget = COLLECT_BUDGET
    out = []
    for path, name in zip(paths, names):
        bound = min(limit, budget)
        f = pb.CollectedFile(path=name)
        data = read_beneath(root, path, bound)
        if data is None:
            f.missing = True
        else:
            if len(data) > bound:
                data = data[:bound]
                f.truncated = True
            budget -= len(data)
            f.content = data
        out.append(f)
    return out


def child_environment(req):
    """Exactly the requested variables (the last of equal names wins), plus path_prepend."""
    env = {}
    for v in req.env:
        env[v.name] = v.value
    if req.path_prepend:
        prefix = ":".join(req.path_prepend)
        env["PATH"] = prefix + ":" + env["PATH"] if env.get("PATH") else prefix
    return env


class Cgroups:
    """Every process of an environment ends with Remove (§5.12), also one that called setsid
    or double-forked: one cgroup v2 per environment under ``<own cgroup>/kiln-<hash>`` when
    the cgroup filesystem is writable. The plugin moves itself into the environment's cgroup
    around each spawn (under a lock), so the child is born contained; Remove freezes the
    cgroup, sends SIGTERM to its members, waits the grace, then writes ``cgroup.kill``.
    Without a writable cgroup v2, Remove also ends every process that works inside or names
    the environment's directory (evidence, §6.3)."""

    def __init__(self, root):
        self.lock = threading.Lock()
        self.base = self.home = None
        try:
            mount = None
            with open("/proc/self/mountinfo") as f:
                for line in f:
                    left, _, right = line.partition(" - ")
                    if right.split()[:1] == ["cgroup2"]:
                        mount = left.split()[4]
                        break
            own = None
            with open("/proc/self/cgroup") as f:
                for line in f:
                    if line.startswith("0::"):
                        own = line[3:].strip().lstrip("/")
            if mount is None or own is None:
                return
            home = os.path.join(mount, own) if own else mount
            tag = hashlib.sha256(os.fsencode(root)).hexdigest()[:16]
            base = os.path.join(home, "kiln-py-" + tag)
            os.makedirs(base, exist_ok=True)
            probe = os.path.join(base, "probe-%d" % os.getpid())
            os.mkdir(probe)
            os.rmdir(probe)
            if os.path.isfile(os.path.join(home, "cgroup.procs")):
                self.base, self.home = base, home
        except OSError as e:
            log.info("no writable cgroup v2 (%s): environments are held by /proc evidence", e)

    def spawn_in(self, env_id, env_dir, spawn):
        if self.base is None:
            return spawn()
        cg = os.path.join(self.base, env_id)
        try:
            os.makedirs(cg, exist_ok=True)  # also the base, if a tidy-up removed it
            with open(os.path.join(env_dir, "cgroup"), "w") as f:
                f.write(cg)
        except OSError:
            return spawn()
        me = str(os.getpid())
        with self.lock:
            try:
                with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                    f.write(me)
                entered = True
            except OSError:
                entered = False
            try:
                return spawn()
            finally:
                if entered:
                    with open(os.path.join(self.home, "cgroup.procs"), "w") as f:
                        f.write(me)

    @staticmethod
    def _members(cg):
        try:
            with open(os.path.join(cg, "cgroup.procs")) as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def end_all(self, env_id, env_dir, grace):
        cgs = []
        try:
            with open(os.path.join(env_dir, "cgroup")) as f:
                cgs.append(f.read().strip())
        except OSError:
            pass
        if self.base is not None and os.path.join(self.base, env_id) not in cgs:
            cgs.append(os.path.join(self.base, env_id))
        for cg in cgs:
            if not os.path.isfile(os.path.join(cg, "cgroup.procs")):
                continue
            freeze = os.path.join(cg, "cgroup.freeze")
            try:
                with open(freeze, "w") as f:
                    f.write("1")
                frozen = True
            except OSError:
                frozen = False
            for pid in self._members(cg):
                try:
                    os.kill(pid, signal.SIGTERM)
                except OSError:
                    pass
            if frozen:
                with open(freeze, "w") as f:
                    f.write("0")
            deadline = time.monotonic() + grace
            while self._members(cg) and time.monotonic() < deadline:
                time.sleep(0.02)
            stop = time.monotonic() + 5
            while self._members(cg) and time.monotonic() < stop:
                try:
                    with open(os.path.join(cg, "cgroup.kill"), "w") as f:
                        f.write("1")
                except OSError:
                    for pid in self._members(cg):
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except OSError:
                            pass
                time.sleep(0.02)
            for _ in range(100):
                try:
                    os.rmdir(cg)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
        # Evidence: processes that work inside or name the environment's directory.
        me = os.getpid()
        pids = []
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) != me and _references(int(name), env_dir):
                pids.append(int(name))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            if sig == signal.SIGTERM and pids:
                deadline = time.monotonic() + grace
                while time.monotonic() < deadline and any(
                    os.path.exists("/proc/%d/cwd" % p) for p in pids
                ):
                    time.sleep(0.02)


class ExecPlan:
    """What the streaming part of an exec needs."""

    def __init__(self, req, collect, root):
        self.root = root
        self.collect = collect
        self.collect_names = list(req.collect)
        self.collect_limit = req.collect_limit_bytes or DEFAULT_COLLECT_LIMIT
        self.timeout = req.timeout_ms / 1000.0 if req.timeout_ms else None
        self.grace = req.grace_ms / 1000.0 if req.grace_ms else DEFAULT_GRACE_S
        self.started = time.monotonic()


def spawn_failure_events(err, program, cwd, plan):
    """A program that could not start, reported as a shell would: 127 or 126."""
    if isinstance(err, (FileNotFoundError, NotADirectoryError)) and not os.path.isdir(cwd):
        code, message = 127, "python-host: working directory %s does not exist\n" % cwd
    elif isinstance(err, FileNotFoundError):
        code, message = 127, "python-host: %s: command not found\n" % program
    elif isinstance(err, PermissionError):
        code, message = 126, "python-host: %s: permission denied\n" % program
    else:
        raise unavailable("cannot start %s: %s" % (program, err))
    files = collect_files(plan.root, plan.collect, plan.collect_names, plan.collect_limit)
    duration = int((time.monotonic() - plan.started) * 1000)
    return [
        pb.ExecEvent(started=pb.Started()),
        pb.ExecEvent(output=pb.Output(stream=pb.STREAM_STDERR, data=message.encode())),
        pb.ExecEvent(exited=pb.Exited(exit_code=code, files=files, duration_ms=duration)),
    ]


def stream_exec(handle, plan, context):
    """Starts streaming one process: Started, output as it arrives, keepalives, then ``Exited``.
    The threads start now (not at the first ``next``), so a process is never left unread.

    Reader threads feed a bounded queue (a slow client pauses them: backpressure). The exec is
    finished when the main process exits; output is then drained until quiet for
    DRAIN_QUIET_S, at most DRAIN_MAX_S, and what background processes write later is read and
    discarded so they never get SIGPIPE.
    """
    proc = handle.proc
    events = queue.Queue(maxsize=32)

    def put(item):
        while handle.streaming:
            try:
                events.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def reader(pipe, which):
        fd = pipe.fileno()
        while True:
            try:
                data = os.read(fd, OUTPUT_CHUNK)
            except OSError:
                data = b""
            if not data:
                break
            if handle.streaming:
                put(("out", which, data))
        pipe.close()
        put(("eof", which, None))

    def waiter():
        proc.wait()
        handle.ended_at = time.monotonic()
        handle.done.set()
        try:
            events.put_nowait(("exit", None, None))
        except queue.Full:
            pass  # the consumer is busy and checks `done` on every item

    def on_rpc_end():
        # Called when the RPC ends for any reason. Before the main process exited that means
        # the client cancelled or disconnected: run the kill sequence.
        handle.streaming = False
        if not handle.done.is_set():
            log.debug("exec %s: stream cancelled, terminating its process group", handle.exec_id)
            handle.terminate(plan.grace)

    def on_timeout():
        if not handle.done.is_set():
            handle.timed_out = True
            log.debug("exec %s: timed out, terminating its process group", handle.exec_id)
            handle.terminate(plan.grace)

    threads = [
        threading.Thread(target=reader, args=(proc.stdout, pb.STREAM_STDOUT), daemon=True),
        threading.Thread(target=reader, args=(proc.stderr, pb.STREAM_STDERR), daemon=True),
        threading.Thread(target=waiter, daemon=True),
    ]
    for t in threads:
        t.start()
    timer = None
    if plan.timeout:
        timer = threading.Timer(plan.timeout, on_timeout)
        timer.daemon = True
        timer.start()
    if not context.add_callback(on_rpc_end):
        on_rpc_end()
    return _exec_events(handle, plan, events, timer)


def _exec_events(handle, plan, events, timer):
    """The event iterator of :func:`stream_exec`."""
    proc = handle.proc
    try:
        yield pb.ExecEvent(started=pb.Started())
        last_sent = time.monotonic()
        open_pipes = 2
        drain_cap = quiet_until = None
        while True:
            now = time.monotonic()
            if handle.done.is_set() and drain_cap is None:
                drain_cap = now + DRAIN_MAX_S
                quiet_until = now + DRAIN_QUIET_S
            if drain_cap is not None:
                limit = min(quiet_until, drain_cap)
                if open_pipes == 0 or now >= limit:
                    break
                wait = limit - now
            else:
                wait = max(0.0, last_sent + KEEPALIVE_S - now)
            try:
                kind, which, data = events.get(timeout=wait)
            except queue.Empty:
                if drain_cap is None and time.monotonic() - last_sent >= KEEPALIVE_S:
                    yield pb.ExecEvent(keepalive=pb.Keepalive())
                    last_sent = time.monotonic()
                continue
            if kind == "out":
                yield pb.ExecEvent(output=pb.Output(stream=which, data=data))
                last_sent = time.monotonic()
                if drain_cap is not None:
                    quiet_until = last_sent + DRAIN_QUIET_S
            elif kind == "eof":
                open_pipes -= 1
        if timer:
            timer.cancel()
        # From here on, what background processes write is read and discarded.
        handle.streaming = False
        handle.close_stdin()
        rc = proc.returncode
        exited = pb.Exited(
            timed_out=handle.timed_out,
            files=collect_files(plan.root, plan.collect, plan.collect_names, plan.collect_limit),
            duration_ms=int(((handle.ended_at or time.monotonic()) - plan.started) * 1000),
        )
        if rc is not None and rc < 0:
            exited.signal = -rc
        else:
            exited.exit_code = rc if rc is not None else -1
        yield pb.ExecEvent(exited=exited)
    finally:
        handle.streaming = False
        if timer:
            timer.cancel()


# ---------------------------------------------------------------------------------------------
# The backend


class HostBackend:
    """Environments under ``root``; all state that must survive a restart is on disk."""

    def __init__(self, root):
        os.makedirs(root, 0o700, exist_ok=True)
        os.chmod(root, 0o700)
        self.root = os.path.realpath(root)
        self.instance_id = uuid.uuid4().hex
        self.kernel_boot = kernel_boot_id()
        self.cgroups = Cgroups(root)
        self.home = os.environ.get("HOME") or os.path.expanduser("~") or "/"
        self.lock = threading.Lock()
        self.envs = {}
        self.execs = {}
        self.used_exec_ids = set()

    # -- helpers --------------------------------------------------------------------------

    def _env_locked(self, env_id):
        """The environment (loaded from disk when needed), or None. Holds ``self.lock``."""
        env = self.envs.get(env_id)
        if env is not None:
            return env
        directory = os.path.join(self.root, env_id)
        meta = read_meta(directory)
        if meta is None:
            return None
        ids, groups = read_groups(directory, self.kernel_boot)
        env = Env(directory, meta, ids, groups)
        self.envs[env_id] = env
        return env

    def env(self, env_id):
        with self.lock:
            return self._env_locked(env_id)

    def live_env(self, env_id):
        validate_id(env_id, "environment_id")
        env = self.env(env_id)
        if env is None or env.removed:
            raise not_found('environment "%s" does not exist' % env_id, "environment_id")
        return env

    @staticmethod
    def check_container(env, container_id):
        validate_id(container_id, "container_id")
        if container_id != PRIMARY:
            raise not_found(
                'container "%s" does not exist in environment "%s": this backend has only its '
                'primary container "%s"' % (container_id, env.id, PRIMARY),
                "container_id",
            )

    def exec_id_used(self, exec_id):
        """Whether an exec id was used by this process or is in any environment's log."""
        if exec_id in self.used_exec_ids:
            return True
        try:
            names = os.listdir(self.root)
        except OSError:
            return False
        token = (" %s" % exec_id).encode()
        for name in names:
            try:
                with open(os.path.join(self.root, name, GROUPS_FILE), "rb") as f:
                    if any(line.rstrip(b"\n").endswith(token) for line in f):
                        return True
            except OSError:
                continue
        return False

    # -- RPCs -----------------------------------------------------------------------------

    def capabilities(self, req):
        if req.protocol_versions and PROTOCOL_VERSION not in req.protocol_versions:
            raise failed_precondition(
                'protocol version mismatch: the client speaks %s, plugin "%s" speaks %d'
                % (list(req.protocol_versions), PLUGIN_NAME, PROTOCOL_VERSION),
                fault=pb.FAULT_CONFIG,
            )
        unsupported = pb.LayerSupport(support=pb.SUPPORT_UNSUPPORTED, detail=NO_CONTAINERS)
        return pb.CapabilitiesResponse(
            plugin_name=PLUGIN_NAME,
            plugin_version=PLUGIN_VERSION,
            protocol_version=PROTOCOL_VERSION,
            instance_id=self.instance_id,
            environment=pb.LayerSupport(support=pb.SUPPORT_NATIVE),
            job_container=unsupported,
            service_containers=unsupported,
            step_containers=unsupported,
            features=pb.Features(stdin=True, exec_files=True, exec_timeout=True),
            os=go_os(),
            arch=go_arch(),
            max_message_bytes=MAX_MESSAGE_BYTES,
        )

    def create_environment(self, req):
        env_id = req.environment_id
        validate_id(env_id, "environment_id")
        validate_labels(req.owner.labels, "owner.labels")
        for key in json_format.MessageToDict(req.options):
            raise invalid(
                'unknown option "%s": the python host plugin takes no options' % key,
                "options." + key,
                pb.FAULT_CONFIG,
            )
        digest = spec_hash(req)
        with self.lock:
            env = self._env_locked(env_id)
            if env is not None:
                if env.removed:
                    raise unavailable(
                        'environment "%s" is being removed; retry the create' % env_id
                    )
                if env.meta["spec_hash"] != digest:
                    raise already_exists(
                        'environment "%s" exists with a different spec' % env_id, "environment_id"
                    )
                try:
                    env.ensure_tree()
                except OSError as e:
                    raise io_error('repairing environment "%s"' % env_id, e) from e
                return env.environment()
            directory = os.path.join(self.root, env_id)
            o = req.owner
            meta = {
                "format": 1,
                "id": env_id,
                "spec_hash": digest,
                "label": req.label,
                "owner": {
                    "runner_id": o.runner_id,
                    "boot_id": o.boot_id,
                    "job_id": o.job_id,
                    "parent_environment_id": o.parent_environment_id,
                    "created_at_unix_ms": now_ms(),
                    "expires_at_unix_ms": o.expires_at_unix_ms,
                    "labels": dict(o.labels),
                },
                "paths": {
                    "workspace": os.path.join(directory, "workspace"),
                    "temp": os.path.join(directory, "temp"),
                    "tool_cache": os.path.join(directory, "tool-cache"),
                    "runner_files": os.path.join(directory, "runner"),
                    "home": self.home,
                },
            }
            env = Env(directory, meta, set(), [])
            try:
                try:
                    os.mkdir(directory, 0o700)
                except FileExistsError:
                    pass  # an interrupted create of the same id: finish it
                # env.json first, so an interrupted create is still listed and collected.
                write_file_atomically(
                    os.path.join(directory, META_FILE), json.dumps(meta, indent=2).encode()
                )
                env.ensure_tree()
            except OSError as e:
                raise io_error('creating environment "%s"' % env_id, e) from e
            self.envs[env_id] = env
        log.info("environment %s created (runner %s, job %s)", env_id, o.runner_id, o.job_id)
        return env.environment()

    def create_container(self, req, layer):
        validate_id(req.environment_id, "environment_id")
        validate_id(req.container_id, "container_id")
        self.live_env(req.environment_id)
        raise unimplemented("the %s layer is not supported: %s" % (layer, NO_CONTAINERS), layer)

    def start_container(self, ref):
        env = self.live_env(ref.environment_id)
        self.check_container(env, ref.container_id)
        raise unimplemented(
            'this backend has no startable containers: the primary container "%s" always runs'
            % PRIMARY
        )

    def inspect(self, ref):
        env = self.live_env(ref.environment_id)
        self.check_container(env, ref.container_id)
        image_env = ["%s=%s" % (k, os.environ[k]) for k in BASE_ENV if k in os.environ]
        return pb.ContainerStatus(
            id=PRIMARY,
            state=pb.CONTAINER_STATE_RUNNING,
            health=pb.HEALTH_NONE,
            image_env=image_env,
        )

    def exec(self, req, context):
        """Validates, reserves the id, stages files, spawns; returns the event iterator."""
        validate_id(req.exec_id, "exec_id")
        env = self.live_env(req.environment_id)
        self.check_container(env, req.container_id)
        if req.tty:
            raise unimplemented("tty is not supported by this plugin", "tty")
        if not req.argv:
            raise invalid("argv is empty: this backend has no entrypoint to run", "argv")
        cwd = req.working_dir or env.meta["paths"]["workspace"]
        if not cwd.startswith("/"):
            raise invalid(
                'working_dir "%s" is not an absolute path' % req.working_dir, "working_dir"
            )
        collect = [inside(env.dir, c, "collect[%d]" % i) for i, c in enumerate(req.collect)]
        staged = [
            (inside(env.dir, f.path, "files[%d].path" % i), f) for i, f in enumerate(req.files)
        ]
        plan = ExecPlan(req, collect, env.dir)
        child_env = child_environment(req)

        with env.lock:
            if env.removed:
                raise not_found('environment "%s" was removed' % env.id, "environment_id")
            with self.lock:
                if req.exec_id in env.exec_ids or self.exec_id_used(req.exec_id):
                    raise already_exists(
                        'exec id "%s" was used before: exec is not replayable' % req.exec_id,
                        "exec_id",
                    )
                self.used_exec_ids.add(req.exec_id)
            env.exec_ids.add(req.exec_id)
            for i, (path, f) in enumerate(staged):
                try:
                    stage(env.dir, path, f.content, f.mode)
                except PermissionError as e:
                    raise permission_denied(
                        "staging %s: %s" % (path, e), "files[%d].path" % i
                    ) from e
                except OSError as e:
                    raise io_error("staging %s" % path, e, "files[%d].path" % i) from e
            kwargs = {}
            if sys.version_info >= (3, 11):
                kwargs["process_group"] = 0
            else:  # pragma: no cover
                kwargs["preexec_fn"] = os.setpgrp
            try:
                proc = self.cgroups.spawn_in(
                    env.id,
                    env.dir,
                    lambda: subprocess.Popen(
                        list(req.argv),
                        env=child_env,
                        cwd=cwd,
                        stdin=subprocess.PIPE if req.stdin else subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        close_fds=True,
                        **kwargs,
                    ),
                )
            except OSError as e:
                env.log_group(0, 0, self.kernel_boot, req.exec_id)
                with self.lock:
                    self.execs[req.exec_id] = ExecHandle(req.exec_id, env.id, None, False)
                return iter(spawn_failure_events(e, req.argv[0], cwd, plan))
            handle = ExecHandle(req.exec_id, env.id, proc, req.stdin)
            env.log_group(proc.pid, start_time(proc.pid), self.kernel_boot, req.exec_id)
            env.groups.append(Group(proc.pid, start_time(proc.pid), handle))
            with self.lock:
                self.execs[req.exec_id] = handle
        return stream_exec(handle, plan, context)

    def _handle(self, exec_id):
        """The handle of an exec of this process; None for an exec id used before (ended or
        of a previous instance); NOT_FOUND for an unknown one."""
        validate_id(exec_id, "exec_id")
        with self.lock:
            handle = self.execs.get(exec_id)
            if handle is not None:
                return handle
            if self.exec_id_used(exec_id):
                return None
        raise not_found('exec "%s" does not exist' % exec_id, "exec_id")

    def signal_exec(self, req):
        max_signal = getattr(signal, "SIGRTMAX", 64)
        if not 1 <= req.signal <= max_signal:
            raise invalid("%d is not a signal number" % req.signal, "signal")
        handle = self._handle(req.exec_id)
        if handle is None or handle.done.is_set():
            return pb.SignalExecResponse(delivered=False)
        if not signal_group(handle.pgid, req.signal):
            return pb.SignalExecResponse(delivered=False)
        if req.signal != signal.SIGKILL:
            grace = req.grace_ms / 1000.0 if req.grace_ms else DEFAULT_GRACE_S

            def escalate():
                if not handle.done.wait(grace):
                    signal_group(handle.pgid, signal.SIGKILL)

            threading.Thread(target=escalate, daemon=True).start()
        return pb.SignalExecResponse(delivered=True)

    def write_stdin(self, chunks):
        first = next(chunks, None)
        if first is None or not first.exec_id:
            raise invalid("the first stdin chunk must name the exec", "exec_id")
        exec_id = first.exec_id
        handle = self._handle(exec_id)
        if handle is None:
            raise failed_precondition('exec "%s" is no longer running' % exec_id, "exec_id")
        if not handle.with_stdin:
            raise failed_precondition('exec "%s" was not started with stdin' % exec_id, "exec_id")
        written = 0
        with handle.stdin_lock:
            pipe = handle.stdin
            if pipe is None:
                raise failed_precondition('the stdin of exec "%s" is closed' % exec_id)
            try:
                chunk = first
                while chunk is not None:
                    if chunk.data:
                        pipe.write(chunk.data)
                        pipe.flush()
                        written += len(chunk.data)
                    if chunk.eof:
                        break  # data after an eof chunk is never written
                    chunk = next(chunks, None)
            except (BrokenPipeError, ValueError, OSError) as e:
                raise failed_precondition(
                    'writing the stdin of exec "%s": %s' % (exec_id, e)
                ) from e
            finally:
                try:
                    pipe.close()
                except OSError:
                    pass
                handle.stdin = None
        return pb.WriteStdinResponse(bytes=written)

    def copy_in(self, chunks):
        first = next(chunks, None)
        if first is None or first.WhichOneof("chunk") != "header":
            raise invalid("the first CopyIn frame must be the header", "header")
        h = first.header
        env = self.live_env(h.environment_id)
        self.check_container(env, h.container_id)
        if h.local_path:
            raise unimplemented("local_path is not supported (feature local_copy)", "local_path")
        dest = resolve_inside(env.dir, h.dest_path, "dest_path")

        def data():
            for c in chunks:
                if c.WhichOneof("chunk") != "data":
                    raise invalid("only data frames may follow the header", "data")
                yield c.data

        try:
            entries, size = archive.unpack(data(), dest)
        except archive.ArchiveError as e:
            raise invalid(str(e), "data") from e
        except OSError as e:
            raise io_error("extracting into %s" % h.dest_path, e) from e
        return pb.CopyInResponse(entries=entries, bytes=size)

    def copy_out(self, req, context):
        env = self.live_env(req.environment_id)
        self.check_container(env, req.container_id)
        path = resolve_inside(env.dir, req.path, "path", follow_last=False)
        if not os.path.lexists(path):
            raise not_found("%s does not exist" % req.path, "path")
        chunks = queue.Queue(maxsize=4)
        state = {"active": True}
        context.add_callback(lambda: state.update(active=False))

        def emit(item):
            while state["active"]:
                try:
                    chunks.put(item, timeout=0.2)
                    return
                except queue.Full:
                    continue
            raise BrokenPipeError("the client went away")

        def produce():
            try:
                archive.pack(path, lambda data: emit(("data", data)))
                emit(("end", None))
            except BrokenPipeError:
                pass
            except Exception as e:  # noqa: BLE001 - reported to the client
                try:
                    emit(("error", e))
                except BrokenPipeError:
                    pass

        threading.Thread(target=produce, name="copy-out", daemon=True).start()

        def stream():
            while True:
                kind, item = chunks.get()
                if kind == "data":
                    yield pb.CopyOutChunk(data=item)
                elif kind == "end":
                    return
                elif isinstance(item, OSError):
                    raise io_error("archiving %s" % req.path, item)
                else:
                    raise internal("archiving %s: %s" % (req.path, item))

        return stream()

    def remove(self, req):
        env_id = req.environment_id
        validate_id(env_id, "environment_id")
        if req.container_id:
            validate_id(req.container_id, "container_id")
            return pb.RemoveResponse(existed=False)  # the primary container lives with its env
        grace = req.grace_ms / 1000.0 if req.grace_ms else DEFAULT_GRACE_S
        directory = os.path.join(self.root, env_id)
        with self.lock:
            env = self._env_locked(env_id)
        if env is None:
            if os.path.isdir(directory):
                self._delete_tree(directory)
                return pb.RemoveResponse(existed=True)
            return pb.RemoveResponse(existed=False)
        with env.lock:
            env.removed = True
            groups = list(env.groups)
        self._kill_groups(env, groups, grace)
        self.cgroups.end_all(env.id, env.dir, grace)
        self._delete_tree(directory)
        with self.lock:
            if self.envs.get(env_id) is env:
                del self.envs[env_id]
            for exec_id in env.exec_ids:
                self.used_exec_ids.add(exec_id)
                handle = self.execs.get(exec_id)
                if handle is not None and handle.done.is_set():
                    del self.execs[exec_id]
        log.info("environment %s removed", env_id)
        return pb.RemoveResponse(existed=True)

    @staticmethod
    def _kill_groups(env, groups, grace):
        """SIGTERM to every group of the environment, the grace, then SIGKILL. Groups whose
        leader this process has not reaped are certainly ours; others are killed only when
        ``/proc`` shows that they still belong to the environment."""
        alive = set(groups_alive([g.pgid for g in groups]))
        table = None
        targets = []
        for g in groups:
            if g.handle is not None and not g.handle.done.is_set():
                targets.append(g.pgid)
                continue
            if g.pgid not in alive:
                continue
            if table is None:
                table = proc_table()
            if group_belongs(table, g.pgid, g.start, env.dir):
                targets.append(g.pgid)
            else:
                log.warning(
                    "environment %s: not killing process group %d: it cannot be shown to "
                    "belong to the environment",
                    env.id,
                    g.pgid,
                )
        if not targets:
            return
        for pgid in targets:
            signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while targets and time.monotonic() < deadline:
            time.sleep(0.02)
            targets = groups_alive(targets)
        for pgid in targets:
            log.debug("environment %s: group %d survived SIGTERM: killing", env.id, pgid)
            signal_group(pgid, signal.SIGKILL)

    @staticmethod
    def _delete_tree(directory):
        def make_writable(func, path, _exc):
            try:
                os.chmod(os.path.dirname(path), 0o700)
                if not os.path.islink(path) and os.path.isdir(path):
                    os.chmod(path, 0o700)
            except OSError:
                pass
            func(path)

        for attempt in range(5):
            try:
                shutil.rmtree(directory, onerror=make_writable)
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if attempt == 4:
                    raise io_error("removing %s" % directory, e) from e
                time.sleep(0.05)

    def list_environments(self, req):
        validate_labels(req.labels, "labels")
        out = []
        try:
            names = sorted(os.listdir(self.root))
        except OSError as e:
            raise io_error("listing %s" % self.root, e) from e
        for name in names:
            if not ID_RE.match(name):
                continue
            with self.lock:
                env = self.envs.get(name)
                if env is not None and env.removed:
                    continue
            try:
                meta = read_meta(os.path.join(self.root, name))
            except PluginError as e:
                log.warning("%s", e.message)
                continue
            if meta is None:
                continue
            owner = meta["owner"]
            if req.runner_id and owner["runner_id"] != req.runner_id:
                continue
            if any(owner["labels"].get(k) != v for k, v in req.labels.items()):
                continue
            out.append(
                pb.EnvironmentSummary(
                    id=meta["id"], owner=owner_message(owner), container_ids=[PRIMARY]
                )
            )
        return pb.ListEnvironmentsResponse(environments=out)


# ---------------------------------------------------------------------------------------------
# The gRPC service: version checks, instance id metadata, errors


def _abort(context, err):
    if err.code != grpc.StatusCode.NOT_FOUND:
        log.debug("call failed: %s: %s", err.code.name, err.message)
    context.abort_with_status(err.status())


def _check_version(context):
    """Rejects a call whose ``kiln-protocol-version`` metadata does not include ours."""
    for key, value in context.invocation_metadata():
        if key == PROTOCOL_VERSION_HEADER:
            if str(PROTOCOL_VERSION) in [v.strip() for v in value.split(",")]:
                return
            raise failed_precondition(
                'protocol version mismatch: the client speaks %s, plugin "%s" speaks %d'
                % (value, PLUGIN_NAME, PROTOCOL_VERSION),
                fault=pb.FAULT_CONFIG,
            )


def unary(method):
    """Wraps a unary (or client-streaming) handler: version check, ``kiln-instance-id`` on
    success, PluginError → status with ErrorDetail, anything else → INTERNAL."""

    def handler(self, request, context):
        try:
            _check_version(context)
            response = method(self, request, context)
            context.send_initial_metadata(((INSTANCE_ID_HEADER, self.backend.instance_id),))
            return response
        except PluginError as e:
            err = e
        except Exception as e:  # noqa: BLE001 - a plugin bug must still answer
            log.exception("internal error")
            err = internal("plugin bug: %s" % e)
        _abort(context, err)

    handler.__name__ = method.__name__
    handler.__doc__ = method.__doc__
    return handler


def streaming(method):
    """Wraps a server-streaming handler: the method validates eagerly and returns an iterator;
    ``kiln-instance-id`` goes in the initial metadata before the first message."""

    def handler(self, request, context):
        err = None
        try:
            _check_version(context)
            events = method(self, request, context)
            context.send_initial_metadata(((INSTANCE_ID_HEADER, self.backend.instance_id),))
            for event in events:
                yield event
        except PluginError as e:
            err = e
        except Exception as e:  # noqa: BLE001
            log.exception("internal error")
            err = internal("plugin bug: %s" % e)
        if err is not None:
            _abort(context, err)

    handler.__name__ = method.__name__
    handler.__doc__ = method.__doc__
    return handler


class BackendService(pb_grpc.BackendServicer):
    """``kiln.backend.v1.Backend`` over a :class:`HostBackend`."""

    def __init__(self, backend):
        self.backend = backend

    @unary
    def Capabilities(self, request, context):
        return self.backend.capabilities(request)

    @unary
    def CreateExecutionEnvironment(self, request, context):
        return self.backend.create_environment(request)

    @unary
    def CreateJobContainer(self, request, context):
        return self.backend.create_container(request, "job_container")

    @unary
    def CreateServiceContainer(self, request, context):
        return self.backend.create_container(request, "service_containers")

    @unary
    def CreateStepContainer(self, request, context):
        return self.backend.create_container(request, "step_containers")

    @unary
    def StartContainer(self, request, context):
        return self.backend.start_container(request)

    @unary
    def Inspect(self, request, context):
        return self.backend.inspect(request)

    @streaming
    def Exec(self, request, context):
        return self.backend.exec(request, context)

    @unary
    def SignalExec(self, request, context):
        return self.backend.signal_exec(request)

    @unary
    def WriteStdin(self, request_iterator, context):
        return self.backend.write_stdin(request_iterator)

    @unary
    def CopyIn(self, request_iterator, context):
        return self.backend.copy_in(request_iterator)

    @streaming
    def CopyOut(self, request, context):
        return self.backend.copy_out(request, context)

    @unary
    def Remove(self, request, context):
        return self.backend.remove(request)

    @unary
    def ListEnvironments(self, request, context):
        return self.backend.list_environments(request)


# ---------------------------------------------------------------------------------------------
# Command line and serving


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="plugin.py",
        description="kiln backend plugin in Python (a host-style backend)",
    )
    p.add_argument(
        "--listen",
        default=os.environ.get("KILN_PLUGIN_LISTEN"),
        help="unix:///path.sock (or a plain path), or tcp://ADDR:PORT (mutual TLS unless "
        "--insecure); also KILN_PLUGIN_LISTEN",
    )
    p.add_argument("--tls-ca", help="CA certificate the clients' certificates must chain to (PEM)")
    p.add_argument("--tls-cert", help="this plugin's certificate (PEM)")
    p.add_argument("--tls-key", help="this plugin's private key (PEM)")
    p.add_argument(
        "--insecure", action="store_true", help="allow plaintext TCP without authentication (tests)"
    )
    p.add_argument(
        "--exit-on-stdin-eof",
        action="store_true",
        help="exit when standard input closes (set by kiln for managed plugins)",
    )
    p.add_argument(
        "--root",
        default=os.path.join(
            os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"),
            "kiln",
            "python-host",
        ),
        help="directory the environments live in",
    )
    args = p.parse_args(argv)
    if not args.listen:
        p.error("--listen is required (or KILN_PLUGIN_LISTEN)")
    tls = [args.tls_ca, args.tls_cert, args.tls_key]
    if any(tls) and not all(tls):
        p.error("--tls-ca, --tls-cert and --tls-key go together")
    return args


def bind(server, args):
    """Adds the listening port; returns a description and the unix socket path (or None)."""
    listen = args.listen
    if listen.startswith("tcp://"):
        addr = listen[len("tcp://") :]
        if args.tls_ca:
            with open(args.tls_ca, "rb") as f:
                ca = f.read()
            with open(args.tls_cert, "rb") as f:
                cert = f.read()
            with open(args.tls_key, "rb") as f:
                key = f.read()
            creds = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca, require_client_auth=True
            )
            port = server.add_secure_port(addr, creds)
            what = "tcp %s with mutual tls" % addr
        elif args.insecure:
            log.warning("serving plaintext tcp %s without authentication (--insecure)", addr)
            port = server.add_insecure_port(addr)
            what = "plaintext tcp %s" % addr
        else:
            raise SystemExit(
                "plugin.py: --listen %s: tcp needs --tls-ca, --tls-cert and --tls-key (mutual "
                "TLS), or --insecure for plaintext in tests" % listen
            )
        if not port:
            raise SystemExit("plugin.py: cannot listen on %s" % listen)
        return what, None
    path = listen
    for prefix in ("unix://", "unix:"):
        if path.startswith(prefix):
            path = path[len(prefix) :]
            break
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.lexists(path):
        os.unlink(path)  # a stale socket of a previous run
    old = os.umask(0o177)  # the socket is created 0600
    try:
        port = server.add_insecure_port("unix:" + path)
    finally:
        os.umask(old)
    if not port:
        raise SystemExit("plugin.py: cannot listen on unix socket %s" % path)
    os.chmod(path, 0o600)
    return "unix socket %s" % path, path


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    level = os.environ.get("KILN_LOG", "info").split(",")[0].strip().lower()
    logging.basicConfig(
        stream=sys.stderr,
        level={
            "debug": logging.DEBUG,
            "trace": logging.DEBUG,
            "warn": logging.WARNING,
            "warning": logging.WARNING,
            "error": logging.ERROR,
        }.get(level, logging.INFO),
        format="python-plugin %(levelname)s %(message)s",
    )
    backend = HostBackend(args.root)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="rpc"),
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", 30000),
            ("grpc.keepalive_timeout_ms", 10000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ("grpc.http2.max_ping_strikes", 0),
        ],
    )
    pb_grpc.add_BackendServicer_to_server(BackendService(backend), server)
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

    what, socket_path = bind(server, args)
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.exit_on_stdin_eof:

        def watch_stdin():
            try:
                while os.read(0, 4096):
                    pass
            except OSError:
                pass
            log.info("stdin closed: the runner is gone, shutting down")
            stop.set()

        threading.Thread(target=watch_stdin, name="stdin", daemon=True).start()

    server.start()
    log.info("serving on %s (root %s, instance %s)", what, backend.root, backend.instance_id)
    while not stop.wait(0.5):
        pass
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    server.stop(grace=2).wait()
    if backend.cgroups.base is not None:
        try:
            os.rmdir(backend.cgroups.base)  # empty unless environments remain
        except OSError:
            pass
    if socket_path:
        try:
            os.unlink(socket_path)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
