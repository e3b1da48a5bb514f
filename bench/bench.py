#!/usr/bin/env python3
"""kiln vs act, side by side, on the same workflows and backend, interleaving A/B runs.

    bench/bench.py [--runs 5] [--kiln target/release/kiln] [--act act] [--docker IMAGE] [WORKFLOW...]

Each workflow in bench/workflows/ (or those named) runs with kiln (`-P ubuntu-latest=host`) and
act (`-P ubuntu-latest=-self-hosted`) in a scratch git repository holding only that workflow;
with --docker IMAGE both run on Docker with that local image instead (act with --pull=false),
and the floor `docker run --rm IMAGE true` is measured in the same run. The table gives
medians, min-max and the kiln/act ratio. Timings belong here, not in tests.
"""
import argparse, os, shutil, statistics, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def scratch_repo(workflow):
    d = tempfile.mkdtemp(prefix="kiln-bench-")
    os.makedirs(os.path.join(d, ".github/workflows"))
    shutil.copy(workflow, os.path.join(d, ".github/workflows", os.path.basename(workflow)))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "b"]):
        subprocess.run(["git", *args], cwd=d, check=True, stdout=subprocess.DEVNULL)
    return d


def timed(cmd, cwd, env):
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)} in {cwd}")
    return dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kiln", default=os.path.join(ROOT, "target/release/kiln"))
    ap.add_argument("--act", default=shutil.which("act"))
    ap.add_argument("--docker", metavar="IMAGE")
    ap.add_argument("workflows", nargs="*")
    a = ap.parse_args()
    wfs = a.workflows or sorted(os.path.join(HERE, "workflows", f) for f in os.listdir(os.path.join(HERE, "workflows")))
    env = dict(os.environ, NO_COLOR="1", KILN_LOG="error")
    state = tempfile.mkdtemp(prefix="kiln-bench-state-")
    env["XDG_STATE_HOME"] = state
    print(f"kiln: {a.kiln}\nact:  {a.act}\nruns: {a.runs} (interleaved), medians in seconds\n")
    print(f"{'workflow':<16} {'kiln median':>12} {'kiln min-max':>16} {'act median':>11} {'act min-max':>16} {'kiln/act':>9}")
    for wf in wfs:
        repo = scratch_repo(wf)
        if a.docker:
            kiln_cmd = [a.kiln, "exec", "-P", f"ubuntu-latest=docker://{a.docker}"]
            act_cmd = [a.act, "-P", f"ubuntu-latest={a.docker}", "--pull=false"] if a.act else None
        else:
            kiln_cmd = [a.kiln, "exec", "-P", "ubuntu-latest=host"]
            act_cmd = [a.act, "-P", "ubuntu-latest=-self-hosted"] if a.act else None
        k, t = [], []
        timed(kiln_cmd, repo, env)  # warm-up
        if act_cmd:
            timed(act_cmd, repo, env)
        for _ in range(a.runs):
            k.append(timed(kiln_cmd, repo, env))
            if act_cmd:
                t.append(timed(act_cmd, repo, env))
        km = statistics.median(k)
        name = os.path.basename(wf).rsplit(".", 1)[0]
        if t:
            am = statistics.median(t)
            print(f"{name:<16} {km:>12.3f} {min(k):>7.3f}-{max(k):<8.3f} {am:>11.3f} {min(t):>7.3f}-{max(t):<8.3f} {km/am:>9.2f}")
        else:
            print(f"{name:<16} {km:>12.3f} {min(k):>7.3f}-{max(k):<8.3f}")
        shutil.rmtree(repo, ignore_errors=True)
    if a.docker:
        floor = [timed(["docker", "run", "--rm", a.docker, "true"], ROOT, env) for _ in range(a.runs)]
        print(f"{'floor: docker run --rm IMAGE true':<34} median {statistics.median(floor):.3f}")
    shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
