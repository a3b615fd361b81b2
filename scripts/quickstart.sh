#!/usr/bin/env bash
# The quick start: set up a fresh machine, build obuilder, make a busybox base image from
# Debian's busybox-static package, and run a real multi-step build of examples/quickstart.spec
# in the default store (/var/lib/obuilder). Run as root. Run it twice: the second build comes
# entirely from the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --quiet -p obuilder
OBUILDER=./target/release/obuilder
rootfs=$(mktemp -d /var/tmp/obuilder-busybox.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
bash scripts/make-busybox-rootfs.sh "$rootfs"
# The env of Docker Hub's busybox image, so ids match OBuilder's shape of inputs.
$OBUILDER image import busybox "$rootfs" --env PATH=/usr/sbin:/usr/bin:/sbin:/bin
$OBUILDER build -f examples/quickstart.spec examples/
