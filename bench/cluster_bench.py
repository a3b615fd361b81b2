#!/usr/bin/env python3
"""The cluster path against obuilder alone (issue 13): rewrites the `cluster` section of
docs/benchmarks.md. As root.

- Per-job overhead: the same one-step spec (a new `echo` each time, so a container really
  runs) submitted with `ocluster-client submit-obuilder` to a scheduler and one
  `ocluster-worker`, against `obuilder build` of it on a store of its own. Both are whole
  processes, alternated; both stores are btrfs on one loopback filesystem made for the run.
- Log streaming: a step that prints N MB as fast as it can (`head -c N /dev/zero | tr`),
  followed by the client to /dev/null, against `obuilder build` of the same step to
  /dev/null (the engine's own speed, the baseline).

Usage: python3 bench/cluster_bench.py [--reps N] [--mb N]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402

REL = os.path.join(report.REPO, "target", "release")


def sh(*argv, **kw):
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


def timed(argv, out=subprocess.DEVNULL):
    t = time.perf_counter()
    r = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{argv[0]} failed: {r.stderr[-2000:]}")
    return dt * 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--mb", type=int, default=200, help="megabytes the log step prints")
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "obuilder", "-p", "ocluster"], cwd=report.REPO, check=True)
    fs = report.LoopFs("btrfs", 4096)
    work = tempfile.mkdtemp(prefix="cluster-bench-", dir="/var/tmp")
    procs = []
    try:
        busybox = os.path.join(work, "busybox")
        sh("bash", os.path.join(report.REPO, "scripts/make-busybox-rootfs.sh"), busybox)
        direct = f"btrfs:{fs.mnt}/direct"
        viaw = f"btrfs:{fs.mnt}/worker"
        for store in (direct, viaw):
            sh(f"{REL}/obuilder", "image", "import", "busybox", busybox, "--env",
               "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "--store", store)
        os.mkdir(f"{work}/secrets")
        log = open(f"{work}/scheduler.log", "w")
        sched = subprocess.Popen([f"{REL}/ocluster-scheduler", "--capnp-secret-key-file", f"{work}/key.pem",
                                  "--capnp-listen-address", "tcp:127.0.0.1:0", "--secrets-dir", f"{work}/secrets",
                                  "--state-dir", f"{work}/state", "--pools", "linux"],
                                 stdout=subprocess.DEVNULL, stderr=log)
        procs.append(sched)
        while not os.path.exists(f"{work}/secrets/pool-linux.cap"):
            time.sleep(0.05)
        cap = f"{work}/alice.cap"
        with open(cap, "w") as f:
            f.write(sh(f"{REL}/ocluster-admin", "-c", f"{work}/secrets/admin.cap", "add-client", "alice").stdout)
        wlog = open(f"{work}/worker.log", "w")
        worker = subprocess.Popen([f"{REL}/ocluster-worker", "-c", f"{work}/secrets/pool-linux.cap", "--name", "w1",
                                   "--capacity", "1", "--state-dir", f"{work}/wstate", "--obuilder-store", viaw,
                                   "--fast-sync", "--obuilder-healthcheck", "0", "-v"],
                                  stdout=subprocess.DEVNULL, stderr=wlog)
        procs.append(worker)
        deadline = time.time() + 60
        while "Registered as" not in open(f"{work}/worker.log").read():
            if time.time() > deadline:
                raise SystemExit("the worker did not register")
            time.sleep(0.05)
        ctx = os.path.join(work, "ctx")
        os.mkdir(ctx)

        def spec(name, cmd):
            p = os.path.join(work, name)
            with open(p, "w") as f:
                f.write(f'((from busybox)\n (shell /bin/sh -c)\n (run (shell "{cmd}")))\n')
            return p

        def via_cluster(p):
            return timed([f"{REL}/ocluster-client", "submit-obuilder", "-c", cap, "--pool", "linux", "--local-file", p])

        def via_obuilder(p):
            return timed([f"{REL}/obuilder", "build", "-f", p, ctx, "--store", direct, "--fast-sync"])

        # Warm both paths (base image cached in each store).
        via_cluster(spec("warm1", "echo warm"))
        via_obuilder(spec("warm2", "echo warm"))
        cl, ob = [], []
        for i in range(args.reps):
            ob.append(via_obuilder(spec(f"o{i}", f"echo direct {i} {time.time()}")))
            cl.append(via_cluster(spec(f"c{i}", f"echo cluster {i} {time.time()}")))
        # Log streaming.
        n = args.mb * 1_000_000
        big_cmd = f"head -c {n} /dev/zero | tr '\\\\000' x"
        lc, lo = [], []
        for i in range(3):
            lo.append(via_obuilder(spec(f"lo{i}", f"{big_cmd}; echo {i} {time.time()}")))
            lc.append(via_cluster(spec(f"lc{i}", f"{big_cmd}; echo {i} {time.time()}")))
        mc, mo = statistics.median(cl), statistics.median(ob)
        lmc, lmo = statistics.median(lc), statistics.median(lo)
        # Throughput beyond a trivial job's time on the same path.
        tput_c = n / 1e6 / max(1e-9, (lmc - mc) / 1000)
        tput_o = n / 1e6 / max(1e-9, (lmo - mo) / 1000)

        def fmt(xs):
            m, lo_, hi = report.stats(xs)
            return f"{m:.1f} [{lo_:.1f}–{hi:.1f}]"

        text = f"""## The cluster path (`bench/cluster_bench.py`)

Measured by `python3 bench/cluster_bench.py` on {time.strftime('%Y-%m-%d')} ({os.cpu_count()} cores): a scheduler, one `ocluster-worker` (capacity 1) and `ocluster-client` over TLS on 127.0.0.1, against `obuilder build` alone; btrfs stores on one loopback filesystem; whole processes, alternated, median [min–max] in ms.

| | `obuilder build` | `ocluster-client submit-obuilder` | cluster − direct |
|---|---|---|---|
| one-step spec, a new `echo` each time ({args.reps} runs) | {fmt(ob)} | {fmt(cl)} | **{mc - mo:.1f}** |
| a step printing {args.mb} MB as fast as it can (3 runs) | {fmt(lo)} | {fmt(lc)} | {lmc - lmo:.1f} |

Log streaming, beyond each path's time for a trivial job: **{tput_c:.0f} MB/s** to the client (the engine alone: {tput_o:.0f} MB/s to the terminal, the baseline).

Targets (issue 13): per-job overhead within 20 ms: {'met' if mc - mo <= 20 else 'NOT met'} ({mc - mo:.1f} ms); log streaming ≥ 50 MB/s: {'met' if tput_c >= 50 else 'NOT met'} ({tput_c:.0f} MB/s).
"""
        report.write_section("cluster", text)
        print(text)
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        fs.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
