#!/usr/bin/env bash
# Installs what obuilder and its tests need on a fresh Debian machine. Idempotent: packages
# already present are not fetched again. Run as root.
set -euo pipefail
PKGS=(runc btrfs-progs xfsprogs rsync fuse3 busybox-static skopeo docker-registry sqlite3 util-linux e2fsprogs openssl tar gcc libc6-dev procps capnproto git buildah podman chromium iproute2 libseccomp-dev pkg-config ansible ansible-lint systemd-container debootstrap dpkg-dev fakeroot python3-jinja2 binutils)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
echo "setup: system packages present"
