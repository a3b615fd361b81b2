#!/usr/bin/env bash
# deploy-test.sh — the deployment, for real, in a Debian container booted with systemd
# as its init (systemd-nspawn --boot on a debootstrap tree):
#
#   1. packaging/build.sh makes the .deb (and a second one, a newer version);
#   2. the Ansible playbook (roles scheduler and linux_worker) installs and starts both
#      services in the container;
#   3. a job submitted from the host with ocluster-client over loopback runs in the
#      (default) native sandbox, and its log comes back; obuilderfs mounts under the worker
#      unit's hardening;
#   4. the playbook again: zero changes;
#   5. `systemctl stop ocluster-worker` mid-job: the job finishes (the worker drains);
#   6. the playbook with the newer package: it upgrades, the worker registers again and
#      takes jobs;
#   7. teardown.yml: units, binaries and state are gone (a second run changes nothing);
#      the container is thrown away.
#
#   scripts/deploy-test.sh [--profile dev|release] [--no-build] [--bin-dir DIR]
#
# --no-build packs the binaries already built (from DIR if given), as the test that runs
# this script does.
# Needs root, debootstrap, systemd-nspawn (systemd-container), ansible and the Debian
# mirror (the container's tree is made once and cached in $CACHE, default
# /var/tmp/ocluster-deploy-cache). The container shares the host's network: the
# scheduler listens on 127.0.0.1 only. Takes 2–4 minutes once the tree is cached.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
profile=dev
nobuild=()
bindir_arg=
while [ $# -gt 0 ]; do
    case "$1" in
    --profile) profile=$2; shift 2 ;;
    --no-build) nobuild=(--no-build); shift ;;
    --bin-dir) bindir_arg=$2; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "deploy-test.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$profile" in dev) bindir=$root/target/debug ;; release) bindir=$root/target/release ;;
*) echo "deploy-test.sh: --profile is dev or release" >&2; exit 2 ;; esac
[ -n "$bindir_arg" ] && bindir=$bindir_arg && nobuild+=(--bin-dir "$bindir")
cache=${CACHE:-/var/tmp/ocluster-deploy-cache}
say() { printf '\n== %s\n' "$*" >&2; }
leader=
fail() {
    printf 'deploy-test.sh: FAILED: %s\n' "$*" >&2
    if [ -n "$leader" ]; then
        echo "-- the container's journal (ocluster units, last 40 lines):" >&2
        nsenter -t "$leader" -a journalctl --no-pager -u ocluster-scheduler -u ocluster-worker | tail -40 >&2
    fi
    exit 1
}
[ "$(id -u)" = 0 ] || fail "run as root"
for tool in debootstrap systemd-nspawn ansible-playbook nsenter unshare; do
    command -v "$tool" >/dev/null || fail "$tool is missing: apt-get install debootstrap systemd-container ansible util-linux"
done

