#!/usr/bin/env python3
"""VM rows for the QEMU backend: boot to first step, per extra `run:` step in the VM (against
the same on the host plugin), a docker:// step in the VM, and Remove. Timings only: see
bench/README.md. Needs tests/qemu/setup.sh (and tests/docker/setup.sh for the docker step).

    cargo build --release -p kiln-cli
    bench/qemu.py [--kiln target/release/kiln] [--runs 3]
"""
import argparse, os, re, statistics, subprocess, tempfile, time

def workflow(label, steps, docker=False):
    body = "".join(f"      - run: echo step {i}\n" for i in range(steps))
    if docker:
        body = "      - uses: docker://kiln-test/busybox:1\n        with:\n          args: echo in-vm\n"
    return f"on: push\njobs:\n  j:\n    runs-on: {label}\n    steps:\n{body}"

def run(kiln, yaml, args):
    with tempfile.TemporaryDirectory() as repo, tempfile.TemporaryDirectory() as state:
        os.makedirs(f"{repo}/.github/workflows")
        open(f"{repo}/.github/workflows/w.yml", "w").write(yaml)
        subprocess.run(["git", "init", "-q", repo], check=True)
        env = dict(os.environ, XDG_STATE_HOME=state, KILN_LOG="kiln_plugin_qemu=info,warn", NO_COLOR="1")
        start = time.monotonic()
        p = subprocess.Popen([kiln, "exec", *args], cwd=repo, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = None
        out = []
        for line in p.stdout:
            out.append(line)
            if first is None and "▶ Run" in line:
                first = time.monotonic() - start
        err = p.stderr.read()
        p.wait()
        total = time.monotonic() - start
        if p.returncode != 0:
            raise SystemExit(f"kiln failed:\n{''.join(out)}\n{err}")
        boot = re.search(r"boot_ms=(\d+)", err)
        removed = re.search(r"VM removed.* ms=(\d+)", err)
        step = re.search(r"✓ Run docker://\S+ \[([0-9.]+)s\]", "".join(out))
        return dict(total=total, first=first, boot=int(boot.group(1)) / 1000 if boot else None,
                    remove=int(removed.group(1)) / 1000 if removed else None,
                    docker_step=float(step.group(1)) if step else None)

def med(rows, key):
    vals = [r[key] for r in rows if r[key] is not None]
    return statistics.median(vals) if vals else float("nan")

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default="target/release/kiln")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    kiln = os.path.abspath(a.kiln)
    vm = ["-P", "vm=qemu", "--plugin", f"qemu={kiln} plugin qemu --delegate none"]
    vmd = ["-P", "vm=qemu", "--plugin", f"qemu={kiln} plugin qemu"]
    host = ["-P", "vm=host"]
    r = {k: [] for k in ["vm1", "vm21", "h1", "h21", "dock"]}
    for _ in range(a.runs):
        r["vm1"].append(run(kiln, workflow("vm", 1), vm))
        r["vm21"].append(run(kiln, workflow("vm", 21), vm))
        r["h1"].append(run(kiln, workflow("vm", 1), host))
        r["h21"].append(run(kiln, workflow("vm", 21), host))
    r["dock"].append(run(kiln, workflow("vm", 0, docker=True), vmd))
    vm_step = (med(r["vm21"], "total") - med(r["vm1"], "total")) / 20
    host_step = (med(r["h21"], "total") - med(r["h1"], "total")) / 20
    print("| row (TCG) | median |")
    print("|---|---|")
    print(f"| VM boot (QEMU start → agent answers) | {med(r['vm1'], 'boot'):.1f} s |")
    print(f"| kiln start → first step in the VM | {med(r['vm1'], 'first'):.1f} s |")
    print(f"| 1-step job in a VM, total | {med(r['vm1'], 'total'):.1f} s |")
    print(f"| per extra run: step in the VM | {vm_step * 1000:.0f} ms (host plugin: {host_step * 1000:.0f} ms) |")
    print(f"| docker:// step in the VM (image copied in) | {med(r['dock'], 'docker_step'):.1f} s |")
    print(f"| job with a docker step in a VM, total (dockerd waited for) | {med(r['dock'], 'total'):.1f} s |")
    print(f"| Remove of a VM | {med(r['vm1'], 'remove'):.2f} s |")

if __name__ == "__main__":
    main()
