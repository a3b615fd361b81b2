#!/usr/bin/env python3
"""User sandbox benchmark (issue 15): rewrites the `user-sandbox` section of docs/benchmarks.md.

A step's overhead in the user sandbox against runc on the same btrfs store (a loopback
file made for the run): a spec of N `run` steps that do nothing (`true`), with a fresh
nonce each round so that no step is cached, built with

- runc (busybox image, `/bin/sh -c`): the baseline, in the same run;
- `--sandbox user` with obuilderfs (the mounts are made by the first round and kept);
- `--sandbox user --no-fuse` (rsync into the real home path and back around each step).

The builds run in a private mount namespace (the FUSE mounts never show on the host). The
median of the rounds is reported, per step. Needs root, runc, mkfs.btrfs, FUSE, setpriv.

Usage: python3 bench/user_sandbox_bench.py [--steps N] [--rounds N]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402

POOL = "61900-61903"


def run(argv, **kw):
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: exit {r.returncode}\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("user_sandbox_bench: run as root (it makes users, mounts and loop devices)")
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "obuilder", "-p", "obuilderfs"],
                   cwd=report.REPO, check=True)
    obuilder = os.path.join(report.REPO, "target", "release", "obuilder")
    tmp = tempfile.mkdtemp(prefix="user-sandbox-bench-")
    os.chmod(tmp, 0o755)
    img, mnt = os.path.join(tmp, "disk.img"), os.path.join(tmp, "mnt")
    os.mkdir(mnt)
    run(["truncate", "-s", "2G", img])
    run(["mkfs.btrfs", "-q", "-f", img])
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "3600"])
    results = {}
    try:
        own = os.readlink("/proc/self/ns/mnt")
        deadline = time.time() + 10
        while os.readlink(f"/proc/{holder.pid}/ns/mnt") == own:
            if time.time() > deadline:
                raise SystemExit("no mount namespace")
            time.sleep(0.01)
        ns = ["nsenter", "-t", str(holder.pid), "-m", "--"]
        run(ns + ["mount", "-o", "loop", img, mnt])
        store = ["--store", f"btrfs:{mnt}/store"]
        busybox, base = os.path.join(tmp, "busybox"), os.path.join(tmp, "base")
        run(["bash", os.path.join(report.REPO, "scripts", "make-busybox-rootfs.sh"), busybox])
        os.makedirs(os.path.join(base, "home"))
        os.makedirs(os.path.join(base, "brew"))
        run(ns + [obuilder, "image", "import", "busybox", busybox, "--env",
                  "PATH=/usr/sbin:/usr/bin:/sbin:/bin"] + store)
        run(ns + [obuilder, "image", "import", "macbase", base, "--env", "A=1"] + store)
        user = ["--sandbox", "user", "--user-pool", POOL, "--obuilderfs",
                os.path.join(report.REPO, "target", "release", "obuilderfs")]
        variants = {
            "runc": ("busybox", "(shell /bin/sh -c)", []),
            "user (obuilderfs)": ("macbase", "", user + ["--home-path", f"{tmp}/Users/mac",
                                                         "--brew-path", f"{tmp}/brew"]),
            # Paths of its own: the others are obuilderfs mounts.
            "user --no-fuse (rsync)": ("macbase", "", user + ["--no-fuse", "--home-path", f"{tmp}/Users/plain",
                                                              "--brew-path", f"{tmp}/brew-plain"]),
        }
        times = {k: [] for k in variants}
        for r in range(args.rounds + 1):
            for name, (image, shell, flags) in variants.items():
                nonce = uuid.uuid4().hex
                steps = "\n".join(f' (run (shell "true {nonce} {i}"))' for i in range(args.steps))
                spec = os.path.join(tmp, "spec")
                open(spec, "w").write(f"((from {image}) {shell}\n{steps})\n")
                t = time.perf_counter()
                run(ns + [obuilder, "build", "-f", spec, tmp] + store + flags)
                if r > 0:  # round 0 warms up (users, mounts, image extraction)
                    times[name].append((time.perf_counter() - t) / args.steps)
                print(f"round {r} {name}: {(time.perf_counter() - t) * 1000 / args.steps:.1f} ms/step",
                      file=sys.stderr)
        results = {k: statistics.median(v) for k, v in times.items()}
    finally:
        for line in subprocess.run(["pgrep", "-f", f"obuilderfs --scoreboard {mnt}"], capture_output=True,
                                   text=True).stdout.split():
            subprocess.run(["kill", line])
        time.sleep(0.5)
        holder.kill()
        holder.wait()
        subprocess.run(["rm", "-rf", tmp])
    base_t = results["runc"]
    rows = "\n".join(
        f"| {k} | {v * 1000:.1f} ms | {v / base_t:.2f}× |" for k, v in results.items())
    text = f"""## User sandbox per-step overhead (`bench/user_sandbox_bench.py`)

Measured by `python3 bench/user_sandbox_bench.py` on {time.strftime('%Y-%m-%d')} ({os.cpu_count()} cores): {args.steps} uncached steps that run `true`, on one btrfs store (loopback), median of {args.rounds} rounds after a warm-up, time per step (snapshot, sandbox, commit).

| sandbox | per step | against runc |
|---|---|---|
{rows}

The user sandbox starts no container: a step is a setpriv (sudo su on macOS) login shell as a build user, plus registering its snapshot in the obuilderfs scoreboard, plus killing the user's processes afterwards. `--no-fuse` copies the home and prefix in and out with rsync around every step (here nearly empty trees; the copy grows with the tree, which is why FUSE is the default).
"""
    report.write_section("user-sandbox", text)
    print(text)


if __name__ == "__main__":
    main()