work=$(mktemp -d /var/tmp/ocluster-deploy-test.XXXXXX)
nspawn_pid=
cleanup() {
    set +e
    if [ -n "$nspawn_pid" ]; then
        kill "$nspawn_pid" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$nspawn_pid" 2>/dev/null
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# --- The container's tree: Debian bookworm with systemd and the package's dependencies,
# remade when this list changes (the list is kept in the tree's .ready).
include=systemd,systemd-sysv,dbus,python3,ca-certificates,iproute2,runc,btrfs-progs,rsync,fuse3,git,busybox-static,adduser,libseccomp2
if [ "$(cat "$cache/rootfs/.ready" 2>/dev/null)" != "$include" ]; then
    say "making the container's tree in $cache (once; a few minutes)"
    mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
    mirror=${mirror:-http://deb.debian.org/debian}
    rm -rf "$cache/rootfs.tmp" && mkdir -p "$cache"
    debootstrap --variant=minbase --include="$include" \
        bookworm "$cache/rootfs.tmp" "$mirror" > "$cache/debootstrap.log" 2>&1 \
        || fail "debootstrap (see $cache/debootstrap.log)"
    echo "$include" > "$cache/rootfs.tmp/.ready"
    rm -rf "$cache/rootfs" && mv "$cache/rootfs.tmp" "$cache/rootfs"
fi

say "building the packages ($profile)"
"$root/packaging/build.sh" --profile "$profile" "${nobuild[@]}" --out "$work/dist" > "$work/build1.log"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
"$root/packaging/build.sh" --profile "$profile" --no-build --bin-dir "$bindir" --version "$version+upgrade1" --out "$work/dist" > "$work/build2.log"
arch=$(dpkg --print-architecture)
deb1=$work/dist/ocluster_${version}_${arch}.deb
deb2=$work/dist/ocluster_${version}+upgrade1_${arch}.deb
[ -f "$deb1" ] && [ -f "$deb2" ] || fail "no packages in $work/dist"

say "booting the container"
# This host's /run is no tmpfs and no systemd manages it: nspawn gets a private tmpfs for
# its own state, no machined registration and no scope unit. The container gets cgroup
# v2, which its systemd needs to delegate; the host's v2 hierarchy has no controllers
# (they are on v1), so no pids limit can be set in it: the worker runs with
# --max-pids=0. nspawn keeps CAP_NET_ADMIN from a container that shares the host's
# network, and filters the keyring and bpf calls; the sandboxes need them (a step's
# loopback, its session keyring, its device filter), so the container gets them back, and
# /dev/fuse for obuilderfs.
mkdir -p /run/systemd/nspawn
SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 unshare -m --propagation private sh -c \
    'mount -t tmpfs tmpfs /run/systemd/nspawn && exec systemd-nspawn --quiet --register=no --keep-unit --ephemeral --capability=CAP_NET_ADMIN "--system-call-filter=add_key keyctl request_key bpf" --bind=/dev/fuse -D "$1" --boot' \
    sh "$cache/rootfs" > "$work/boot.log" 2>&1 < /dev/null &
nspawn_pid=$!
descendant_named() {
    local kids k
    kids=$(pgrep -P "$1" || true)
    for k in $kids; do
        if [ "$(cat /proc/"$k"/comm 2>/dev/null)" = "$2" ]; then echo "$k"; return; fi
        descendant_named "$k" "$2"
    done
}
leader=
for _ in $(seq 300); do
    # The container's init: the descendant of nspawn named systemd.
    leader=$(descendant_named "$nspawn_pid" systemd)
    if [ -n "$leader" ]; then
        state=$(nsenter -t "$leader" -a systemctl is-system-running 2>/dev/null || true)
        case "$state" in running|degraded) break ;; esac
    fi
    kill -0 "$nspawn_pid" 2>/dev/null || fail "the container did not boot: $(tail -20 "$work/boot.log")"
    sleep 0.2
done
[ -n "$leader" ] || fail "no init in the container"
in_ct() { nsenter -t "$leader" -a "$@"; }
# (Read whole, then grep: `journalctl | grep -q` fails under pipefail when grep stops early.)
worker_log_has() {
    in_ct journalctl --no-pager -u ocluster-worker.service > "$work/journal"
    grep -q "$1" "$work/journal"
}
echo "container init: pid $leader, $(in_ct systemctl is-system-running)" >&2

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/secrets"
write_inventory() {
    cat > "$work/inventory.yml" <<INV
all:
  hosts:
    container:
      ansible_connection: community.docker.nsenter
      ansible_nsenter_pid: $leader
      # nsenter enters as root already (the tree has no sudo).
      ansible_become: false
  vars:
    ocluster_deb: $1
    ocluster_secrets_dir: $work/secrets
    ocluster_pools: [linux]
    ocluster_clients: [alice]
    ocluster_listen: tcp:127.0.0.1:$port
    ocluster_public_address: tcp:127.0.0.1:$port
    ocluster_pool: linux
    ocluster_worker_name: ct-worker
    ocluster_worker_capacity: 1
    ocluster_worker_store: rsync:/var/lib/ocluster-worker/store
    ocluster_worker_extra_args: [--rsync-mode=hardlink, --max-pids=0]
  children:
    schedulers:
      hosts:
        container:
    linux_workers:
      hosts:
        container:
INV
}
playbook_file() {
    local book=$1 log=$2
    (cd "$root/deploy/ansible" && ANSIBLE_NOCOLOR=1 ansible-playbook -i "$work/inventory.yml" "$book") \
        > "$log" 2>&1 || fail "ansible-playbook $book (see below)
$(tail -40 "$log")"
    sed -n '/PLAY RECAP/,$p' "$log" >&2
}
playbook() { playbook_file playbook.yml "$1"; }
changed() { sed -n 's/.*changed=\([0-9]*\).*/\1/p' "$1" | head -1; }

# The worker imports nothing itself: give its store the busybox image the jobs use.
seed_store() {
    in_ct sh -c 'set -e
        rm -rf /tmp/bb && mkdir -p /tmp/bb/bin /tmp/bb/etc /tmp/bb/tmp
        cp /bin/busybox /tmp/bb/bin/
        for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox /tmp/bb/bin/$a; done
        echo "root:x:0:0:root:/root:/bin/sh" > /tmp/bb/etc/passwd
        obuilder image import --store rsync:/var/lib/ocluster-worker/store --rsync-mode hardlink busybox /tmp/bb >/dev/null'
}

client() {
    printf '((from busybox) (shell /bin/sh -c) (run (shell "%s")))\n' "$1" > "$work/job.spec"
    timeout 120 "$bindir/ocluster-client" submit-obuilder -c "$work/secrets/submit-alice.cap" \
        --pool linux --local-file "$work/job.spec"
}

say "1st run of the playbook: install and start"
write_inventory "$deb1"
playbook "$work/play1.log"
[ "$(changed "$work/play1.log")" -gt 0 ] || fail "the first run changed nothing"
for f in pool-linux.cap submit-alice.cap admin.cap; do
    [ -s "$work/secrets/$f" ] || fail "the playbook fetched no $f"
done
in_ct systemctl is-active --quiet ocluster-scheduler.service || fail "the scheduler is not active"
seed_store

say "a job from the host, over loopback"
for _ in $(seq 150); do
    worker_log_has "Registered as" && break
    sleep 0.2
done
worker_log_has "Registered as" || fail "the worker did not register"

out=$(client 'echo hello from $(hostname)' 2>&1) || fail "the job failed: $out"
echo "$out" >&2
grep -q "hello from builder" <<<"$out" || fail "no job log: $out"
grep -q "Building on ct-worker" <<<"$out" || fail "not built by the container's worker: $out"

say "FUSE under the worker unit's hardening"
# The unit's hardening settings, as systemd-run properties: obuilderfs (the user
# sandbox's FUSE view) must mount and serve under them. The mount lives in the unit's own
# mount namespace (ProtectSystem= makes one), so it is read from inside.
props=()
while read -r line; do props+=(-p "$line"); done < <(
    sed -n '/^ProtectSystem=/,/^LimitNOFILE=/p' "$root/packaging/systemd/ocluster-worker.service" | grep -v '^#' | grep .)
[ "${#props[@]}" -ge 10 ] || fail "no hardening found in the unit: ${props[*]}"
in_ct sh -c 'rm -rf /tmp/fuse && mkdir -p /tmp/fuse/fallback /tmp/fuse/scoreboard /tmp/fuse/mnt && echo through-fuse > /tmp/fuse/fallback/hello'
out=$(timeout 60 nsenter -t "$leader" -a systemd-run --quiet --wait --pipe "${props[@]}" sh -c '
    obuilderfs --scoreboard /tmp/fuse/scoreboard --fallback /tmp/fuse/fallback /tmp/fuse/mnt &
    fs=$!
    for i in $(seq 50); do grep -q " /tmp/fuse/mnt " /proc/mounts && break; sleep 0.1; done
    timeout 10 cat /tmp/fuse/mnt/hello; grep " /tmp/fuse/mnt " /proc/mounts | cut -d" " -f3
    kill $fs; wait $fs' 2>&1) || fail "obuilderfs under the unit's hardening: $out"
grep -q through-fuse <<<"$out" && grep -q fuse <<<"$out" || fail "obuilderfs served nothing: $out"
echo "obuilderfs mounted and served under $((${#props[@]} / 2)) settings of the unit: $(tr '\n' ' ' <<<"$out")" >&2

say "2nd run of the playbook: no change"
playbook "$work/play2.log"
[ "$(changed "$work/play2.log")" = 0 ] || fail "the second run changed something: $(grep -E '^changed' "$work/play2.log")"

say "systemctl stop ocluster-worker mid-job: the job finishes"
client 'echo begin; sleep 4; echo end' > "$work/job2.log" 2>&1 &
job=$!
for _ in $(seq 300); do grep -q begin "$work/job2.log" && break; sleep 0.1; done
grep -q begin "$work/job2.log" || fail "the job did not start: $(cat "$work/job2.log")"
in_ct systemctl stop ocluster-worker.service
wait "$job" || fail "the job did not survive the stop: $(cat "$work/job2.log")"
grep -q end "$work/job2.log" || fail "the job was cut short: $(cat "$work/job2.log")"
worker_log_has "taking no more jobs" || fail "the worker did not drain"
echo "the job ended: $(tail -1 "$work/job2.log"); the worker drained and stopped" >&2
in_ct systemctl start ocluster-worker.service

say "upgrade: the playbook with a newer package"
registered=$(in_ct journalctl -u ocluster-worker.service | grep -c "Registered as" || true)
write_inventory "$deb2"
playbook "$work/play3.log"
[ "$(in_ct dpkg-query -W -f='${Version}' ocluster)" = "$version+upgrade1" ] || fail "not upgraded"
for _ in $(seq 150); do
    now=$(in_ct journalctl -u ocluster-worker.service | grep -c "Registered as" || true)
    [ "$now" -gt "$registered" ] && break
    sleep 0.2
done
[ "$now" -gt "$registered" ] || fail "the worker did not register again after the upgrade"
out=$(client 'echo after the upgrade' 2>&1) || fail "a job after the upgrade failed: $out"
grep -q "after the upgrade" <<<"$out" || fail "no log after the upgrade: $out"

say "teardown: teardown.yml"
playbook_file teardown.yml "$work/teardown1.log"
for gone in /usr/bin/ocluster-worker /lib/systemd/system/ocluster-worker.service /var/lib/ocluster-scheduler /var/lib/ocluster-worker; do
    in_ct test ! -e "$gone" || fail "$gone is left after the teardown"
done
left=$(in_ct sh -c 'cat /proc/[0-9]*/comm 2>/dev/null' | grep -E '^ocluster-(worker|schedul)' || true)
[ -z "$left" ] || fail "still running after the teardown: $left"
playbook_file teardown.yml "$work/teardown2.log"
[ "$(changed "$work/teardown2.log")" = 0 ] || fail "a second teardown changed something"
say "deploy test passed"
