#!/usr/bin/env python3
"""OCluster scheduler benchmark (issue 12): rewrites the `ocluster` section of
docs/benchmarks.md.

- The pure state machine: jobs from 10 clients with mixed cache hints through 200 workers
  of capacity 4; assignments per second and the scheduler's own bytes per queued job.
- End to end over real TLS on 127.0.0.1: a release `ocluster-scheduler`, 10 clients
  (`ocluster-load clients`, in 2 processes) queueing 100 000 jobs the way `ocluster-client`
  submits (submit, then `job` pipelined on the ticket, `result` and the first `log` on
  the job, which stay open while the job is queued), then 200 simulated
  workers of capacity 4 (`ocluster-load workers`, in 4 processes) that finish each job at
  once. Dispatch throughput is jobs / (last result at a client - first start at a worker).
- Submit-to-start latency: each client runs one job at a time with the workers idle, and
  reads the start time from the job's log; the baseline in the same run is one RPC round
  trip on the same kind of connection (a submit the scheduler refuses at once).
- Scheduler memory: its heap in use (the `ocluster_scheduler_heap_bytes` metric) and RSS
  before and with the 100 000 jobs queued (no workers yet, once the clients' `finish`
  messages are in), and the peak RSS (VmHWM) at the end.
- Durability (issue 14): the same dispatch run with the queue kept in memory only
  (`--no-persist-queue`, the original's behaviour) as the baseline for the default, which
  writes every job to SQLite before its client hears of its ticket; and a restart with
  the 100 000 jobs persisted: `kill -9`, start again, time until the cap files are
  written and until a worker that connects then has its first job.

Usage: python3 bench/ocluster_bench.py [--jobs N] [--quick]
"""

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402

REL = os.path.join(report.REPO, "target", "release")
TIMEOUT = 900


def build():
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "ocluster", "-p", "ocluster-load"],
                   cwd=report.REPO, check=True)


def kv(text):
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        out[k] = v
    return out


