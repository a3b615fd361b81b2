#!/usr/bin/env python3
"""What the RPC layer holds for each queued job (issue 12: < 1 KiB per queued job, of
which the pool's own state is ~430 bytes): ocluster-rpc against capnp-rpc, alternating in
the same run. See bench/ocluster-load/src/bin/rpc-memory.rs for what each server holds
and what the client does (ocluster-client's messages, as the golden capture shows them).

    python3 bench/rpc_memory_bench.py [--jobs N] [--rounds R]
"""

import argparse
import datetime
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import REPO, write_section  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "ocluster-load", "--bin", "rpc-memory"], cwd=REPO, check=True)
    exe = os.path.join(REPO, "target", "release", "rpc-memory")
    out = subprocess.run([exe, "run", "--jobs", str(a.jobs), "--rounds", str(a.rounds)], check=True, stdout=subprocess.PIPE, text=True).stdout
    r = dict(line.split(" ", 1) for line in out.strip().splitlines())
    ours, base = int(r["ours_bytes_per_job"]), int(r["capnp_rpc_bytes_per_job"])
    text = f"""## The RPC layer's memory per queued job (`bench/rpc_memory_bench.py`, {datetime.date.today()})

{a.jobs:,} jobs queued by one client as `ocluster-client` queues them (`submit`, `job`, then `result` and `log` left open),
{a.rounds} rounds alternating; the server's heap in use (glibc `mallinfo2`) per queued job, bytes, median (all rounds):

| | bytes per queued job |
|---|---|
| ocluster-rpc (ticket and job exported, the job a promise, two calls open) | **{ours}** ({r['ours_all'].strip()}) |
| capnp-rpc, the baseline (the same, the job not even a promise) | **{base}** ({r['capnp_rpc_all'].strip()}) |

The RPC layer alone: {ours / base:.2f}× capnp-rpc's. The scheduler runs on it, its hot path (the client's ticket and job) native; what the whole
scheduler holds per queued job (the pool's state, the job's own, and this) is measured by `bench/ocluster_bench.py` (the `ocluster` section).
"""
    write_section("rpc-memory", text)
    print(text)


if __name__ == "__main__":
    main()
