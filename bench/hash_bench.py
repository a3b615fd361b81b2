#!/usr/bin/env python3
"""Context hashing benchmark: the `copy` manifest of a large build context (walk + SHA-256
of every file, in parallel), against `sha256sum` of the same files in the same run.

Usage:  python3 bench/hash_bench.py [--quick] [--reps N]

The context (1 GiB: 64 files of 8 MiB, 2048 of 256 KiB, 16384 of 4 KiB) is made on a
filesystem created for the run; it is read once before timing, so every tool reads it from
the page cache, as a rebuild does. Goal: >= 1 GB/s on this 2-core machine.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from report import REPO, LoopFs, sh, stats, write_section  # noqa: E402


def make_context(root, scale):
    os.makedirs(root)
    block = os.urandom(1 << 20)
    for name, count, size in [("big", 64, 8 << 20), ("mid", 2048, 256 << 10), ("small", 16384, 4 << 10)]:
        count = max(1, int(count * scale))
        d = os.path.join(root, name)
        os.makedirs(d)
        for i in range(count):
            with open(os.path.join(d, f"f{i}"), "wb") as f:
                left = size
                while left > 0:
                    n = min(left, len(block))
                    f.write(block[:n])
                    left -= n
            if i % 1000 == 0:
                block = os.urandom(1 << 20)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    scale = 0.1 if a.quick else 1.0
    reps = 1 if a.quick else a.reps
    sh("cargo", "build", "--release", "--quiet", "--example", "hash_context", "-p", "obuilder-engine", cwd=REPO)
    exe = os.path.join(REPO, "target", "release", "examples", "hash_context")
    fs = LoopFs("ext4", 3072)
    try:
        ctx = os.path.join(fs.mnt, "ctx")
        make_context(ctx, scale)
        sh("sh", "-c", f"cat $(find {ctx} -type f) > /dev/null")  # warm the page cache
        ours, base1, base2 = [], [], []
        nbytes = 0
        for _ in range(reps):
            out = sh(exe, ctx).stdout.split()
            nbytes, secs = int(out[0]), float(out[1])
            ours.append(secs)
            t = time.perf_counter()
            sh("sh", "-c", f"find {ctx} -type f -print0 | xargs -0 sha256sum > /dev/null")
            base1.append(time.perf_counter() - t)
            t = time.perf_counter()
            sh("sh", "-c", f"find {ctx} -type f -print0 | xargs -0 -P{os.cpu_count()} -n 256 sha256sum > /dev/null")
            base2.append(time.perf_counter() - t)
        gb = nbytes / 1e9
        o, b1, b2 = stats(ours), stats(base1), stats(base2)
        files = sum(len(fs_) for _, _, fs_ in os.walk(ctx))
        lines = [
            "## Context hashing (`bench/hash_bench.py`)",
            "",
            f"Measured on {time.strftime('%Y-%m-%d')}, {reps} repetition(s): the `copy` manifest (walk, then SHA-256 of "
            f"every file on all {os.cpu_count()} cores) of a {gb:.2f} GB context of {files} files, from the page cache.",
            "",
            "| | time (ms) | throughput |",
            "|---|---|---|",
            f"| obuilder manifest | **{o[0] * 1000:.0f}** [{o[1] * 1000:.0f}–{o[2] * 1000:.0f}] | **{gb / o[0]:.2f} GB/s** |",
            f"| baseline: `sha256sum` of the same files, one process | {b1[0] * 1000:.0f} | {gb / b1[0]:.2f} GB/s |",
            f"| baseline: `sha256sum`, {os.cpu_count()} in parallel (`xargs -P`) | {b2[0] * 1000:.0f} | {gb / b2[0]:.2f} GB/s |",
            "",
            "Goal (issue 5): >= 1 GB/s of file data on 2 cores.",
        ]
        out = "\n".join(lines) + "\n"
        write_section("hash", out)
        print(out)
    finally:
        fs.close()


if __name__ == "__main__":
    main()
