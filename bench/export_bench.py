#!/usr/bin/env python3
"""Export and push of a result against buildah's push of the same workload.

Usage (as root):  python3 bench/export_bench.py [--reps N] [--stores btrfs,overlayfs]

Builds the shared workload (../shared/bench/workload: spec and Dockerfile, the Debian
minbase base served by docker-registry on 127.0.0.1:5000) once with obuilder on each store
(a filesystem made fresh for the run) and once with buildah (overlay storage, `--layers`),
then measures whole processes, alternating the tools:

* export cold    — `obuilder export ID oci:DIR`, the per-step layers made afresh (their
                   memo removed), against `buildah push IMAGE oci:DIR`;
* export again   — the same, layers already made;
* push cold      — to an empty docker-registry started for the measurement (every blob
                   uploaded; our layers made afresh), against `buildah push … docker://…`
                   to another empty one;
* push unchanged — the same push again (nothing to upload), against buildah's second push.

Results: the "export" section of docs/benchmarks.md. Target: ours ≤ 0.5× buildah.
"""

import argparse
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from report import REPO, LoopFs, Registry, sh, stats, write_section  # noqa: E402
from pull_bench import timed as timed_run  # noqa: E402
from compare import SHARED, serve_workload, workload_tools  # noqa: E402

OBUILDER = os.path.join(REPO, "target", "release", "obuilder")
STORES = {"btrfs": ("btrfs", "btrfs"), "overlayfs": ("ext4", "overlayfs"), "xfs": ("xfs", "xfs")}


def timed(argv):
    """(seconds, stdout) of a whole process, after writing back what the last one left."""
    sh("sync")
    return timed_run(argv)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--stores", default="btrfs,overlayfs")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    workload_tools()
    sh("cargo", "build", "--release", "--quiet", cwd=REPO)
    work = tempfile.mkdtemp(prefix="obuilder-export-", dir="/var/tmp")
    reg = Registry(port=5000)
    fss = []
    try:
        _, ctx = serve_workload(work, reg)

        # buildah's image of the workload.
        bfs = LoopFs("ext4", 6144)
        fss.append(bfs)
        common = ["--root", os.path.join(bfs.mnt, "root"), "--runroot", os.path.join(bfs.mnt, "run"), "--storage-driver", "overlay"]
        sh("buildah", *common, "bud", "--quiet", "--layers", "--network", "none", "--isolation", "oci", "--runtime", "runc",
           "--tls-verify=false", "-f", os.path.join(SHARED, "Dockerfile"), "-t", "obench", ctx)

        ours = {}
        for label in [s.strip() for s in a.stores.split(",") if s.strip()]:
            fs_kind, kind = STORES[label]
            fs = LoopFs(fs_kind, 6144)
            fss.append(fs)
            store = ["--store", f"{kind}:{os.path.join(fs.mnt, 'store')}"]
            spec = os.path.join(work, "spec")
            shutil.copy(os.path.join(SHARED, "spec.sexp"), spec)
            sh(OBUILDER, "build", "--fast-sync", "-q", "-t", "bench", "-f", spec, ctx, *store)
            ours[label] = (store, os.path.join(fs.mnt, "store", "state", "images", "layers"))

        res = {}
        n = 0
        for rep in range(a.reps):
            print(f"rep {rep + 1}/{a.reps}", file=sys.stderr)
            for label, (store, memo) in ours.items():
                n += 1
                shutil.rmtree(memo, ignore_errors=True)
                d = os.path.join(work, f"oci-{n}")
                res.setdefault((label, "export cold"), []).append(timed([OBUILDER, "export", "bench", f"oci:{d}", *store])[0])
                shutil.rmtree(d)
                res.setdefault((label, "export again"), []).append(timed([OBUILDER, "export", "bench", f"oci:{d}", *store])[0])
                shutil.rmtree(d)
                shutil.rmtree(memo, ignore_errors=True)
                fresh = Registry()  # an empty registry: nothing to mount or skip
                try:
                    ref = f"{fresh.addr}/ours:latest"
                    res.setdefault((label, "push cold"), []).append(timed([OBUILDER, "push", "bench", ref, *store])[0])
                    dt, out = timed([OBUILDER, "push", "bench", ref, *store])
                    assert "(0 blobs uploaded" in out, out
                    res.setdefault((label, "push unchanged"), []).append(dt)
                finally:
                    fresh.close()
            n += 1
            d = os.path.join(work, f"oci-{n}")
            res.setdefault(("buildah", "export cold"), []).append(timed(["buildah", *common, "push", "--quiet", "obench", f"oci:{d}"])[0])
            shutil.rmtree(d)
            res.setdefault(("buildah", "export again"), []).append(timed(["buildah", *common, "push", "--quiet", "obench", f"oci:{d}"])[0])
            shutil.rmtree(d)
            fresh = Registry()
            try:
                ref = f"docker://{fresh.addr}/buildah:latest"
                res.setdefault(("buildah", "push cold"), []).append(
                    timed(["buildah", *common, "push", "--quiet", "--tls-verify=false", "obench", ref])[0])
                res.setdefault(("buildah", "push unchanged"), []).append(
                    timed(["buildah", *common, "push", "--quiet", "--tls-verify=false", "obench", ref])[0])
            finally:
                fresh.close()
        report(a, res, list(ours))
    finally:
        sh("buildah", "--root", os.path.join(fss[0].mnt, "root"), "--runroot", os.path.join(fss[0].mnt, "run"),
           "--storage-driver", "overlay", "rmi", "--all", "--force", check=False) if fss else None
        for fs in fss:
            fs.close()
        reg.close()
        shutil.rmtree(work, ignore_errors=True)


def report(a, res, labels):
    lines = ["## Export and push of a result (`bench/export_bench.py`)", "",
             f"The shared workload's result (8 steps, Debian minbase base), {a.reps} repetitions, medians "
             "[min–max] in ms of whole processes. buildah: `buildah push` of its own `bud --layers` image of the "
             "same workload (overlay storage), to an OCI directory and to an empty local docker-registry. "
             "Target: ours ≤ 0.5× buildah.", "",
             "| scenario | " + " | ".join(f"obuilder ({l})" for l in labels) + " | buildah | ours / buildah |",
             "|---|" + "---|" * (len(labels) + 2)]
    for sc in ["export cold", "export again", "push cold", "push unchanged"]:
        b = stats(res[("buildah", sc)])
        cells = []
        ratios = []
        for l in labels:
            m = stats(res[(l, sc)])
            cells.append(f"{m[0] * 1000:.0f} [{m[1] * 1000:.0f}–{m[2] * 1000:.0f}]")
            r = m[0] / b[0]
            ratios.append(f"**{r:.2f}**" if r <= 0.5 else f"{r:.2f}")
        lines.append(f"| {sc} | " + " | ".join(cells) + f" | {b[0] * 1000:.0f} [{b[1] * 1000:.0f}–{b[2] * 1000:.0f}] | "
                     + " / ".join(ratios) + " |")
    lines += ["", "Our layers: the base image's own blobs as pulled (gzip), then one uncompressed tar per step (the "
              "registry stores what it is sent; no time goes into compression). A push of an unchanged result "
              "sends no blob (each is asked for with `HEAD` first)."]
    write_section("export", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
