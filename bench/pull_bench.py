#!/usr/bin/env python3
"""Base-image pull benchmark: a Debian minbase image from a local registry into a btrfs store.

Usage (as root):  python3 bench/pull_bench.py [--quick] [--reps N]

It makes a Debian bookworm minbase root filesystem with `debootstrap` from the configured
Debian mirror (cached under /var/tmp/obuilder-bench-cache), packs it as one gzip layer of an
OCI image, starts Debian's docker-registry on 127.0.0.1 and pushes the image with skopeo.
Then, alternately, on a btrfs filesystem made fresh for the run:

* obuilder  — `obuilder build` of `((from REF))` into an empty store: resolve, download,
              verify, extract into a new snapshot, commit;
* baseline  — `skopeo copy docker://REF dir:…` followed by `tar -xzf` of its layer.

And a second image sharing the base layer (plus one small layer) built into the same store:
what it costs, and that it downloads only its own layer.
"""

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from report import REPO, LoopFs, Registry, sh, stats, write_section  # noqa: E402

OBUILDER = os.path.join(REPO, "target", "release", "obuilder")
CACHE = "/var/tmp/obuilder-bench-cache"


def mirror():
    for p in ["/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"]:
        if os.path.exists(p):
            for line in open(p):
                line = line.strip()
                if line.startswith("URIs:") and "debian" in line and "security" not in line:
                    return line.split()[1]
                if line.startswith("deb ") and "debian" in line and "security" not in line:
                    return line.split()[1]
    return "http://deb.debian.org/debian"


