#!/usr/bin/env bash
# Builds, from a clean checkout, the Debian package (obuilder, obuilderfs and the four
# ocluster programs, with systemd units, man pages and shell completions) and the macOS
# tarball (the same layout for /opt/ocluster, with bin/ left to be filled on a Mac: no
# macOS toolchain exists here).
#
#   packaging/build.sh [--profile release|dev] [--no-build] [--bin-dir DIR] [--version V]
#                      [--out DIR]
#
# Writes OUT/ocluster_V_ARCH.deb and OUT/ocluster-V-macos.tar.gz (OUT: target/dist).
# --profile dev packs the debug binaries the tests build (CI uses it to check the
# packaging quickly); releases use the default, release. --no-build packs the binaries
# already built (the tests, which run inside cargo, use it), from DIR if given.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
profile=release
build=yes
bindir=
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
out=$root/target/dist
while [ $# -gt 0 ]; do
    case "$1" in
    --profile) profile=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --no-build) build=no; shift ;;
    --bin-dir) bindir=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$profile" in
release) target=$root/target/release ;;
dev) target=$root/target/debug ;;
*) echo "build.sh: --profile is release or dev, not $profile" >&2; exit 2 ;;
esac
[ -n "$bindir" ] && target=$bindir
for tool in dpkg-deb dpkg-shlibdeps fakeroot objcopy; do
    command -v "$tool" >/dev/null || {
        echo "build.sh: $tool is missing: apt-get install dpkg-dev fakeroot binutils" >&2
        exit 2
    }
done
# Debian's python3 has jinja2 from python3-jinja2; another python3 on PATH may not.
py=
for p in /usr/bin/python3 python3; do
    if "$p" -c 'import jinja2' 2>/dev/null; then py=$p; break; fi
done
[ -n "$py" ] || { echo "build.sh: no python3 with jinja2: apt-get install python3-jinja2" >&2; exit 2; }

bins=(obuilder obuilderfs ocluster-scheduler ocluster-worker ocluster-admin ocluster-client)
if [ "$build" = yes ]; then
    echo "build.sh: building the programs ($profile)" >&2
    (cd "$root" && cargo build --profile "$profile" --bins -q)
fi
for b in "${bins[@]}"; do
    [ -x "$target/$b" ] || { echo "build.sh: no $target/$b: build it (cargo build --profile $profile --bins) or drop --no-build" >&2; exit 2; }
done
arch=$(dpkg --print-architecture)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

# Man pages and completions, from each program's own clap definition.
for b in "${bins[@]}"; do
    CLI_DOCS_OUT=$work/docs "$target/$b"
done

# --- The Debian package ---
deb=$work/deb
install -d "$deb/usr/bin" "$deb/lib/systemd/system" "$deb/etc/default" \
    "$deb/usr/share/man/man1" "$deb/usr/share/bash-completion/completions" \
    "$deb/usr/share/zsh/vendor-completions" "$deb/usr/share/fish/vendor_completions.d" \
    "$deb/usr/share/doc/ocluster" "$deb/DEBIAN"
for b in "${bins[@]}"; do
    install -m 755 "$target/$b" "$deb/usr/bin/$b"
    objcopy --strip-debug "$deb/usr/bin/$b"
    install -m 644 "$work/docs/completions/$b.bash" "$deb/usr/share/bash-completion/completions/$b"
    install -m 644 "$work/docs/completions/_$b" "$deb/usr/share/zsh/vendor-completions/_$b"
    install -m 644 "$work/docs/completions/$b.fish" "$deb/usr/share/fish/vendor_completions.d/$b.fish"
