#!/usr/bin/env python3
"""Build benchmark: the quick-start spec on every store, with same-run baselines.

Usage (as root):  python3 bench/build_bench.py [--quick] [--reps N] [--fill N] [--out docs/benchmarks.md]

For each store (btrfs, overlayfs on ext4, xfs reflink, rsync copy, rsync hardlink), on a
filesystem made fresh for the run (a loopback file), it measures whole `obuilder build`
processes:

* cold        — the base image is imported, no result is cached (store cleaned each rep);
* cached      — every step is a cache hit;
* last step   — only the last step changed (a fresh command text each rep);

and, in the same run, the baselines:

* bare runc   — `runc run` of the last step's command on a prepared bundle, no obuilder;
* raw clone   — the store's own snapshot primitive (btrfs subvolume snapshot + delete,
                cp --reflink, rsync -a, overlay mount + umount) of the base rootfs.

Then, on btrfs, it fills the store with --fill cached results (default 5000) and measures the
last-step overhead and the raw snapshot again, to see whether many subvolumes slow things down.

Never runs two measurements at once. Cleans up every mount and loop file it makes.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OBUILDER = os.path.join(REPO, "target", "release", "obuilder")
SPEC = open(os.path.join(REPO, "examples", "quickstart.spec")).read()
LAST = "ls -l /data > /data/5 && echo last-step-v0"


def sh(*argv, check=True, **kw):
    return subprocess.run(argv, check=check, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def timed(argv, **kw):
    t = time.perf_counter()
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {r.stderr}")
    return dt


def stats(xs):
    xs = sorted(xs)
    med = statistics.median(xs)
    lo, hi = xs[0], xs[-1]
    return med, lo, hi


def ms(x):
    return f"{x * 1000:.1f}"


class LoopFs:
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
        sh("umount", self.mnt, check=False) or None
        shutil.rmtree(self.dir, ignore_errors=True)


STORES = [
    ("btrfs", "btrfs", "btrfs", []),
    ("overlayfs", "ext4", "overlayfs", []),
    ("xfs", "xfs", "xfs", []),
    ("rsync copy", "ext4", "rsync", ["--rsync-mode", "copy"]),
    ("rsync hardlink", "ext4", "rsync", ["--rsync-mode", "hardlink"]),
]


class Bench:
    def __init__(self, label, fs_kind, store_kind, extra, busybox):
        self.label = label
        self.fs = LoopFs(fs_kind)
        self.root = os.path.join(self.fs.mnt, "store")
        self.store_kind = store_kind
        self.args = ["--store", f"{store_kind}:{self.root}"] + extra + ["--fast-sync"]
        self.work = tempfile.mkdtemp(prefix="obuilder-bench-work-", dir="/var/tmp")
        self.ctx = os.path.join(self.work, "ctx")
        os.mkdir(self.ctx)
        sh(OBUILDER, "image", "import", "busybox", busybox, "--env", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
           *[a for a in self.args if a != "--fast-sync"])
        self.n = 0

    def spec(self, text):
        self.n += 1
        p = os.path.join(self.work, f"s{self.n}.spec")
        with open(p, "w") as f:
            f.write(text)
        return p

    def build(self, spec_path):
        return timed([OBUILDER, "build", "-f", spec_path, self.ctx] + self.args)

    def clean(self):
        sh(OBUILDER, "clean", *[a for a in self.args if a != "--fast-sync"])

    def close(self):
        shutil.rmtree(self.work, ignore_errors=True)
        self.fs.close()


def bare_runc(work, rootfs_src, reps, cmd):
    """runc run of `cmd` on a copy of rootfs_src, no obuilder: the floor for a step."""
    bundle = os.path.join(work, "bundle")
    os.makedirs(bundle, exist_ok=True)
    rootfs = os.path.join(bundle, "rootfs")
    sh("cp", "-a", rootfs_src, rootfs)
    os.makedirs(os.path.join(rootfs, "data"), exist_ok=True)
    sh("runc", "spec", "--bundle", bundle)
    import json
    cfgp = os.path.join(bundle, "config.json")
    cfg = json.load(open(cfgp))
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = ["/bin/sh", "-c", cmd]
    cfg["root"]["readonly"] = False
    json.dump(cfg, open(cfgp, "w"))
    state = os.path.join(work, "runc-state")
    out = []
    for i in range(reps):
        out.append(timed(["runc", "--root", state, "run", "--bundle", bundle, f"bench-{os.getpid()}-{i}"]))
    shutil.rmtree(bundle, ignore_errors=True)
    return out


def raw_clone(b, reps):
    """The store's own clone primitive on the base rootfs (what one step must at least pay)."""
    res = os.path.join(b.root, "result")
    base = sorted(os.listdir(res), key=lambda d: os.stat(os.path.join(res, d)).st_mtime)[0]
    src = os.path.join(res, base, "rootfs")
    dst = os.path.join(b.root, "bench-clone")
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        if b.store_kind == "btrfs":
            sh("btrfs", "subvolume", "snapshot", src, dst)
            sh("btrfs", "subvolume", "delete", dst)
        elif b.store_kind == "xfs":
            sh("cp", "--archive", "--reflink=always", "--no-target-directory", src, dst)
            shutil.rmtree(dst)
        elif b.store_kind == "rsync":
            sh("rsync", "-aHq", src + "/", dst)
            shutil.rmtree(dst)
        else:
            up, wk = dst + "-up", dst + "-wk"
            for d in (dst, up, wk):
                os.makedirs(d)
            sh("mount", "-t", "overlay", "overlay", "-o", f"lowerdir={src},upperdir={up},workdir={wk}", dst)
            sh("umount", dst)
            for d in (dst, up, wk):
                shutil.rmtree(d)
        out.append(time.perf_counter() - t)
    return out


