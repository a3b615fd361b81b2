"""Shared by the bench scripts: each owns one section of docs/benchmarks.md, between
`<!-- NAME:start -->` and `<!-- NAME:end -->`, and rewrites only that."""

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "benchmarks.md")

HEADER = """# Benchmarks

Made by the scripts in `bench/` (each rewrites its own section). Every figure is the wall
time of whole processes on this machine kind (2 cores), median [min–max] in ms unless said,
next to a baseline measured in the same run. See `docs/performance.md` for what they mean.
"""


def write_section(name, text, path=DOC):
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    old = open(path).read() if os.path.exists(path) else HEADER
    if "<!--" not in old:
        old = HEADER  # an old single-report file: start afresh
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in old:
        new = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, old, flags=re.S)
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(new)


def sh(*argv, check=True, **kw):
    return subprocess.run(argv, check=check, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


class LoopFs:
    """A filesystem on a loopback file, made fresh for the run."""

    def __init__(self, kind, size_mb=3072):
        self.dir = tempfile.mkdtemp(prefix="obuilder-bench-", dir="/var/tmp")
        self.img = os.path.join(self.dir, "fs.img")
        self.mnt = os.path.join(self.dir, "mnt")
        os.mkdir(self.mnt)
        with open(self.img, "wb") as f:
            f.truncate(size_mb * 1024 * 1024)
        mkfs = {"btrfs": ["mkfs.btrfs", "-q"], "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"], "ext4": ["mkfs.ext4", "-q", "-F"]}[kind]
        sh(*mkfs, self.img)
        sh("mount", "-o", "loop", self.img, self.mnt)

    def close(self):
        mounts = [l.split()[4] for l in open("/proc/self/mountinfo") if l.split()[4].startswith(self.mnt + "/")]
        for m in sorted(mounts, key=len, reverse=True):
            sh("umount", "-l", m, check=False)
        sh("umount", self.mnt, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


class Registry:
    """Debian's docker-registry on 127.0.0.1 with a throw-away storage dir."""

    def __init__(self, port=0):
        self.dir = tempfile.mkdtemp(prefix="obuilder-bench-registry-", dir="/var/tmp")
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT from a previous run
        s.bind(("127.0.0.1", port))
        self.port = s.getsockname()[1]
        s.close()
        self.addr = f"127.0.0.1:{self.port}"
        cfg = os.path.join(self.dir, "config.yml")
        with open(cfg, "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {self.dir}/storage\n"
                    f"http:\n  addr: {self.addr}\n")
        self.proc = subprocess.Popen(["docker-registry", "serve", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("docker-registry did not start")

    def push(self, layout, ref):
        sh("skopeo", "copy", "--preserve-digests", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:latest", f"docker://{self.addr}/{ref}")

    def close(self):
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def stats(xs):
    xs = sorted(xs)
    n = len(xs)
    med = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
    return med, xs[0], xs[-1]


def cpu_idle(window=0.2):
    """The share of the machine's CPU time that was idle over `window` seconds (/proc/stat)."""
    def sample():
        f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return f[3] + f[4], sum(f)  # idle + iowait, all
    i0, t0 = sample()
    time.sleep(window)
    i1, t1 = sample()
    return (i1 - i0) / max(t1 - t0, 1)


def settle(min_idle=0.9, timeout=10.0):
    """Waits (at most `timeout` s) until the CPU is at least `min_idle` idle over 0.2 s: the
    kernel tears a step's namespaces down in workers of its own after the step, and a
    measurement of a few ms taken meanwhile measures that. Returns the idle share seen last."""
    deadline = time.monotonic() + timeout
    idle = cpu_idle()
    while idle < min_idle and time.monotonic() < deadline:
        idle = cpu_idle()
    return idle
