#!/usr/bin/env bash
# check-portable.sh — fails when a Linux-only API is used outside a Linux-gated file.
#
# macOS, FreeBSD and Windows builds come later and no toolchain for them exists here, so
# this keeps the code ready for them: every file that calls a Linux-only API must start
# with `#![cfg(target_os = "linux")]` (the module is then declared under the same cfg).
# Comments are not code and are ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
# Linux-only: openat2 and its flags, the new mount API, /proc/self, GNU cp flags,
# pipe2-with-flags, prctl death signals, statfs magic numbers, FICLONE, O_PATH,
# mknodat (absent on macOS), syncfs, path-based xattrs (fd-based ones are portable).
pattern='openat2\(|ResolveFlags|rustix::mount|"/proc/self|--reflink|--no-target-directory|pipe_with\(|PR_SET_PDEATHSIG|::statfs\(|ioctl_ficlone|fsopen\(|fsmount\(|move_mount\(|OFlags::PATH|mknodat\(|syncfs\(|(::|[^a-z_ ])l?setxattr\('
bad=0
while IFS= read -r -d '' f; do
  hits=$(grep -nE "$pattern" "$f" | grep -vE '^[0-9]+:[[:space:]]*//' || true)
  [ -n "$hits" ] || continue
  if ! head -n 3 "$f" | grep -q '^#!\[cfg(target_os = "linux")\]'; then
    echo "$f: Linux-only API outside a Linux-gated file (add #![cfg(target_os = \"linux\")] or move it):"
    echo "$hits" | sed 's/^/    /'
    bad=1
  fi
done < <(find obuilder obuilderfs testing ocluster -name '*.rs' -not -path '*/target/*' -print0 2>/dev/null)
if [ "$bad" -ne 0 ]; then
  exit 1
fi
echo "check-portable: Linux-only APIs are all in Linux-gated files"