done
for page in "$work"/docs/man/man1/*.1; do
    gzip -9n < "$page" > "$deb/usr/share/man/man1/$(basename "$page").gz"
done
install -m 644 "$root"/packaging/systemd/*.service "$deb/lib/systemd/system/"
install -m 644 "$root"/packaging/default/* "$deb/etc/default/"
install -m 644 "$root/packaging/debian/copyright" "$deb/usr/share/doc/ocluster/copyright"
install -m 644 "$root/docs/deploy.md" "$root/README.md" "$deb/usr/share/doc/ocluster/"
install -m 755 "$root"/packaging/debian/{postinst,prerm,postrm} "$deb/DEBIAN/"
printf '/etc/default/ocluster-scheduler\n/etc/default/ocluster-worker\n' > "$deb/DEBIAN/conffiles"
# The shared libraries the programs link (libc, libgcc, libseccomp), as Debian computes them.
mkdir -p "$work/shlibs/debian"
printf 'Source: ocluster\n\nPackage: ocluster\nArchitecture: any\n' > "$work/shlibs/debian/control"
shlibs=$(cd "$work/shlibs" && dpkg-shlibdeps -O "$deb"/usr/bin/* 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
size=$(du -sk --exclude=DEBIAN "$deb" | cut -f1)
cat > "$deb/DEBIAN/control" <<CONTROL
Package: ocluster
Version: $version
Architecture: $arch
Maintainer: ocluster maintainers <ocluster@localhost>
Installed-Size: $size
Depends: $shlibs, adduser, btrfs-progs, rsync, fuse3, git, busybox-static | busybox
Recommends: runc, xfsprogs
Suggests: buildah, skopeo
Section: devel
Priority: optional
Homepage: https://github.com/ocurrent/ocluster
Description: build farm: OBuilder builds scheduled by OCluster
 obuilder runs OBuilder build specs in sandboxes on copy-on-write snapshots,
 caching each step. ocluster-scheduler, ocluster-worker, ocluster-admin and
 ocluster-client speak OCluster's Cap'n Proto protocol, so OCaml OCluster
 clients, workers and OCurrent pipelines work with them. obuilderfs gives each
 build user its own view of a fixed path. systemd units for the scheduler and
 the worker are included but not enabled.
CONTROL
debfile=$out/ocluster_${version}_${arch}.deb
# xz for releases; the debug binaries of --profile dev are big and only for tests.
compress=(-Zxz)
[ "$profile" = dev ] && compress=(-Zgzip -z1)
fakeroot dpkg-deb --build "${compress[@]}" "$deb" "$debfile" >/dev/null
echo "$debfile"

# --- The macOS tarball ---
mac=$work/mac/ocluster-$version-macos
install -d "$mac/bin" "$mac/share/man/man1" "$mac/share/completions" "$mac/launchd"
install -m 644 "$work"/docs/man/man1/*.1 "$mac/share/man/man1/"
install -m 644 "$work"/docs/completions/* "$mac/share/completions/"
"$py" - "$root/deploy/ansible/roles/macos_worker/templates/com.tarides.ocluster.worker.plist.j2" \
    "$mac/launchd/com.tarides.ocluster.worker.plist" <<'PY'
import sys, jinja2
template = jinja2.Template(open(sys.argv[1]).read(), keep_trailing_newline=True)
open(sys.argv[2], "w").write(template.render(
    ocluster_prefix="/opt/ocluster", ocluster_worker_name="REPLACE-WITH-THE-WORKER-NAME",
    ocluster_worker_capacity=1, ocluster_worker_store="rsync:/Volumes/rsync",
    ocluster_user_pool_first=1000, ocluster_user_pool_last=1000, ocluster_user_group=1000,
    ocluster_home_path="/Users/mac1000", ocluster_brew_path="/opt/homebrew",
    ocluster_state_dir="/var/lib/ocluster-worker",
    ocluster_worker_extra_args=["--rsync-mode=hardlink_unsafe"],
    ocluster_log="/var/log/ocluster-worker.log"))
PY
binlist=$(IFS=,; echo "${bins[*]}")
cat > "$mac/README.macos.md" <<README
# ocluster $version for macOS

No macOS toolchain exists where this tarball was made, so \`bin/\` is empty. On a Mac
with Rust, from the same checkout:

    cargo build --release --bins
    cp target/release/{$binlist} bin/

Install it to /opt/ocluster (not /usr/local: on Intel Macs that is the Homebrew
prefix, which obuilderfs redirects per build user) with the Ansible role
\`macos_worker\`, or by hand:

    sudo mkdir -p /opt/ocluster && sudo cp -R bin share launchd /opt/ocluster/
    # edit the worker name (and store) in the plist, then:
    sudo cp launchd/com.tarides.ocluster.worker.plist /Library/LaunchDaemons/
    sudo install -m 600 pool-macos-arm64.cap /var/lib/ocluster-worker/pool.cap
    sudo launchctl bootstrap system /Library/LaunchDaemons/com.tarides.ocluster.worker.plist

macFUSE must be installed and approved first. See docs/deploy.md in the package.
README
tarball=$out/ocluster-$version-macos.tar.gz
tar -C "$work/mac" --owner=0 --group=0 --sort=name -czf "$tarball" "ocluster-$version-macos"
echo "$tarball"
