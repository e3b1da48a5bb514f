#!/usr/bin/env python3
"""The LXC backend against the host backend, interleaving runs, with the same kiln binary.

    bench/lxc.py [--kiln target/release/kiln] [--runs 5] [--cold]

Runs bench/workflows/steps-1.yml and steps-50.yml with `kiln exec -P ubuntu-latest=host`,
`kiln exec -P ubuntu-latest=lxc://debian:bookworm` (the lxc plugin with a scratch --root) and
the same with the plugin's `--no-agent` (one lxc-attach per exec), alternating run by run
after one warm-up each. Rows: wall time of each workflow,
the cost per extra step ((steps-50 - steps-1) / 49) and the lxc plugin's job start (clone +
start of the container, the `start_ms` it logs for each environment). With --cold, the
first job on a new image too: `kiln-plugin-lxc prepare debian:bookworm` into an empty base
directory (debootstrap from the mirror; the `debian` template keeps its own download cache
in /var/cache/lxc/debian, which this does not clear). Needs root and tests/lxc/setup.sh.
The table is Markdown; timings belong here, not in tests.
"""
import argparse, os, re, shutil, statistics, subprocess, sys, tempfile, time

MODES = ("host", "lxc", "lxc-attach")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def scratch_repo(workflow):
    d = tempfile.mkdtemp(prefix="kiln-bench-lxc-")
    os.makedirs(os.path.join(d, ".github/workflows"))
    shutil.copy(os.path.join(HERE, "workflows", workflow), os.path.join(d, ".github/workflows"))
    git = ["git", "-c", "user.name=b", "-c", "user.email=b@b"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "b"]):
        subprocess.run([*git, *args], cwd=d, check=True, stdout=subprocess.DEVNULL)
    return d


def run(kiln, repo, mode, lxc_root, state):
    if mode == "host":
        args = ["-P", "ubuntu-latest=host"]
    else:
        extra = " --no-agent" if mode == "lxc-attach" else ""
        args = ["-P", "ubuntu-latest=lxc://debian:bookworm",
                "--plugin", f"lxc={kiln} plugin lxc --root {lxc_root}{extra}"]
    env = dict(os.environ, XDG_STATE_HOME=state, NO_COLOR="1", KILN_LOG="warn,kiln_plugin_lxc=info")
    t = time.monotonic()
    p = subprocess.run([kiln, "exec", *args], cwd=repo, env=env, capture_output=True, text=True)
    took = time.monotonic() - t
    if p.returncode != 0:
        sys.exit(f"{mode} failed:\n{p.stdout}\n{p.stderr}")
    starts = [float(m) for m in re.findall(r"start_ms=([0-9.]+)", p.stderr)]
    return took, starts


def main():
    ap = argparse.ArgumentParser()
    default = os.path.join(ROOT, "target/release/kiln")
    if not os.path.exists(default):
        default = os.path.join(ROOT, "target/debug/kiln")
    ap.add_argument("--kiln", default=default)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cold", action="store_true")
    a = ap.parse_args()
    kiln = os.path.abspath(a.kiln)
    lxc_root = tempfile.mkdtemp(prefix="kiln-bench-lxc-root-")
    state = tempfile.mkdtemp(prefix="kiln-bench-lxc-state-")
    times = {}
    starts = []
    for wf in ("steps-1.yml", "steps-50.yml"):
        repo = scratch_repo(wf)
        for mode in MODES:
            run(kiln, repo, mode, lxc_root, state)  # warm-up
        for _ in range(a.runs):
            for mode in MODES:
                took, s = run(kiln, repo, mode, lxc_root, state)
                times.setdefault((wf, mode), []).append(took)
                if mode == "lxc":
                    starts += s
        shutil.rmtree(repo)
    med = {k: statistics.median(v) for k, v in times.items()}
    ms = lambda s: f"{s * 1000:.0f} ms"
    print(f"kiln: {kiln}; {a.runs} runs each, interleaved; medians (min–max)\n")
    print("lxc: execs through the agent in the container; lxc-attach: `--no-agent`, one "
          "lxc-attach per exec\n")
    print("| row | host | lxc | lxc / host | lxc-attach | lxc-attach / host |")
    print("|---|---|---|---|---|---|")
    cell = lambda xs: f"{ms(statistics.median(xs))} ({ms(min(xs))}–{ms(max(xs))})"
    for wf in ("steps-1.yml", "steps-50.yml"):
        h = med[(wf, "host")]
        print(f"| {wf[:-4]} (wall) | {cell(times[(wf, 'host')])} | {cell(times[(wf, 'lxc')])} "
              f"| {med[(wf, 'lxc')] / h:.2f}× | {cell(times[(wf, 'lxc-attach')])} "
              f"| {med[(wf, 'lxc-attach')] / h:.2f}× |")
    per = {m: (med[("steps-50.yml", m)] - med[("steps-1.yml", m)]) / 49 for m in MODES}
    print(f"| per extra step (target ≤ 1.5× host) | {per['host'] * 1000:.1f} ms "
          f"| {per['lxc'] * 1000:.1f} ms | {per['lxc'] / per['host']:.2f}× "
          f"| {per['lxc-attach'] * 1000:.1f} ms | {per['lxc-attach'] / per['host']:.2f}× |")
    if starts:
        print(f"| job start: clone + start + agent (target ≤ 1 s) | — "
              f"| {statistics.median(starts):.0f} ms ({min(starts):.0f}–{max(starts):.0f}, "
              f"n={len(starts)}) | | | |")
    if a.cold:
        base = tempfile.mkdtemp(prefix="kiln-bench-lxc-base-")
        plugin = os.path.join(os.path.dirname(kiln), "kiln-plugin-lxc")
        t = time.monotonic()
        subprocess.run([plugin, "prepare", "debian:bookworm", "--base-dir", base], check=True)
        print(f"| first job on a new image (base build) | — | {time.monotonic() - t:.0f} s | | | |")
        subprocess.run(["lxc-destroy", "-P", base, "-n", os.listdir(base)[0]], stderr=subprocess.DEVNULL)
        shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)
    left = os.listdir(lxc_root)
    shutil.rmtree(lxc_root, ignore_errors=True)
    if left:
        sys.exit(f"containers left: {left}")


if __name__ == "__main__":
    main()