def rss_kb(pid, field="VmRSS"):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def heap_bytes(port):
    """The scheduler's live heap (its `ocluster_scheduler_heap_bytes` metric)."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    for line in text.splitlines():
        if line.startswith("ocluster_scheduler_heap_bytes "):
            return int(line.split()[1])
    return 0


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def state_machine(runs):
    res = {}
    for db in (False, True):
        rows = []
        for _ in range(runs):
            out = subprocess.run([f"{REL}/ocluster-load", "state-machine"] + (["--db"] if db else []),
                                 check=True, capture_output=True, text=True, timeout=TIMEOUT).stdout
            rows.append(kv(out))
        res[db] = rows
    return res


class Cluster:
    def __init__(self, extra=()):
        self.dir = tempfile.mkdtemp(prefix="ocluster-bench-")
        self.metrics_port = free_port()
        os.mkdir(f"{self.dir}/secrets")
        self.log = open(f"{self.dir}/scheduler.log", "w")
        self.extra = list(extra)
        self.start()

    def start(self):
        """Starts the scheduler; returns the seconds until its cap files are written."""
        for f in ("pool-linux.cap", "admin.cap"):
            if os.path.exists(f"{self.dir}/secrets/{f}"):
                os.unlink(f"{self.dir}/secrets/{f}")
        t0 = time.time()
        self.proc = subprocess.Popen(
            [f"{REL}/ocluster-scheduler", "--capnp-secret-key-file", f"{self.dir}/key.pem",
             "--capnp-listen-address", "tcp:127.0.0.1:0", "--secrets-dir", f"{self.dir}/secrets",
             "--state-dir", f"{self.dir}/state", "--pools", "linux",
             "--listen-prometheus", f"127.0.0.1:{self.metrics_port}"] + self.extra,
            stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.time() + 120
        while not (os.path.exists(f"{self.dir}/secrets/pool-linux.cap")
                   and os.path.exists(f"{self.dir}/secrets/admin.cap")):
            if time.time() > deadline or self.proc.poll() is not None:
                raise SystemExit("the scheduler did not start: see " + self.log.name)
            time.sleep(0.002)
        return time.time() - t0

    def crash(self):
        self.proc.kill()
        self.proc.wait()

    def add_clients(self, n):
        caps = []
        for i in range(n):
            out = subprocess.run([f"{REL}/ocluster-admin", "add-client", f"client{i}", "-c",
                                  f"{self.dir}/secrets/admin.cap"],
                                 check=True, capture_output=True, text=True, timeout=60).stdout
            path = f"{self.dir}/client{i}.cap"
            open(path, "w").write(out)
            caps.append(path)
        return caps

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def clients(caps, mode, jobs):
    argv = [f"{REL}/ocluster-load", "clients", "--pool", "linux", "--jobs", str(jobs), "--mode", mode]
    for c in caps:
        argv += ["--cap", c]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_line(proc, prefix, deadline):
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line
    raise SystemExit(f"no {prefix!r} from a load process: {proc.stderr.read()[-2000:]}")


def end_to_end(total_jobs, client_procs=2, n_clients=10, worker_procs=4, workers=200,
               capacity=4, closed_jobs=300, extra=()):
    c = Cluster(extra)
    try:
        caps = c.add_clients(n_clients)
        per = n_clients // client_procs
        groups = [caps[i * per:(i + 1) * per] for i in range(client_procs)]
        rss0 = rss_kb(c.proc.pid)
        heap0 = heap_bytes(c.metrics_port)
        t0 = time.time()
        cps = [clients(g, "queue", total_jobs // n_clients) for g in groups]
        deadline = time.time() + TIMEOUT
        queued = sum(int(wait_line(p, "queued", deadline).split()[1]) for p in cps)
        queue_s = time.time() - t0
        # The clients end their `submit` and `job` questions once answered (`finish`),
        # after they print "queued": wait until the scheduler has let those go (its heap
        # stops shrinking; at most 10 s).
        # The RSS, too: the scheduler gives back what the burst took once it is freed
        # (it checks every second).
        time.sleep(1.5)
        heap_q = heap_bytes(c.metrics_port)
        rss_q = rss_kb(c.proc.pid)
        for _ in range(20):
            time.sleep(0.5)
            h = heap_bytes(c.metrics_port)
            r = rss_kb(c.proc.pid)
            settled = h > 0.99 * heap_q and r > 0.99 * rss_q
            heap_q, rss_q = h, r
            if settled:
                break
        wps = [subprocess.Popen([f"{REL}/ocluster-load", "workers", "--cap", f"{c.dir}/secrets/pool-linux.cap",
                                 "--count", str(workers // worker_procs), "--capacity", str(capacity),
                                 "--prefix", f"p{i}-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(worker_procs)]
        outs = []
        for p in cps:
            out, err = p.communicate(timeout=TIMEOUT)
            outs.append(kv(out))
        ok = sum(int(o.get("ok", 0)) for o in outs)
        errors = sum(int(o.get("errors", 0)) for o in outs)
        last = max(int(o["last_result_ns"]) for o in outs)
        for p in wps:
            wait_line(p, "registered", time.time() + 120)
        # Submit-to-start with the workers idle, then the round-trip baseline.
        lat = []
        for p in [clients(g, "closed", closed_jobs) for g in groups]:
            out, _ = p.communicate(timeout=TIMEOUT)
            lat += [int(x) for x in kv(out).get("latency_us", "").split(",") if x]
        base = []
        for p in [clients(g, "ping", closed_jobs) for g in groups]:
            out, _ = p.communicate(timeout=TIMEOUT)
            base += [int(x) for x in kv(out).get("latency_us", "").split(",") if x]
        first = None
        for p in wps:
            p.send_signal(signal.SIGTERM)
            out, _ = p.communicate(timeout=60)
            f = int(kv(out).get("first_start_ns", 0))
            if f and (first is None or f < first):
                first = f
        peak = rss_kb(c.proc.pid, "VmHWM")
        # Once every job is done: what the scheduler keeps (tables keep the capacity of
        # their peak) and whether it gave the rest back.
        time.sleep(2)
        heap_end, rss_end = heap_bytes(c.metrics_port), rss_kb(c.proc.pid)
        return {
            "heap_end": heap_end, "rss_end": rss_end,
            "queued": queued, "queue_s": queue_s, "ok": ok, "errors": errors,
            "dispatch_s": (last - first) / 1e9, "rss0": rss0, "rss_q": rss_q, "peak": peak,
            "heap0": heap0, "heap_q": heap_q,
            "lat": lat, "base": base,
        }
    finally:
        c.close()


def restart(total_jobs, client_procs=2, n_clients=10):
    """Queues the jobs, kills the scheduler with SIGKILL, starts it again: seconds until
    its cap files are written, and until a worker connecting then starts its first job."""
    c = Cluster()
    try:
        caps = c.add_clients(n_clients)
        per = n_clients // client_procs
        groups = [caps[i * per:(i + 1) * per] for i in range(client_procs)]
        cps = [clients(g, "queue", total_jobs // n_clients) for g in groups]
        deadline = time.time() + TIMEOUT
        queued = sum(int(wait_line(p, "queued", deadline).split()[1]) for p in cps)
        c.crash()
        for p in cps:
            p.kill()
            p.wait()
        db = os.path.getsize(f"{c.dir}/state/scheduler.db")
        t0 = time.time()
        up = c.start()
        w = subprocess.Popen([f"{REL}/ocluster-load", "workers", "--cap", f"{c.dir}/secrets/pool-linux.cap",
                              "--count", "1", "--capacity", "1", "--prefix", "r-"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_line(w, "registered", time.time() + 120)
        first = None
        while first is None and time.time() < t0 + 120:
            time.sleep(0.05)
            w.send_signal(signal.SIGTERM)
            out, _ = w.communicate(timeout=60)
            f = int(kv(out).get("first_start_ns", 0))
            if f:
                first = f
            else:
                w = subprocess.Popen([f"{REL}/ocluster-load", "workers", "--cap",
                                      f"{c.dir}/secrets/pool-linux.cap", "--count", "1",
                                      "--capacity", "1", "--prefix", "r-"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                wait_line(w, "registered", time.time() + 120)
        c.log.flush()
        kept = 0
        for line in open(c.log.name):
            if "jobs kept from before the restart" in line:
                kept = int(line.split("linux: ")[1].split()[0])
        return {"queued": queued, "up_s": up, "first_s": (first / 1e9 - t0) if first else None,
                "db_mb": db / 1e6, "kept": kept}
    finally:
        c.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=100_000, help="jobs queued end to end (default 100000)")
    ap.add_argument("--quick", action="store_true", help="10 000 jobs, one state-machine run")
    args = ap.parse_args()
    jobs = 10_000 if args.quick else args.jobs
    build()
    print("state machine…", file=sys.stderr)
    sm = state_machine(1 if args.quick else 5)
    print(f"end to end with {jobs} jobs…", file=sys.stderr)
    e = end_to_end(jobs)
    print(f"end to end with {jobs} jobs, the queue in memory only…", file=sys.stderr)
    mem = end_to_end(jobs, extra=["--no-persist-queue"])
    print(f"restart with {jobs} jobs persisted…", file=sys.stderr)
    r = restart(jobs)

    def med(rows, key):
        return statistics.median(float(r[key]) for r in rows)

    def rng(rows, key):
        xs = [float(r[key]) for r in rows]
        return f"{min(xs):,.0f}–{max(xs):,.0f}"

    per_job_rpc = (e["rss_q"] - e["rss0"]) * 1024 / max(1, e["queued"])
    per_job_heap = (e["heap_q"] - e["heap0"]) / max(1, e["queued"])
    lat, base = e["lat"], e["base"]
    rate = e["ok"] / e["dispatch_s"]
    mem_rate = mem["ok"] / mem["dispatch_s"]
    first = f"{r['first_s']:.2f} s" if r["first_s"] is not None else "no job started"
    nproc = os.cpu_count()
    text = f"""## OCluster scheduler (`bench/ocluster_bench.py`)