def minbase():
    root = os.path.join(CACHE, "minbase")
    if not os.path.exists(os.path.join(root, "etc/debian_version")):
        print(f"debootstrap --variant=minbase bookworm from {mirror()} (a few minutes, once)", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(CACHE, exist_ok=True)
        sh("debootstrap", "--variant=minbase", "bookworm", root, mirror())
    # As `apt-get clean` would: the downloaded .debs and package lists are not the image.
    for d in ["var/cache/apt/archives", "var/lib/apt/lists"]:
        p = os.path.join(root, d)
        for e in os.listdir(p):
            f = os.path.join(p, e)
            if os.path.isfile(f):
                os.remove(f)
    return root


def sha_file(p):
    import hashlib
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest(), os.path.getsize(p)


def layout(dir, layer_files, env):
    """An OCI layout of one linux/amd64 image with the given (gzip) layer files."""
    os.makedirs(os.path.join(dir, "blobs/sha256"), exist_ok=True)

    def blob(data):
        import hashlib
        d = "sha256:" + hashlib.sha256(data).hexdigest()
        open(os.path.join(dir, "blobs/sha256", d[7:]), "wb").write(data)
        return d, len(data)

    layers = []
    diff_ids = []
    for lf in layer_files:
        # The config names each layer by the digest of its uncompressed tar.
        h = hashlib.sha256()
        with gzip.open(lf, "rb") as g:
            for chunk in iter(lambda: g.read(1 << 20), b""):
                h.update(chunk)
        diff_ids.append("sha256:" + h.hexdigest())
        d, size = sha_file(lf)
        dst = os.path.join(dir, "blobs/sha256", d[7:])
        if not os.path.exists(dst):
            os.link(lf, dst) if os.stat(lf).st_dev == os.stat(dir).st_dev else shutil.copy(lf, dst)
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": size})
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    cfg = json.dumps({"architecture": arch, "os": "linux", "created": "2023-11-14T22:13:20Z", "config": {"Env": env},
                      "rootfs": {"type": "layers", "diff_ids": diff_ids},
                      "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "layer"} for _ in diff_ids]}).encode()
    cd, cs = blob(cfg)
    man = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
                      "layers": layers}).encode()
    md, ms_ = blob(man)
    json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms_,
               "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}, open(os.path.join(dir, "index.json"), "w"))
    open(os.path.join(dir, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
    return md


def timed(argv, **kw):
    t = time.perf_counter()
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr}")
    return dt, r.stdout


def ms(x):
    return f"{x * 1000:.0f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one repetition: checks the harness runs")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    if a.quick:
        a.reps = 1
    if os.geteuid() != 0:
        sys.exit("run as root")
    sh("cargo", "build", "--release", "--quiet", cwd=REPO)
    root = minbase()
    work = tempfile.mkdtemp(prefix="obuilder-pull-bench-", dir="/var/tmp")
    reg = Registry()
    fs = LoopFs("btrfs", 8192)
    try:
        base_layer = os.path.join(work, "base.tar.gz")
        sh("tar", "--create", "--gzip", "--file", base_layer, "--numeric-owner", "--directory", root, ".")
        app_dir = os.path.join(work, "app")
        os.makedirs(os.path.join(app_dir, "opt/app"))
        open(os.path.join(app_dir, "opt/app/hello"), "w").write("hello\n")
        app_layer = os.path.join(work, "app.tar.gz")
        sh("tar", "--create", "--gzip", "--file", app_layer, "--numeric-owner", "--directory", app_dir, ".")
        env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
        layout(os.path.join(work, "l1"), [base_layer], env)
        layout(os.path.join(work, "l2"), [base_layer, app_layer], env)
        reg.push(os.path.join(work, "l1"), "debian:bookworm")
        reg.push(os.path.join(work, "l2"), "debian-app:v1")
        ref = f"{reg.addr}/debian:bookworm"
        ref2 = f"{reg.addr}/debian-app:v1"
        size_mb = int(sh("du", "-sm", root).stdout.split()[0])
        layer_mb = os.path.getsize(base_layer) / 1e6
        ctx = os.path.join(work, "ctx")
        os.makedirs(ctx)
        spec1, spec2 = os.path.join(work, "s1.spec"), os.path.join(work, "s2.spec")
        open(spec1, "w").write(f"((from {ref}))\n")
        open(spec2, "w").write(f"((from {ref2}))\n")
        ours, base, second = [], [], []
        second_downloads = []
        for i in range(a.reps):
            store = os.path.join(fs.mnt, f"store-{i}")
            t, _ = timed([OBUILDER, "build", "-f", spec1, ctx, "--store", f"btrfs:{store}"])
            ours.append(t)
            t2, out2 = timed([OBUILDER, "build", "-f", spec2, ctx, "--store", f"btrfs:{store}"])
            second.append(t2)
            second_downloads.append(out2.count("Downloading sha256:"))
            shutil.rmtree(store, ignore_errors=True)
            d = os.path.join(fs.mnt, f"skopeo-{i}")
            rootfs = os.path.join(fs.mnt, f"rootfs-{i}")
            os.makedirs(rootfs)
            t0 = time.perf_counter()
            sh("skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}", f"dir:{d}")
            man = json.load(open(os.path.join(d, "manifest.json")))
            for l in man["layers"]:
                sh("tar", "--extract", "--gzip", "--numeric-owner", "--preserve-permissions", "--file",
                   os.path.join(d, l["digest"].split(":")[1]), "--directory", rootfs)
            base.append(time.perf_counter() - t0)
            shutil.rmtree(d, ignore_errors=True)
            shutil.rmtree(rootfs, ignore_errors=True)
        o, b, s2 = stats(ours), stats(base), stats(second)
        lines = [
            "## Base-image pull (`bench/pull_bench.py`)",
            "",
            f"Measured on {time.strftime('%Y-%m-%d')}, {a.reps} repetition(s), alternating. The image: Debian bookworm minbase "
            f"from `debootstrap` ({size_mb} MB unpacked, one {layer_mb:.0f} MB gzip layer), served by Debian's docker-registry on "
            "127.0.0.1, pulled into a btrfs filesystem made fresh for the run.",
            "",
            "| | time (ms) |",
            "|---|---|",
            f"| `obuilder build` of `((from REF))` into an empty store (resolve, download, verify, extract, commit) | **{ms(o[0])}** [{ms(o[1])}–{ms(o[2])}] |",
            f"| baseline: `skopeo copy docker://REF dir:…` + `tar -xzf` of its layer | {ms(b[0])} [{ms(b[1])}–{ms(b[2])}] |",
            f"| ratio obuilder / baseline (target ≤ 1.0) | **{o[0] / b[0]:.2f}** |",
            f"| a second image sharing the base layer, into the same store | {ms(s2[0])} [{ms(s2[1])}–{ms(s2[2])}] |",
            "",
            f"The second image downloaded {max(second_downloads)} layer(s) (its own small one): the shared base layer came from "
            "the blob store.",
        ]
        out = "\n".join(lines) + "\n"
        write_section("pull", out)
        print(out)
    finally:
        fs.close()
        reg.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