def snap_runc(b, reps, cmd):
    """btrfs only: what any snapshot builder pays for one step, without obuilder —
    `btrfs subvolume snapshot` of the base, `runc run` of `cmd` inside it, delete."""
    import json
    res = os.path.join(b.root, "result")
    base = sorted(os.listdir(res), key=lambda d: os.stat(os.path.join(res, d)).st_mtime)[0]
    bundle = os.path.join(b.fs.mnt, "bench-bundle")
    os.makedirs(bundle, exist_ok=True)
    sh("runc", "spec", "--bundle", bundle)
    cfgp = os.path.join(bundle, "config.json")
    cfg = json.load(open(cfgp))
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = ["/bin/sh", "-c", "mkdir -p /data && " + cmd]
    cfg["root"] = {"path": os.path.join(bundle, "rootfs"), "readonly": False}
    json.dump(cfg, open(cfgp, "w"))
    out = []
    for i in range(reps):
        t = time.perf_counter()
        sh("btrfs", "subvolume", "snapshot", os.path.join(res, base, "rootfs"), os.path.join(bundle, "rootfs"))
        sh("runc", "--root", os.path.join(b.work, "runc-state"), "run", "--bundle", bundle, f"snap-{os.getpid()}-{i}")
        sh("btrfs", "subvolume", "delete", os.path.join(bundle, "rootfs"))
        out.append(time.perf_counter() - t)
    shutil.rmtree(bundle, ignore_errors=True)
    return out


def measure_store(label, fs_kind, store_kind, extra, busybox, reps, rows, notes):
    b = Bench(label, fs_kind, store_kind, extra, busybox)
    try:
        spec = b.spec(SPEC)
        cold = []
        for _ in range(reps):
            b.clean()
            cold.append(b.build(spec))
        b.build(spec)
        cached = [b.build(spec) for _ in range(reps * 3)]
        last = []
        for i in range(reps * 2):
            s = b.spec(SPEC.replace("last-step-v0", f"last-step-r{i}-{time.time_ns()}"))
            last.append(b.build(s))
        clone = raw_clone(b, reps * 2)
        rows.append((label, stats(cold), stats(cached), stats(last), stats(clone)))
        return b
    except Exception:
        b.close()
        raise