Measured by `python3 bench/ocluster_bench.py{' --quick' if args.quick else ''}` on {time.strftime('%Y-%m-%d')} ({nproc} cores). Everything runs on this one machine: the scheduler, the clients and the simulated workers share its {nproc} cores.

### The state machine alone (`ocluster-load state-machine`)

{int(sm[False][0]['jobs']):,} jobs from 10 clients (one in five without a cache hint, the rest over 100 hints, one in fifty urgent) through 200 workers of capacity 4; each assignment is answered by finishing the job and popping again. {len(sm[False])} run(s), median [min–max].

| | assignments/s | submits/s | scheduler state per queued job |
|---|---|---|---|
| pool only | **{med(sm[False], 'assignments_per_s'):,.0f}** [{rng(sm[False], 'assignments_per_s')}] | {med(sm[False], 'submits_per_s'):,.0f} | {med(sm[False], 'bytes_per_queued_job'):.0f} bytes |
| with the learned hints written to SQLite (in memory) | {med(sm[True], 'assignments_per_s'):,.0f} [{rng(sm[True], 'assignments_per_s')}] | {med(sm[True], 'submits_per_s'):,.0f} | {med(sm[True], 'bytes_per_queued_job'):.0f} bytes |

"State per queued job" counts every byte the pool holds for a queued job (live heap, by a counting allocator), with the job description kept as the client sent it ({sm[False][0]['descr_bytes']} bytes for a one-step spec).

### End to end over TLS on 127.0.0.1

{e['queued']:,} jobs queued by 10 clients (2 processes) in {e['queue_s']:.1f} s, as `ocluster-client` submits: `submit`, then `job` pipelined on each ticket and `result` and the first `log` on each job (both stay open while the job is queued). Then 200 simulated workers of capacity 4 (4 processes, one TLS connection each) took them: {e['ok']:,} results, {e['errors']} errors.

