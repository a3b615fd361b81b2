#!/usr/bin/env python3
"""obuilder side by side with buildah on the shared workload (../shared/bench/).

Usage (as root, one command on a fresh machine of this kind):

    python3 bench/compare.py [--quick] [--reps N] [--stores btrfs,overlayfs,...] [--no-throughput]

It installs buildah and debootstrap if missing, makes the Debian bookworm minbase base
with debootstrap (cached under /var/tmp/obuilder-bench-cache), starts Debian's
docker-registry on 127.0.0.1:5000 and pushes the base as localhost:5000/debian:bookworm,
generates the 206-file context, then for each scenario runs obuilder (on each store) and
buildah (overlay storage, runc, --layers, --network none) alternately, each on a
filesystem made fresh for the run:

* base pull           — the base from the registry into empty storage;
* cold                — the whole workload, base already local;
* fully cached        — the same again;
* last step changed   — "final step 1" rewritten;
* one source changed  — src/lib07/mod03.c edited.

Then (unless --no-throughput) 40 workload variants (each a different last step and one
different source file), 4 at a time, on an empty store and on one holding 5000 results
(btrfs and overlayfs; --throughput-stores), with the same btrfs work done without obuilder
as the baseline; and obuilder's peak RSS. Results: the "compare" section of docs/benchmarks.md. It
never runs two measurements at once and cleans up everything it mounts and starts.
"""

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from report import REPO, LoopFs, Registry, sh, stats, write_section  # noqa: E402
from pull_bench import layout, minbase  # noqa: E402

OBUILDER = os.path.join(REPO, "target", "release", "obuilder")
SHARED = os.path.normpath(os.path.join(REPO, "..", "shared", "bench", "workload"))
BASE_REF = "localhost:5000/debian:bookworm"

STORES = {
    "btrfs": ("btrfs", ["--store", "btrfs:{root}"]),
    "overlayfs": ("ext4", ["--store", "overlayfs:{root}"]),
    "xfs": ("xfs", ["--store", "xfs:{root}"]),
    "rsync copy": ("ext4", ["--store", "rsync:{root}", "--rsync-mode", "copy"]),
    "rsync hardlink": ("ext4", ["--store", "rsync:{root}", "--rsync-mode", "hardlink"]),
}

PHASES = ["fetch", "hash", "snapshot", "sandbox", "copy", "publish", "record"]


