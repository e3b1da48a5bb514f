#!/usr/bin/env python3
"""The job services against the work floor of their clients (issue 12).

    bench/services.py [--kiln PATH] [--runs 3] [--mb 200] [--rss-mb 1000]

Rows, each the median of --runs, interleaved with its floor:
  cache save     the real @actions/cache saveCache of MB of random data through
                 `kiln cache-server`, vs its floor: `tar --posix -cf - DIR | zstd -T0 > FILE`
  cache restore  restoreCache of that entry, vs `zstd -d < FILE | tar -xf -`
  artifact up    the real @actions/artifact uploadArtifact of one MB file (skipArchive), vs `cp`
  artifact down  downloadArtifact of it (skipDecompress), vs `cp`
"server adds" is (client - floor) / floor. Memory: the server's peak RSS (VmHWM) after a
cache save and restore of --rss-mb, streamed by a plain HTTP client (no node in the way).

Needs node, zstd and the bundled clients of tests/e2e/services.rs (target/kiln-npm/index.mjs:
run `cargo nextest run -p kiln-e2e -E 'test(/^services::/)'` once). Timings belong here, not
in tests.
"""
import argparse, base64, hashlib, hmac, http.client, json, os, shutil, socket, statistics
import subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SECRET = b"bench-secret-0123456789abcdef0123"
MB = 1_000_000


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def jwt(claims):
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(SECRET, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def token():
    return jwt({
        "scp": "Actions.Results:1:bench",
        "exp": int(time.time()) + 3600,
        "kiln_cache": {"repo": "bench/bench", "write_ref": "refs/heads/main",
                       "read_refs": [], "mode": "write"},
    })


def timed(cmd, **kw):
    t = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)
    return time.monotonic() - t


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def cpu_s(pid):
    """The process's user + system CPU seconds (robust to a loaded machine, unlike wall time)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_hwm(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def stream_cache(port, tok, size, chunk=32 * MB):
    """Reserve, PATCH `size` bytes in chunks streamed from a generator, commit, download."""
    api = f"/c/{tok}/_apis/artifactcache"
    c = http.client.HTTPConnection("127.0.0.1", port)
    c.request("POST", f"{api}/caches", json.dumps({"key": f"rss-{time.time()}", "version": "v1",
                                                   "cacheSize": size}),
              {"Content-Type": "application/json"})
    r = c.getresponse()
    cid = json.loads(r.read())["cacheId"]
    block = os.urandom(1 << 20)
    for start in range(0, size, chunk):
        n = min(chunk, size - start)

        def body(n=n):
            left = n
            while left:
                k = min(left, len(block))
                yield block[:k]
                left -= k
        c.request("PATCH", f"{api}/caches/{cid}", body(),
                  {"Content-Range": f"bytes {start}-{start + n - 1}/*", "Content-Length": str(n)})
        r = c.getresponse()
        r.read()
        assert r.status == 204, r.status
    c.request("POST", f"{api}/caches/{cid}", json.dumps({"size": size}),
              {"Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    assert r.status == 204, r.status
    c.request("GET", f"{api}/cache?keys=rss-&version=v1")
    loc = json.loads(c.getresponse().read())["archiveLocation"]
    path = loc.split(f"127.0.0.1:{port}", 1)[1]
    c.request("GET", path)
    r = c.getresponse()
    got = 0
    while True:
        b = r.read(1 << 20)
        if not b:
            break
        got += len(b)
    assert got == size, (got, size)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--rss-mb", type=int, default=1000)
    a = ap.parse_args()
    kiln = a.kiln or next(p for p in (f"{ROOT}/target/release/kiln", f"{ROOT}/target/debug/kiln")
                          if os.path.exists(p))
    probe = f"{ROOT}/target/kiln-npm/index.mjs"
    if not os.path.exists(probe):
        sys.exit(f"{probe} is missing: run the services e2e tests once (they bundle it)")
    work = tempfile.mkdtemp(prefix="kiln-bench-services-")
    try:
        secret = os.path.join(work, "secret")
        with open(secret, "wb") as f:
            f.write(SECRET)
        port = free_port()
        server = subprocess.Popen([kiln, "cache-server", "--listen", f"127.0.0.1:{port}",
                                   "--secret-file", secret, "--dir", f"{work}/cache",
                                   "--artifacts", f"{work}/artifacts"],
                                  stdout=subprocess.DEVNULL, env={**os.environ, "KILN_LOG": "warn"})
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        tok = token()
        url = f"http://127.0.0.1:{port}/"
        ws = f"{work}/ws"
        os.makedirs(f"{ws}/data")
        with open(f"{ws}/data/blob", "wb") as f:
            for _ in range(a.mb):
                f.write(os.urandom(MB))
        env = {**os.environ, "GITHUB_WORKSPACE": ws, "RUNNER_TEMP": f"{work}/tmp",
               "ACTIONS_RUNTIME_TOKEN": tok, "ACTIONS_RESULTS_URL": url,
               "GITHUB_SERVER_URL": "https://github.com", "INPUT_PATH": "data"}
        os.makedirs(f"{work}/tmp")
        rows = {k: ([], []) for k in ("cache save", "cache restore", "artifact up", "artifact down")}
        cpu = {k: [] for k in rows}
        base = []

        def client(row, cmd, **kw):
            c0 = cpu_s(server.pid)
            rows[row][0].append(timed(cmd, **kw))
            cpu[row].append(cpu_s(server.pid) - c0)
        for i in range(a.runs):
            t = time.monotonic()
            subprocess.run(["node", probe], cwd=ws, env={**env, "INPUT_OP": "none"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            base.append(time.monotonic() - t)
            e = {**env, "ACTIONS_CACHE_URL": f"{url}c/{tok}/", "INPUT_KEY": f"bench-{i}"}
            rows["cache save"][1].append(timed(
                ["sh", "-c", f"tar --posix -cf - -C {ws} data | zstd -T0 -q > {work}/floor.tzst"]))
            client("cache save", ["node", probe], cwd=ws, env={**e, "INPUT_OP": "cache-save-existing"})
            shutil.rmtree(f"{ws}/restore", ignore_errors=True)
            os.makedirs(f"{ws}/restore")
            rows["cache restore"][1].append(timed(
                ["sh", "-c", f"zstd -d -q < {work}/floor.tzst | tar -xf - -C {ws}/restore"]))
            client("cache restore", ["node", probe], cwd=ws, env={**e, "INPUT_OP": "cache-restore"})
            rows["artifact up"][1].append(timed(["cp", f"{ws}/data/blob", f"{work}/floor.bin"]))
            name = f"blob{i}"
            shutil.copy(f"{ws}/data/blob", f"{ws}/{name}")
            client("artifact up", ["node", probe], cwd=ws, env={
                **env, "INPUT_OP": "artifact-upload-file", "INPUT_FILE": f"{ws}/{name}"})
            os.remove(f"{ws}/{name}")
            rows["artifact down"][1].append(timed(["cp", f"{work}/floor.bin", f"{work}/floor2.bin"]))
            client("artifact down", ["node", probe], cwd=ws, env={
                **env, "INPUT_OP": "artifact-download-file", "INPUT_NAME": name,
                "INPUT_PATH": f"{work}/down{i}"})
            shutil.rmtree(f"{work}/down{i}", ignore_errors=True)
        print(f"kiln: {kiln}; {a.mb} MB of random data; median of {a.runs}; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
        b = statistics.median(base)
        print(f"node loading the bundled clients and exiting: {b:.2f} s\n")
        print("| row | client through kiln | floor | client - node start - floor | server CPU | server CPU / floor |")
        print("|---|---|---|---|---|---|")
        for k, (cl, floor) in rows.items():
            c, f, u = statistics.median(cl), statistics.median(floor), statistics.median(cpu[k])
            print(f"| {k} | {c:.2f} s | {f:.2f} s | {c - b - f:+.2f} s | {u:.2f} s | {u / f * 100:.0f} % |")
        before = vm_hwm(server.pid)
        stream_cache(port, tok, a.rss_mb * MB)
        print(f"\nserver peak RSS (VmHWM): {before:.1f} MiB after the rows, "
              f"{vm_hwm(server.pid):.1f} MiB after streaming {a.rss_mb} MB up and down")
        server.terminate()
        server.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
