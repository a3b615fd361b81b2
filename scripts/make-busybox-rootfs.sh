#!/usr/bin/env bash
# make-busybox-rootfs.sh DIR — a minimal root filesystem from Debian's busybox-static
# package: /bin/busybox, one symlink per applet, /etc/passwd and /etc/group, /tmp.
set -euo pipefail
dir=${1:?usage: make-busybox-rootfs.sh DIR}
bb=${BUSYBOX:-/bin/busybox}
[ -x "$bb" ] || { echo "no $bb: apt-get install busybox-static" >&2; exit 1; }
rm -rf "$dir"
mkdir -p "$dir"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,root,proc,sys,dev}
chmod 1777 "$dir/tmp"
cp "$bb" "$dir/bin/busybox"
for applet in $("$bb" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$dir/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$dir/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$dir/etc/group"
# Fixed times: the same package gives the same tree, hence the same image digest.
find "$dir" -exec touch -h -d @1700000000 {} +