def workload_tools():
    """Installs what the workload benches need, if missing."""
    for tool in ["buildah", "debootstrap", "docker-registry", "skopeo"]:
        if shutil.which(tool) is None:
            sh("apt-get", "install", "-y", "-qq", tool, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def serve_workload(work, reg):
    """Pushes the Debian minbase base to `reg` (as BASE_REF) and generates the 206-file
    context; returns (the base's root filesystem, the context dir)."""
    root = minbase()
    base_layer = os.path.join(work, "base.tar.gz")
    sh("tar", "--create", "--gzip", "--file", base_layer, "--numeric-owner", "--directory", root, ".")
    layout(os.path.join(work, "layout"), [base_layer], ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
    reg.push(os.path.join(work, "layout"), "debian:bookworm")
    ctx = os.path.join(work, "ctx")
    sh("bash", os.path.join(SHARED, "gen-context.sh"), ctx)
    return root, ctx


def settle():
    """Before each measurement: write back what the last one left dirty, so that neither tool
    pays for the other's (or its own previous) writeback."""
    os.sync()
    time.sleep(0.3)


def run(argv, env=None, cwd=None, settled=True, rss=False):
    """Runs a command; returns (seconds, stdout, stderr, max RSS in KiB or 0). With `rss`,
    through `/usr/bin/time` (the child's own rusage would count the forked Python's pages);
    without, directly, so that a 7 ms build is not measured with an extra exec in front."""
    if settled:
        settle()
    pre = ["/usr/bin/time", "-f", "MAXRSS=%M"] if rss else []
    t = time.perf_counter()
    r = subprocess.run(pre + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    m = re.findall(r"MAXRSS=(\d+)", r.stderr)
    return dt, r.stdout, r.stderr, int(m[-1]) if m else 0


def spawn_floor():
    """What the harness itself adds to any measured process: spawning /bin/true."""
    xs = [run(["/bin/true"], settled=False)[0] for _ in range(50)]
    return stats(xs)[0]


def phase_cells(ps):
    """Table cells: the median of each phase over the builds' phase timings `ps`, in ms."""
    return [f"{sorted(p.get(ph, 0) for p in ps)[len(ps) // 2]:.0f}" for ph in PHASES]


def phases(stderr):
    out = {}
    for m in re.finditer(r'phase="?(\w+)"? ms=([0-9.]+)', stderr):
        out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


class Ours:
    def __init__(self, store_label, work):
        fs_kind, args = STORES[store_label]
        self.label = f"obuilder ({store_label})"
        self.fs = LoopFs(fs_kind, 6144)
        self.args_t = args
        self.work = work
        self.n = 0
        self.root = None
        self.spec_text = open(os.path.join(SHARED, "spec.sexp")).read()

    def fresh(self):
        self.n += 1
        self.root = os.path.join(self.fs.mnt, f"store-{self.n}")
        self.args = [a.format(root=self.root) for a in self.args_t]

    def drop(self):
        if self.root:
            subprocess.run([OBUILDER, "clean"] + self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            shutil.rmtree(self.root, ignore_errors=True)

    def spec(self, text):
        p = os.path.join(self.work, f"ob-{time.time_ns()}.spec")
        open(p, "w").write(text)
        return p

    def pull(self):
        p = self.spec(f"((from {BASE_REF}))\n")
        return run([OBUILDER, "build", "-f", p, self.work] + self.args)

    def build(self, ctx, final="final step 1", settled=True, rss=False):
        env = dict(os.environ, OBUILDER_TIMINGS="1")
        p = self.spec(self.spec_text.replace("final step 1", final))
        return run([OBUILDER, "build", "--fast-sync", "-f", p, ctx] + self.args, env=env, settled=settled, rss=rss)

    def close(self):
        self.drop()
        self.fs.close()


class Buildah:
    label = "buildah"

    def __init__(self, work):
        self.fs = LoopFs("ext4", 6144)
        self.work = work
        self.n = 0
        self.dockerfile = open(os.path.join(SHARED, "Dockerfile")).read()

    def fresh(self):
        self.n += 1
        base = os.path.join(self.fs.mnt, f"b-{self.n}")
        self.common = ["--root", os.path.join(base, "root"), "--runroot", os.path.join(base, "run"), "--storage-driver", "overlay"]
        self.base = base

    def drop(self):
        if not hasattr(self, "common"):
            return
        subprocess.run(["buildah"] + self.common + ["rm", "--all"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["buildah"] + self.common + ["rmi", "--all", "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # overlay storage leaves mounts behind; unmount before removing
        for l in open("/proc/self/mountinfo").read().splitlines():
            m = l.split()[4]
            if m.startswith(self.base + "/"):
                subprocess.run(["umount", "-l", m], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.base, ignore_errors=True)

    def pull(self):
        return run(["buildah"] + self.common + ["pull", "--quiet", "--tls-verify=false", BASE_REF])

    def build(self, ctx, final="final step 1", rss=False):
        df = os.path.join(self.work, f"Dockerfile-{time.time_ns()}")
        open(df, "w").write(self.dockerfile.replace("final step 1", final))
        return run(["buildah"] + self.common + ["bud", "--quiet", "--layers", "--network", "none", "--isolation", "oci",
                                                "--runtime", "runc", "--tls-verify=false", "-f", df, "-t", "obench", ctx], rss=rss)

    def close(self):
        self.drop()
        self.fs.close()


class Chroot:
    """The same work with no tool at all: the Dockerfile's RUN lines run one after the other
    with `chroot` in a copy of the base (made untimed), and its COPY as `cp -a`. The floor
    under any builder's cold build."""
    label = "plain chroot (no tool)"

    def __init__(self, work, base_root):
        self.fs = LoopFs("ext4", 6144)
        self.work = work
        self.base_root = base_root
        self.steps = []
        for line in open(os.path.join(SHARED, "Dockerfile")):
            if line.startswith("RUN "):
                self.steps.append(("run", line[4:].strip()))
            elif line.startswith("COPY "):
                self.steps.append(("copy", None))

    def cold(self, ctx):
        root = os.path.join(self.fs.mnt, "root")
        shutil.rmtree(root, ignore_errors=True)
        sh("cp", "-a", self.base_root, root)
        os.makedirs(os.path.join(root, "src"), exist_ok=True)
        settle()
        t = time.perf_counter()
        for kind, cmd in self.steps:
            if kind == "copy":
                sh("cp", "-a", ctx + "/.", os.path.join(root, "src") + "/")
            else:
                sh("chroot", root, "/bin/sh", "-c", f"cd /src && {cmd}")
        dt = time.perf_counter() - t
        shutil.rmtree(root, ignore_errors=True)
        return dt

    def close(self):
        self.fs.close()


def edit_source(ctx, tag):
    with open(os.path.join(ctx, "src/lib07/mod03.c"), "a") as f:
        f.write(f"/* edit {tag} */\n")


def scenarios(tool, ctx, reps, results, timings, rss):
    """One round for one tool: fresh storage, then the five scenarios."""
    tool.fresh()
    try:
        t, *_ = tool.pull()
        results.setdefault((tool.label, "base pull"), []).append(t)
        t, _, err, mem = tool.build(ctx, rss=True)
        results.setdefault((tool.label, "cold"), []).append(t)
        timings.setdefault((tool.label, "cold"), []).append(phases(err))
        rss.setdefault(tool.label, []).append(mem)
        t, *_ = tool.build(ctx)
        results.setdefault((tool.label, "fully cached"), []).append(t)
        t, _, err, _ = tool.build(ctx, final=f"final step r{time.time_ns()}")
        results.setdefault((tool.label, "last step changed"), []).append(t)
        timings.setdefault((tool.label, "last step changed"), []).append(phases(err))
        edit_source(ctx, time.time_ns())
        t, _, err, _ = tool.build(ctx)
        results.setdefault((tool.label, "one source changed"), []).append(t)
        timings.setdefault((tool.label, "one source changed"), []).append(phases(err))
    finally:
        tool.drop()
        sh("bash", os.path.join(SHARED, "gen-context.sh"), ctx)


BTRFS_IOC_SNAP_CREATE_V2 = 0x50009417  # _IOW(0x94, 23, struct btrfs_ioctl_vol_args_v2)
BTRFS_IOC_SNAP_DESTROY_V2 = 0x5000943F  # _IOW(0x94, 63, struct btrfs_ioctl_vol_args_v2)
BTRFS_SUBVOL_RDONLY = 1 << 1


def raw_btrfs_steps(src, tmp, n_variants):
    """The btrfs work of the throughput run with no obuilder, as the btrfs store does it: for
    each variant, 3 chained steps of (snapshot the previous result, a whole-directory
    subvolume, with the same ioctl obuilder uses; write 100 KB into its rootfs; publish it
    with a read-only snapshot; delete the writable one), 4 variants at a time.
    Returns (wall seconds, per-variant seconds in the first snapshots, in the publishing ones)."""
    import fcntl
    import struct

    def vol_args(fd, name, flags):
        args = bytearray(4096)
        struct.pack_into("qQQ", args, 0, fd, 0, flags)
        args[56:56 + len(name)] = name.encode()
        return args

    def snapshot(src_dir, parent, name, flags=0):
        sfd = os.open(src_dir, os.O_RDONLY | os.O_DIRECTORY)
        pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(pfd, BTRFS_IOC_SNAP_CREATE_V2, vol_args(sfd, name, flags))
        finally:
            os.close(sfd)
            os.close(pfd)

    def destroy(parent, name):
        pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(pfd, BTRFS_IOC_SNAP_DESTROY_V2, vol_args(0, name, 0))
        finally:
            os.close(pfd)

    def variant(i):
        prev, t_snap, t_ro = src, 0.0, 0.0
        for k in range(3):
            name = f"raw-{i}-{k}"
            t = time.perf_counter()
            snapshot(prev, tmp, name)
            t_snap += time.perf_counter() - t
            with open(os.path.join(tmp, name, "rootfs", name), "wb") as f:
                f.write(os.urandom(100_000))
            t = time.perf_counter()
            snapshot(os.path.join(tmp, name), tmp, f"done-{i}-{k}", BTRFS_SUBVOL_RDONLY)
            t_ro += time.perf_counter() - t
            destroy(tmp, name)
            prev = os.path.join(tmp, f"done-{i}-{k}")
        return t_snap, t_ro

    os.makedirs(tmp, exist_ok=True)
    settle()
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        res = list(pool.map(variant, range(n_variants)))
    return time.perf_counter() - t0, [r[0] for r in res], [r[1] for r in res]


def throughput(work, ctx_master, n_builds, fill_n, store_label):
    """n_builds variants, 4 at a time, on an empty store and on one holding fill_n results. On
    btrfs, each time followed by the same btrfs work without obuilder (`raw_btrfs_steps`)."""
    out = {}
    for label, fill_to in [("empty store", 0), (f"store with {fill_n} results", fill_n)]:
        ours = Ours(store_label, work)
        try:
            ours.fresh()
            ours.pull()
            ours.build(ctx_master)
            newest = max(os.scandir(os.path.join(ours.root, "result")), key=lambda e: e.stat().st_mtime_ns).path
            if fill_to:
                per = 100
                t_fill = time.perf_counter()
                for j in range(fill_to // per):
                    steps = "".join(f' (run (shell "true fill-{j}-{k}"))' for k in range(per))
                    p = ours.spec(f"((from {BASE_REF}) (shell /bin/sh -c){steps})\n")
                    run([OBUILDER, "build", "--fast-sync", "-f", p, ctx_master] + ours.args, settled=False)
                print(f"  filled {fill_to} results in {time.perf_counter() - t_fill:.0f} s", file=sys.stderr)
            sh("sync")
            time.sleep(3)
            ctxs = []
            for i in range(n_builds):
                c = os.path.join(work, f"ctx-{label[:5]}-{i}")
                shutil.copytree(ctx_master, c, symlinks=True)
                edit_source(c, f"variant-{i}")
                ctxs.append(c)
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                res = list(pool.map(lambda i: ours.build(ctxs[i], final=f"variant {i}", settled=False, rss=True),
                                    range(n_builds)))
            wall = time.perf_counter() - t0
            out[label] = dict(wall=wall, per_build=[r[0] for r in res], rss=max(r[3] for r in res),
                              own=[r[0] - phases(r[2]).get("sandbox", 0) / 1000 for r in res],
                              phases=[phases(r[2]) for r in res])
            for c in ctxs:
                shutil.rmtree(c, ignore_errors=True)
            if store_label == "btrfs":
                raw_wall, raw_snap, raw_ro = raw_btrfs_steps(newest,
                                                             os.path.join(ours.fs.mnt, f"raw-{ours.n}"), n_builds)
                out[label].update(raw_wall=raw_wall, raw_snap=raw_snap, raw_ro=raw_ro)
        finally:
            ours.close()
    return out


def ms(x):
    return f"{x * 1000:.0f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one repetition, btrfs only, small throughput run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--stores", default="btrfs,overlayfs,xfs,rsync copy,rsync hardlink")
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--throughput-stores", default="btrfs,overlayfs",
                    help="stores for the throughput run (default: %(default)s)")
    ap.add_argument("--only-throughput", action="store_true",
                    help="skip the scenarios; rewrite only the throughput part of the report")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    if a.quick:
        a.reps, a.stores = 1, "btrfs"
    workload_tools()
    sh("cargo", "build", "--release", "--quiet", cwd=REPO)
    work = tempfile.mkdtemp(prefix="obuilder-compare-", dir="/var/tmp")
    reg = Registry(port=5000)
    tools = []
    try:
        root, ctx = serve_workload(work, reg)
        stores = [s.strip() for s in a.stores.split(",") if s.strip()]
        tools = [Buildah(work)] + [Ours(s, work) for s in stores]
        floor = Chroot(work, root)
        tools.append(floor)
        results, timings, rss = {}, {}, {}
        for rep in range(0 if a.only_throughput else a.reps):
            for tool in tools:  # alternate tools within each repetition
                print(f"rep {rep + 1}/{a.reps}: {tool.label}", file=sys.stderr)
                if tool is floor:
                    results.setdefault((floor.label, "cold"), []).append(floor.cold(ctx))
                else:
                    scenarios(tool, ctx, a.reps, results, timings, rss)
        thr = None
        a.fill = 500 if a.quick else 5000
        if not a.no_throughput:
            print("throughput", file=sys.stderr)
            thr = {}
            for st in [x.strip() for x in a.throughput_stores.split(",") if x.strip()]:
                print(f"throughput: {st}", file=sys.stderr)
                thr[st] = throughput(work, ctx, 8 if a.quick else 40, a.fill, st)
        a.spawn_floor = spawn_floor()
        report(a, results, timings, rss, thr, [t.label for t in tools if t is not floor], floor.label)
    finally:
        for t in tools:
            try:
                t.close()
            except Exception as e:  # clean up the others anyway
                print(f"cleaning up {t.label}: {e}", file=sys.stderr)
        reg.close()
        shutil.rmtree(work, ignore_errors=True)


TARGETS = {"cold": 1 / 3, "fully cached": 1 / 50, "last step changed": 1 / 10, "one source changed": 1 / 4, "base pull": 1 / 2}


def report(a, results, timings, rss, thr, labels, floor_label):
    report_throughput(a, thr)
    if a.only_throughput:
        return
    L = []
    w = L.append
    w("## obuilder and buildah on the shared workload (`bench/compare.py`)")
    w("")
    w(f"Measured by `python3 bench/compare.py{' --quick' if a.quick else ''}` on {time.strftime('%Y-%m-%d')} "
      f"({os.cpu_count()} cores): the 8-step workload of `../shared/bench/` (Debian bookworm minbase base from "
      f"`localhost:5000`, 10 000-file step, 206-file context), {a.reps} round(s) alternating the tools, each tool's "
      "storage on a filesystem made fresh for the run. buildah: overlay storage, runc, `--layers`, `--network none`. "
      "obuilder: `--fast-sync`. Whole-process wall times, median [min–max] in ms, each after `sync` and a 0.3 s "
      f"pause (spawning `/bin/true` the same way takes {a.spawn_floor * 1000:.1f} ms: the harness's share of "
      "every figure).")
    w("")
    scen = ["base pull", "cold", "fully cached", "last step changed", "one source changed"]
    w("| scenario | " + " | ".join(labels) + " | target ours/buildah |")
    w("|---|" + "---|" * len(labels) + "---|")
    for sc in scen:
        cells = []
        for lab in labels:
            v = results.get((lab, sc))
            cells.append(f"{ms(stats(v)[0])} [{ms(stats(v)[1])}–{ms(stats(v)[2])}]" if v else "–")
        w(f"| {sc} | " + " | ".join(cells) + f" | ≤ {TARGETS[sc]:.3f} |")
    fl = results.get((floor_label, "cold"))
    b_cold = results.get(("buildah", "cold"))
    if fl and b_cold:
        w("")
        w(f"The same work with no tool at all ({floor_label}: the RUN lines under `chroot` one after the other "
          f"in a copy of the base on a fresh ext4, the COPY as `cp -a`): **{ms(stats(fl)[0])}** "
          f"[{ms(stats(fl)[1])}–{ms(stats(fl)[2])}] ms, {stats(fl)[0] / stats(b_cold)[0]:.3f} of buildah's cold build. "
          "That is the floor under any builder's cold ratio in this run.")
    w("")
    w("Ratios ours / buildah (medians; **bold** where the target is met):")
    w("")
    ours = [l for l in labels if l != "buildah"]
    w("| scenario | " + " | ".join(ours) + " |")
    w("|---|" + "---|" * len(ours))
    for sc in scen:
        b = results.get(("buildah", sc))
        cells = []
        for lab in ours:
            v = results.get((lab, sc))
            if v and b:
                r = stats(v)[0] / stats(b)[0]
                cells.append(f"**{r:.3f}**" if r <= TARGETS[sc] else f"{r:.3f}")
            else:
                cells.append("–")
        w(f"| {sc} | " + " | ".join(cells) + " |")
    w("")
    snap = [l for l in ours if "rsync" not in l]
    rs = [l for l in ours if "rsync" in l]
    if snap and rs:
        w("rsync against the snapshot stores (the seeds report 4 → 16 jobs/hour moving macOS from rsync to ZFS):")
        w("")
        for sc in ["cold", "last step changed", "one source changed"]:
            best = min(stats(results[(l, sc)])[0] for l in snap)
            w(f"* {sc}: " + ", ".join(f"{l} {stats(results[(l, sc)])[0] / best:.1f}× the fastest snapshot store" for l in rs))
        w("")
    w("Where obuilder's time goes (sum of its own phase timings per build, median over rounds, ms; `sandbox` is runc "
      "start + the command):")
    w("")
    w("| build | " + " | ".join(PHASES) + " | whole process |")
    w("|---|" + "---|" * (len(PHASES) + 1))
    for lab in ours:
        for sc in ["cold", "last step changed", "one source changed"]:
            ts = timings.get((lab, sc), [])
            if not ts:
                continue
            w(f"| {lab}, {sc} | " + " | ".join(phase_cells(ts)) + f" | {ms(stats(results[(lab, sc)])[0])} |")
    w("")
    w("Peak RSS of one `obuilder build` process during the cold build: " +
      ", ".join(f"{lab} {max(v) / 1024:.0f} MiB" for lab, v in rss.items() if lab != "buildah") +
      (f" (buildah: {max(rss['buildah']) / 1024:.0f} MiB)." if "buildah" in rss else "."))
    w("")
    out = "\n".join(L) + "\n"
    write_section("compare", out)
    print(out)


def med(xs):
    return stats(xs)[0]


def report_throughput(a, thr):
    if not thr:
        return
    L = []
    w = L.append
    w("## Throughput on a busy store (`bench/compare.py`)")
    w("")
    w(f"Measured on {time.strftime('%Y-%m-%d')}, part of the same run as the comparison above "
      f"(or alone with `--only-throughput`). Workload variants (each its own last step and one different source "
      f"file, so 3 steps re-run and 5 are cache hits), 4 `obuilder build` processes at a time on one store, first "
      f"on a store holding only the workload, then on one also holding {a.fill} other results ({a.fill // 100} specs "
      f"of 100 steps).")
    w("")
    w("| store | results in store | builds | wall (s) | builds per hour | median build (ms) | obuilder's own time per build (ms) | peak RSS per process |")
    w("|---|---|---|---|---|---|---|---|")
    for st, runs in thr.items():
        for k, v in runs.items():
            n = len(v["per_build"])
            w(f"| {st} | {k} | {n} | {v['wall']:.1f} | {n / v['wall'] * 3600:.0f} | {ms(med(v['per_build']))} | "
              f"{ms(med(v['own']))} | {v['rss'] / 1024:.0f} MiB |")
    w("")
    w("obuilder's own time is a build's wall time minus the time inside runc (start and command). Per phase "
      "(median per build, ms):")
    w("")
    w("| store | results in store | " + " | ".join(PHASES) + " | whole build |")
    w("|---|---|" + "---|" * (len(PHASES) + 1))
    for st, runs in thr.items():
        for k, v in runs.items():
            w(f"| {st} | {k} | " + " | ".join(phase_cells(v["phases"])) + f" | {ms(med(v['per_build']))} |")
    for st, runs in thr.items():
        ks = list(runs)
        if len(ks) != 2:
            continue
        e, f = runs[ks[0]], runs[ks[1]]
        w("")
        w(f"{st}: a build on the full store took {med(f['per_build']) / med(e['per_build']):.2f}× as long as on the "
          f"empty one; obuilder's own time per build {med(f['own']) / med(e['own']):.2f}×.")
        if "raw_wall" in e:
            rs = lambda v: [x + y for x, y in zip(v["raw_snap"], v["raw_ro"])]  # noqa: E731
            be, bf = med(rs(e)), med(rs(f))
            w("")
            w("The same btrfs work with no obuilder at all, 4 at a time, on each of the two stores just after "
              "obuilder's run (per variant, 3 chained steps of, as the btrfs store does them: snapshot of the "
              "previous result, write 100 KB, read-only snapshot that publishes it, delete of the writable one; "
              "ms per variant, median):")
            w("")
            w("| results in store | wall (s) | snapshots | publishing snapshots | both |")
            w("|---|---|---|---|---|")
            for k in ks:
                v = runs[k]
                w(f"| {k} | {v['raw_wall']:.2f} | {ms(med(v['raw_snap']))} | {ms(med(v['raw_ro']))} | "
                  f"{ms(med(rs(v)))} |")
            w("")
            w(f"btrfs's own cost for those steps grew {bf / be:.2f}× ({ms(be)} → {ms(bf)} ms per variant).")
        ex = lambda v: [o - (p.get("snapshot", 0) + p.get("publish", 0)) / 1000  # noqa: E731
                        for o, p in zip(v["own"], v["phases"])]
        xe, xf = med(ex(e)), med(ex(f))
        w("")
        w(f"obuilder's own time outside the store's snapshot and publish calls (the per-step overhead that is "
          f"obuilder's code: lookups, hashing, locks, the database, sandbox setup): {ms(xe)} ms per build on the "
          f"empty store, {ms(xf)} ms on the full one (**{xf / xe:.2f}×**), {ms(xe / 3)} → {ms(xf / 3)} ms per "
          f"re-run step.")
    w("")
    out = "\n".join(L) + "\n"
    write_section("throughput", out)
    print(out)


if __name__ == "__main__":
    main()