def fill(b, n):
    """Adds about n cached results: specs of 100 trivial steps each."""
    per = 100
    for j in range(max(1, n // per)):
        lines = ["((from busybox)", " (shell /bin/sh -c)"]
        lines += [f' (run (shell "true fill-{j}-{k}"))' for k in range(per)]
        b.build(b.spec("\n".join(lines) + ")\n"))
        done = (j + 1) * per
        if done % 1000 == 0:
            print(f"  filled {done} results", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one repetition, 500-result fill: checks the harness runs")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--fill", type=int, default=5000)
    ap.add_argument("--stores", default="all", help="comma-separated labels, e.g. btrfs,overlayfs")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks.md"))
    a = ap.parse_args()
    if a.quick:
        a.reps, a.fill = 1, 500
    if os.geteuid() != 0:
        sys.exit("run as root")
    sh("cargo", "build", "--release", "--quiet", cwd=REPO)
    work = tempfile.mkdtemp(prefix="obuilder-bench-bb-", dir="/var/tmp")
    busybox = os.path.join(work, "busybox")
    sh("bash", os.path.join(REPO, "scripts", "make-busybox-rootfs.sh"), busybox)
    rows, notes = [], []
    runc_true = bare_runc(work, busybox, a.reps * 4, "true")
    runc_last = bare_runc(work, busybox, a.reps * 4, LAST)
    btrfs_bench = None
    try:
        for label, fs_kind, store_kind, extra in STORES:
            if a.stores != "all" and label not in a.stores.split(","):
                continue
            print(f"measuring {label}", file=sys.stderr)
            b = measure_store(label, fs_kind, store_kind, extra, busybox, a.reps, rows, notes)
            if label == "btrfs":
                btrfs_bench = b
            else:
                b.close()
        scale = None
        if btrfs_bench is not None:
            full = btrfs_bench
            print(f"filling btrfs with {a.fill} results", file=sys.stderr)
            t = time.perf_counter()
            fill(full, a.fill)
            fill_s = time.perf_counter() - t
            count = len(os.listdir(os.path.join(full.root, "result")))
            # A second btrfs, empty but for the quick-start spec, measured alternately with the
            # full one, so that drift of this noisy machine hits both alike.
            empty = Bench("btrfs (empty)", "btrfs", "btrfs", [], busybox)
            try:
                for b in (empty, full):
                    b.build(b.spec(SPEC))
                sh("sync")
                time.sleep(5)
                last = {id(empty): [], id(full): []}
                snap = {id(empty): [], id(full): []}
                cached = {id(empty): [], id(full): []}
                cached_spec = {id(b): b.spec(SPEC) for b in (empty, full)}
                for i in range(a.reps * 4):
                    for b in (empty, full):
                        s = b.spec(SPEC.replace("last-step-v0", f"last-step-s{i}-{time.time_ns()}"))
                        last[id(b)].append(b.build(s))
                        snap[id(b)] += snap_runc(b, 1, LAST)
                        cached[id(b)].append(b.build(cached_spec[id(b)]))
                scale = dict(
                    count=count,
                    fill_s=fill_s,
                    last0=stats(last[id(empty)]),
                    lastN=stats(last[id(full)]),
                    snap0=stats(snap[id(empty)]),
                    snapN=stats(snap[id(full)]),
                    cached0=stats(cached[id(empty)]),
                    cachedN=stats(cached[id(full)]),
                    clone0=stats(raw_clone(empty, a.reps * 2)),
                    cloneN=stats(raw_clone(full, a.reps * 2)),
                )
            finally:
                empty.close()
                full.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(a, rows, stats(runc_true), stats(runc_last), scale)


def report(a, rows, rtrue, rlast, scale):
    lines = []
    w = lines.append
    w("## Builds (`bench/build_bench.py`)")
    w("")
    w(f"Measured by `python3 bench/build_bench.py{' --quick' if a.quick else ''}` on "
      f"{time.strftime('%Y-%m-%d')} ({os.cpu_count()} cores, kernel {os.uname().release}); "
      f"{a.reps} repetition(s) per cold figure, more for the others. Every figure is the wall time of a whole "
      "process (`obuilder build …` or the baseline command), median [min–max], in ms. Each store lives on a "
      "filesystem made fresh for the run (3 GiB loopback file). `--fast-sync` is on.")
    w("")
    w("### The quick-start spec (6 steps) on each store")
    w("")
    w("Baselines in the same run: `runc run` of `true` on a prepared bundle: "
      f"**{ms(rtrue[0])}** [{ms(rtrue[1])}–{ms(rtrue[2])}]; of the last step's command: "
      f"**{ms(rlast[0])}** [{ms(rlast[1])}–{ms(rlast[2])}].")
    w("")
    w("| store | cold (base import + 5 runs) | fully cached | last step changed | last step beyond bare runc | raw clone of the base |")
    w("|---|---|---|---|---|---|")
    for label, cold, cached, last, clone in rows:
        w(f"| {label} | {ms(cold[0])} [{ms(cold[1])}–{ms(cold[2])}] | {ms(cached[0])} [{ms(cached[1])}–{ms(cached[2])}] "
          f"| {ms(last[0])} [{ms(last[1])}–{ms(last[2])}] | **{ms(last[0] - rlast[0])}** | {ms(clone[0])} [{ms(clone[1])}–{ms(clone[2])}] |")
    w("")
    w("\"Last step beyond bare runc\" is the whole `obuilder build` process for the spec with only its last step "
      "changed (5 cache hits, one clone, one container, one commit) minus a bare `runc run` of the same command.")
    w("")
    if scale:
        sc = scale
        over0 = sc["last0"][0] - sc["snap0"][0]
        overN = sc["lastN"][0] - sc["snapN"][0]
        w(f"### btrfs with {sc['count']} results in the store")
        w("")
        w(f"Filled with {sc['count']} results (100-step specs) in {sc['fill_s']:.0f} s. Then an empty btrfs store and the "
          f"full one were measured alternately ({a.reps * 4} rounds), so that the machine's drift hits both alike.")
        w("")
        w("| | empty store | full store | ratio full/empty |")
        w("|---|---|---|---|")
        def row(label, k, bold=False):
            e, f = sc[k + "0"][0], sc[k + "N"][0]
            r = f"{f / e:.2f}"
            w(f"| {label} | {ms(e)} | {ms(f)} | {'**' + r + '**' if bold else r} |")
        row("last step changed (whole `obuilder build`)", "last")
        row("baseline: `btrfs subvolume snapshot` + `runc run` in it + delete, no obuilder", "snap")
        row("fully cached (whole `obuilder build`)", "cached")
        row("raw `btrfs subvolume snapshot` + delete", "clone")
        w(f"| **obuilder's overhead beyond the baseline** | {ms(over0)} | {ms(overN)} | "
          f"**{overN / over0 if over0 > 0 else float('nan'):.2f}** |")
        w("")
        w("The baseline is what any snapshot builder pays for the step on this filesystem in its current state: "
          "snapshot the base, run the same command inside the fresh snapshot with runc, delete the snapshot.")
        w("")
    w("### Targets (issue 3, btrfs)")
    w("")
    bt = [r for r in rows if r[0] == "btrfs"]
    if bt:
        label, cold, cached, last, clone = bt[0]
        w(f"* fully cached whole-process rebuild ≤ 5 ms: **{ms(cached[0])} ms**.")
        w(f"* a step's wall time beyond a bare `runc run` ≤ 30 ms: **{ms(last[0] - rlast[0])} ms**.")
        if scale:
            over0 = scale["last0"][0] - scale["snap0"][0]
            overN = scale["lastN"][0] - scale["snapN"][0]
            w(f"* that overhead at {scale['count']} results ≤ 1.2× the overhead at 0: **{overN / over0:.2f}×** "
              f"(overhead beyond a snapshot + `runc run` on the same btrfs, empty and full stores measured alternately); "
              f"the whole step went from {ms(scale['last0'][0])} to {ms(scale['lastN'][0])} ms.")
    w("")
    out = "\n".join(lines) + "\n"
    sys.path.insert(0, HERE)
    from report import write_section
    write_section("build", out, a.out)
    print(out)


if __name__ == "__main__":
    main()