| | measured |
|---|---|
| dispatch throughput (first start at a worker → last result at a client) | **{e['ok'] / e['dispatch_s']:,.0f} jobs/s** ({e['dispatch_s']:.1f} s) |
| submit → start, one job at a time per client, workers idle ({len(lat)} jobs) | median **{statistics.median(lat) / 1000:.2f} ms**, p99 {pct(lat, 0.99) / 1000:.2f} ms |
| baseline: one RPC round trip on the same kind of connection ({len(base)} calls) | median {statistics.median(base) / 1000:.2f} ms, p99 {pct(base, 0.99) / 1000:.2f} ms |
| scheduler RSS, idle → with {e['queued']:,} jobs queued | {e['rss0'] / 1024:.0f} MiB → {e['rss_q'] / 1024:.0f} MiB: **{per_job_rpc / 1024:.1f} KiB per queued job** |
| scheduler heap in use (`ocluster_scheduler_heap_bytes`), idle → with {e['queued']:,} jobs queued | {e['heap0'] / 2**20:.0f} MiB → {e['heap_q'] / 2**20:.0f} MiB: **{per_job_heap / 1024:.1f} KiB per queued job** |
| scheduler peak RSS (VmHWM) over the whole run | {e['peak'] / 1024:.0f} MiB |
| scheduler heap in use and RSS once every job is done | {e['heap_end'] / 2**20:.0f} MiB and {e['rss_end'] / 1024:.0f} MiB |

The heap in use is what the queued jobs themselves hold. The RSS also holds what the burst of submissions allocated and freed where it lies between live blocks: the scheduler hands free pages back to the system once its heap has fallen well below its high-water mark (`malloc_trim`, checked every second), but a page with anything live on it stays.

### Durability (issue 14)

By default every job is written to the scheduler's SQLite database (WAL, `synchronous=NORMAL`) before its client hears of its ticket, and deleted when its result is in; the baseline, measured in this same run, keeps the queue in memory only (`--no-persist-queue`, the original's behaviour).

| | measured |
|---|---|
| dispatch throughput, queue persisted (the default; the run above) | **{rate:,.0f} jobs/s** |
| dispatch throughput, queue in memory only (`--no-persist-queue`) | {mem_rate:,.0f} jobs/s ({mem['ok']:,} results, {mem['errors']} errors) |
| ratio | **{rate / mem_rate:.2f}×** |
| restart with {r['queued']:,} jobs persisted ({r['db_mb']:.0f} MB database) after `kill -9`: start → cap files written | **{r['up_s']:.2f} s** |
| start → a worker connecting then has its first job | {first} |
| jobs the restarted scheduler restored (its log) | {r['kept']:,} |

Submit → start crosses the scheduler twice (client → scheduler → worker, then the start time comes back in the job's log), so about two round trips is the floor.

### Targets (issue 12)

| target | result |
|---|---|
| ≥ 100 000 assignments/s in the state machine | {'met' if med(sm[False], 'assignments_per_s') >= 100_000 else 'NOT met'}: {med(sm[False], 'assignments_per_s'):,.0f} |
| ≥ 5 000 jobs/s end to end over RPC (as measured for issue 12: the queue in memory) | {'met' if mem_rate >= 5000 else 'NOT met'}: {mem_rate:,.0f} (persisted, the default since issue 14: {rate:,.0f}) |
| restart to dispatching with 100 000 persisted jobs < 2 s (issue 14) | {'met' if r['first_s'] is not None and r['first_s'] < 2 and r['queued'] >= 100_000 else 'NOT met'}: {first} with {r['queued']:,} |
| dispatch with persistence ≥ 0.5× in memory (issue 14) | {'met' if rate >= 0.5 * mem_rate else 'NOT met'}: {rate / mem_rate:.2f}× |
| < 1 KiB of memory per queued job | scheduler state: {'met' if med(sm[False], 'bytes_per_queued_job') < 1024 else 'NOT met'} ({med(sm[False], 'bytes_per_queued_job'):.0f} bytes). Whole process over RPC, heap in use: {'met' if per_job_heap < 1024 else 'NOT met'} ({per_job_heap / 1024:.2f} KiB); RSS: {'met' if per_job_rpc < 1024 else 'NOT met'} ({per_job_rpc / 1024:.2f} KiB, with what the burst freed between live blocks); see docs/performance.md |
"""
    report.write_section("ocluster", text)
    print(text)


if __name__ == "__main__":
    main()
