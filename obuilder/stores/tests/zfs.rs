#![cfg(target_os = "linux")]
//! The ZFS store through the command seam, against `testkit::fakezfs::FakeZfs` (a fake:
//! this machine's kernel has no ZFS module, and Debian's zfs-dkms needs headers for it).
//! Every test name says `fake_zfs`. The fake keeps real files at mount points, so the store
//! conformance suite runs on it whole; the exact command sequences, the failure paths and
//! a crash after every command of each operation are pinned here.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use obuilder_engine::store::Store;
use obuilder_stores::zfs::{ZfsOptions, ZfsStore};
use testkit::fakezfs::FakeZfs;
use testkit::{require, Cap};

struct Pool {
    _dir: tempfile::TempDir,
    zfs: Arc<FakeZfs>,
    root: std::path::PathBuf,
}

fn pool() -> Pool {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tank");
    let zfs = Arc::new(FakeZfs::new("tank", &root, &dir.path().join("fake-zfs")));
    Pool {
        _dir: dir,
        zfs,
        root,
    }
}

fn opts(max_mounted: usize) -> ZfsOptions {
    ZfsOptions {
        max_mounted,
        busy_retries: 2,
        busy_delay: Duration::from_millis(1),
    }
}

impl Pool {
    fn store(&self, max_mounted: usize) -> ZfsStore {
        ZfsStore::with_options("tank", &self.root, self.zfs.clone(), opts(max_mounted))
    }

    /// The commands since the last call, with the pool's mount point written `ROOT`.
    fn take(&self) -> Vec<String> {
        let root = self.root.to_string_lossy().to_string();
        let calls = self
            .zfs
            .calls()
            .into_iter()
            .map(|c| c.replace(&root, "ROOT"))
            .collect();
        self.zfs.clear_calls();
        calls
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[tokio::test]
async fn fake_zfs_store_conformance() {
    // Root for the ownership, set-id bits and device nodes the suite checks.
    require!(Cap::Root);
    let p = pool();
    testkit::conformance::store_conformance(|| Arc::new(p.store(4)) as Arc<dyn Store>).await;
    // Bounded mounts: however many results were used, at most 4 (+ the four top datasets).
    let results = p
        .zfs
        .mounted()
        .into_iter()
        .filter(|d| d.starts_with("tank/result/"))
        .count();
    assert!(results <= 4, "{:?}", p.zfs.mounted());
}

impl Pool {
    /// The commands since the last call, with the process id in copy names written `PID`.
    fn take_pid(&self) -> Vec<String> {
        let pid = format!("/{}-", std::process::id());
        self.take()
            .into_iter()
            .map(|c| c.replace(&pid, "/PID-"))
            .collect()
    }

    /// Runs `zfs ARGS` on the fake directly (what an operator or another tool did).
    async fn run(&self, args: &[&str]) {
        use obuilder_engine::exec::{Cmd, Exec};
        let mut argv = vec!["zfs"];
        argv.extend_from_slice(args);
        self.zfs.output(&Cmd::new(argv)).await.unwrap();
    }

    fn has(&self, name: &str) -> bool {
        self.zfs.names().iter().any(|n| n == name)
    }

    fn under(&self, prefix: &str) -> Vec<String> {
        self.zfs
            .names()
            .into_iter()
            .filter(|n| n.starts_with(prefix))
            .collect()
    }
}

#[tokio::test]
async fn fake_zfs_command_sequences_are_pinned() {
    let p = pool();
    let st = p.store(8);
    st.recover().await.unwrap();
    assert_eq!(
        p.take(),
        s(&[
            "zfs list -H -o name,mountpoint tank",
            "zfs list -H -o name,mounted tank/state",
            "zfs create tank/state",
            "zfs list -H -o name,origin,mounted -r -t filesystem,snapshot tank",
            "zfs create tank/result",
            "zfs create tank/cache",
            "zfs create tank/cache-tmp",
        ])
    );
    // A base build: made in place, mounted only because this store mounts it.
    let a = st.prepare("a", None).await.unwrap();
    assert_eq!(a.dir, p.root.join("result/a"));
    assert_eq!(a.rootfs, p.root.join("result/a/rootfs"));
    std::fs::write(a.dir.join("log"), "log of a").unwrap();
    std::fs::write(a.rootfs.join("f"), "a").unwrap();
    assert_eq!(
        p.take(),
        s(&[
            "zfs create -o canmount=noauto tank/result/a",
            "zfs mount tank/result/a",
        ])
    );
    // Commit is one recursive snapshot.
    assert_eq!(st.commit(&a).await.unwrap(), p.root.join("result/a"));
    assert_eq!(p.take(), s(&["zfs snapshot -r tank/result/a@snap"]));
    // A child: a clone of the parent's snapshot, without the parent's log.
    let b = st.prepare("b", Some("a")).await.unwrap();
    assert_eq!(
        p.take(),
        s(&[
            "zfs list -H -o name -r -d 1 -t filesystem tank/result/a",
            "zfs clone -o canmount=noauto tank/result/a@snap tank/result/b",
            "zfs mount tank/result/b",
        ])
    );
    assert_eq!(read(&b.rootfs.join("f")), "a");
    assert!(
        !b.dir.join("log").exists(),
        "the parent's log is not the child's"
    );
    st.discard(&b).await.unwrap();
    assert_eq!(p.take(), s(&["zfs destroy -r -f tank/result/b"]));
    assert!(!p.has("tank/result/b"));

    // Result lookups: a mounted result costs no command; an unknown one, one `zfs list`.
    assert!(st.result("a").await.unwrap().is_some());
    assert_eq!(st.result("zz").await.unwrap(), None);
    assert_eq!(p.take(), s(&["zfs list -H -o name tank/result/zz@snap"]));
    assert_eq!(st.list().await.unwrap(), ["a"]);
    assert_eq!(
        p.take(),
        s(&["zfs list -H -o name -t snapshot -r -d 2 tank/result"])
    );

    // A cache's first use makes its master (empty, @g0); every copy is a clone.
    let c = st.cache_checkout("opam", 1000, 1000).await.unwrap();
    assert_eq!(
        c.path,
        p.root
            .join(format!("cache-tmp/{}-0-c-opam", std::process::id()))
    );
    assert_eq!(
        p.take_pid(),
        s(&[
            "zfs list -H -o name -t snapshot -d 1 tank/cache/c-opam",
            "zfs create -o canmount=noauto tank/cache/c-opam",
            "zfs snapshot tank/cache/c-opam@g0",
            "zfs clone -o canmount=noauto tank/cache/c-opam@g0 tank/cache-tmp/PID-0-c-opam",
            "zfs mount tank/cache-tmp/PID-0-c-opam",
        ])
    );
    std::fs::write(c.path.join("x"), "1").unwrap();
    // Release: the promotion dance, promote only for a clone of this master.
    st.cache_release(c, true).await.unwrap();
    assert_eq!(
        p.take_pid(),
        s(&[
            "zfs list -H -o name -t snapshot -d 1 tank/cache/c-opam",
            "zfs unmount tank/cache-tmp/PID-0-c-opam",
            "zfs snapshot tank/cache-tmp/PID-0-c-opam@g1",
            "zfs list -H -o origin tank/cache-tmp/PID-0-c-opam",
            "zfs promote tank/cache-tmp/PID-0-c-opam",
            "zfs destroy tank/cache/c-opam",
            "zfs rename tank/cache-tmp/PID-0-c-opam tank/cache/c-opam",
            "zfs destroy -d tank/cache/c-opam@g0",
        ])
    );
    assert_eq!(
        p.under("tank/cache/"),
        ["tank/cache/c-opam", "tank/cache/c-opam@g1"]
    );
    assert!(p.under("tank/cache-tmp/").is_empty());
    // A second use clones the new generation; a discarded copy is destroyed.
    let c = st.cache_checkout("opam", 0, 0).await.unwrap();
    assert_eq!(read(&c.path.join("x")), "1");
    st.cache_release(c, false).await.unwrap();
    assert_eq!(
        p.take_pid(),
        s(&[
            "zfs list -H -o name -t snapshot -d 1 tank/cache/c-opam",
            "zfs clone -o canmount=noauto tank/cache/c-opam@g1 tank/cache-tmp/PID-1-c-opam",
            "zfs mount tank/cache-tmp/PID-1-c-opam",
            "zfs destroy -r -f tank/cache-tmp/PID-1-c-opam",
        ])
    );
    st.cache_delete("opam").await.unwrap();
    assert_eq!(
        p.take(),
        s(&[
            "zfs list -H -o name tank/cache/c-opam",
            "zfs list -H -o name -r -d 1 -t filesystem tank/cache-tmp",
            "zfs destroy -r -f tank/cache/c-opam",
        ])
    );

    // Delete: the snapshot first (a crash leaves a build, which start-up removes).
    st.delete("a").await.unwrap();
    assert_eq!(
        p.take(),
        s(&[
            "zfs destroy -r -R -f tank/result/a@snap",
            "zfs destroy -r -f tank/result/a",
        ])
    );
    assert!(p.under("tank/result/").is_empty());

    // Space from the pool, and deletes waited for with `zpool wait`, not a sleep.
    let df = st.df().await.unwrap();
    assert_eq!((df.total_bytes, df.free_bytes), (10737418240, 4294967296));
    st.complete_deletes().await.unwrap();
    assert_eq!(
        p.take(),
        s(&[
            "zpool list -Hp -o size,free tank",
            "zpool wait -t free tank",
        ])
    );
}

/// A macOS base image as the original's Zfs_clone fetcher leaves it: children `home` and
/// `brew`, snapshotted with their parent.
async fn macos_base(p: &Pool) {
    p.run(&["create", "-o", "canmount=noauto", "tank/result/base"])
        .await;
    p.run(&["mount", "tank/result/base"]).await;
    std::fs::create_dir(p.root.join("result/base/rootfs")).unwrap();
    std::fs::write(p.root.join("result/base/log"), "base log").unwrap();
    std::fs::write(p.root.join("result/base/env"), "[]").unwrap();
    for sub in ["home", "brew"] {
        let mp = format!("mountpoint={}/result/base/rootfs/{sub}", p.root.display());
        let ds = format!("tank/result/base/{sub}");
        p.run(&["create", "-o", "canmount=noauto", "-o", &mp, &ds])
            .await;
        p.run(&["mount", &ds]).await;
        std::fs::write(
            p.root.join(format!("result/base/rootfs/{sub}/in-{sub}")),
            sub,
        )
        .unwrap();
    }
    p.run(&["snapshot", "-r", "tank/result/base@snap"]).await;
    for ds in [
        "tank/result/base/home",
        "tank/result/base/brew",
        "tank/result/base",
    ] {
        p.run(&["unmount", ds]).await;
    }
    p.zfs.clear_calls();
}

#[tokio::test]
async fn fake_zfs_child_datasets_are_cloned_and_mounted_inside_the_tree() {
    let p = pool();
    let st = p.store(8);
    st.recover().await.unwrap();
    macos_base(&p).await;
    p.take();
    let d = st.prepare("step", Some("base")).await.unwrap();
    let root = p.root.display().to_string();
    assert_eq!(
        p.take(),
        s(&[
            "zfs list -H -o name -r -d 1 -t filesystem tank/result/base",
            "zfs clone -o canmount=noauto tank/result/base@snap tank/result/step",
            "zfs clone -o canmount=noauto -o mountpoint=ROOT/result/step/rootfs/brew tank/result/base/brew@snap tank/result/step/brew",
            "zfs clone -o canmount=noauto -o mountpoint=ROOT/result/step/rootfs/home tank/result/base/home@snap tank/result/step/home",
            "zfs mount tank/result/step",
            "zfs mount tank/result/step/brew",
            "zfs mount tank/result/step/home",
        ])
    );
    let _ = root;
    // The user sandbox finds `home` and `brew` in the tree, each its own dataset.
    assert_eq!(read(&d.rootfs.join("home/in-home")), "home");
    assert_eq!(read(&d.rootfs.join("brew/in-brew")), "brew");
    assert!(!d.dir.join("log").exists() && !d.dir.join("env").exists());
    std::fs::write(d.rootfs.join("home/.opam"), "built").unwrap();
    st.commit(&d).await.unwrap();
    assert_eq!(p.take(), s(&["zfs snapshot -r tank/result/step@snap"]));
    let home_snap = p.zfs.snapshot_dir("tank/result/step/home@snap").unwrap();
    assert_eq!(
        read(&home_snap.join(".opam")),
        "built",
        "the child's snapshot has it"
    );
    let top_snap = p.zfs.snapshot_dir("tank/result/step@snap").unwrap();
    assert!(
        !top_snap.join("rootfs/home/.opam").exists(),
        "not the parent's"
    );
    // A read-only view shows the children too (a `.zfs/snapshot` directory would not).
    let v = st.view("step").await.unwrap();
    assert_eq!(read(&v.join("home/.opam")), "built");
    st.release_view(&v).await.unwrap();
    // Delete takes the children; unmounting goes children first.
    st.delete("step").await.unwrap();
    assert!(
        p.under("tank/result/step").is_empty(),
        "{:?}",
        p.zfs.names()
    );
    assert!(p.has("tank/result/base@snap"));
}

#[tokio::test]
async fn fake_zfs_mounted_results_stay_bounded() {
    let p = pool();
    let st = p.store(2);
    st.recover().await.unwrap();
    let mounted = || {
        p.zfs
            .mounted()
            .into_iter()
            .filter(|d| d.starts_with("tank/result/"))
            .collect::<Vec<_>>()
    };
    let mut parent = None;
    for i in 0..6 {
        let id = format!("r{i}");
        let d = st.prepare(&id, parent.as_deref()).await.unwrap();
        std::fs::write(d.rootfs.join(&id), "x").unwrap();
        st.commit(&d).await.unwrap();
        assert!(mounted().len() <= 2, "{:?}", mounted());
        parent = Some(id);
    }
    assert_eq!(mounted(), ["tank/result/r4", "tank/result/r5"]);
    // Using an old result mounts it again, and the least recently used goes.
    let r0 = st.result("r0").await.unwrap().unwrap();
    assert_eq!(read(&r0.join("rootfs/r0")), "x");
    assert_eq!(mounted(), ["tank/result/r0", "tank/result/r5"]);
    // A view is pinned: it stays mounted however many others are used meanwhile.
    let v = st.view("r1").await.unwrap();
    for id in ["r2", "r3", "r4"] {
        st.result(id).await.unwrap().unwrap();
    }
    assert!(mounted().contains(&"tank/result/r1".to_string()));
    assert_eq!(read(&v.join("r1")), "x");
    st.release_view(&v).await.unwrap();
    assert_eq!(mounted().len(), 2, "{:?}", mounted());
    // A busy one (still read) stays mounted and goes on a later turn.
    st.result("r0").await.unwrap();
    st.result("r1").await.unwrap();
    p.zfs.make_busy("tank/result/r0", 1);
    st.result("r2").await.unwrap();
    assert_eq!(
        mounted(),
        ["tank/result/r0", "tank/result/r1", "tank/result/r2"]
    );
    st.result("r3").await.unwrap();
    assert_eq!(mounted(), ["tank/result/r0", "tank/result/r3"]);
    // A restart starts with none mounted.
    let st = p.store(2);
    st.recover().await.unwrap();
    assert!(mounted().is_empty(), "{:?}", mounted());
    assert_eq!(st.list().await.unwrap().len(), 6);
}

#[tokio::test]
async fn fake_zfs_busy_datasets_are_retried_a_bounded_number_of_times_then_named() {
    let p = pool();
    let st = p.store(8);
    st.recover().await.unwrap();
    let d = st.prepare("x", None).await.unwrap();
    p.take();
    p.zfs.make_busy("tank/result/x", 2);
    st.discard(&d).await.unwrap();
    assert_eq!(
        p.take(),
        s(&[
            "zfs destroy -r -f tank/result/x",
            "zfs destroy -r -f tank/result/x",
            "zfs destroy -r -f tank/result/x",
        ]),
        "no fuser, no sleep of seconds"
    );
    let d = st.prepare("x", None).await.unwrap();
    p.take();
    p.zfs.make_busy("tank/result/x", 10);
    let e = st.discard(&d).await.unwrap_err().to_string();
    assert!(
        e.contains(&format!("{}/result/x", p.root.display())) && e.contains("still in use"),
        "{e}"
    );
    assert_eq!(p.take().len(), 3, "1 + busy_retries attempts");
}

#[tokio::test]
async fn fake_zfs_a_copy_that_is_not_a_clone_is_not_promoted() {
    // OBuilder #89: `cannot promote … not a cloned filesystem`.
    let p = pool();
    let st = p.store(8);
    st.recover().await.unwrap();
    let c = st.cache_checkout("dl", 0, 0).await.unwrap();
    std::fs::write(c.path.join("old"), "o").unwrap();
    st.cache_release(c, true).await.unwrap();
    let c = st.cache_checkout("dl", 0, 0).await.unwrap();
    // Something replaced the copy with a dataset that is no clone.
    let ds = format!(
        "tank/cache-tmp/{}",
        c.path.file_name().unwrap().to_str().unwrap()
    );
    p.run(&["destroy", "-r", "-f", &ds]).await;
    p.run(&["create", &ds]).await;
    std::fs::write(c.path.join("new"), "n").unwrap();
    p.take();
    st.cache_release(c, true).await.unwrap();
    let calls = p.take();
    assert!(!calls.iter().any(|c| c.contains("promote")), "{calls:#?}");
    let c = st.cache_checkout("dl", 0, 0).await.unwrap();
    assert!(c.path.join("new").exists() && !c.path.join("old").exists());
    st.cache_release(c, false).await.unwrap();
    assert!(p.under("tank/cache-tmp/").is_empty(), "{:?}", p.zfs.names());
}

#[tokio::test]
async fn fake_zfs_refuses_a_missing_pool_or_one_mounted_elsewhere() {
    let p = pool();
    let e = ZfsStore::new("nope", "/nope", p.zfs.clone())
        .recover()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("zpool create nope"), "{e}");
    let e = ZfsStore::new("tank", "/tank", p.zfs.clone())
        .recover()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("use --store zfs:{}", p.root.display())),
        "{e}"
    );
    assert!(!p.has("tank/state"), "nothing made");
}

/// The `@g*` snapshots of a cache master, and the copies left in `cache-tmp`.
fn cache_state(p: &Pool, esc: &str) -> (Vec<String>, Vec<String>) {
    let master = format!("tank/cache/{esc}@g");
    (p.under(&master), p.under("tank/cache-tmp/"))
}

/// How many commands `op` runs when nothing goes wrong.
fn count(p: &Pool) -> usize {
    p.take().len()
}

#[tokio::test]
async fn fake_zfs_a_crash_after_any_command_of_a_cache_release_is_repaired() {
    let mut k = 0;
    let mut total = None;
    while total.is_none_or(|t| k <= t) {
        let p = pool();
        let st = p.store(8);
        st.recover().await.unwrap();
        let c = st.cache_checkout("dl", 0, 0).await.unwrap();
        std::fs::write(c.path.join("v"), "1").unwrap();
        st.cache_release(c, true).await.unwrap();
        // Two copies out; the first is being published when the machine stops.
        let x = st.cache_checkout("dl", 0, 0).await.unwrap();
        let _y = st.cache_checkout("dl", 0, 0).await.unwrap();
        std::fs::write(x.path.join("v"), "2").unwrap();
        p.take();
        if total.is_none() {
            st.cache_release(x, true).await.unwrap();
            total = Some(count(&p));
            continue;
        }
        p.zfs.crash_after(k);
        let r = st.cache_release(x, true).await;
        assert_eq!(r.is_err(), p.zfs.crashed(), "k={k}: {r:?}");
        p.zfs.restart();
        drop(st);
        let st = p.store(8);
        p.take();
        st.recover()
            .await
            .unwrap_or_else(|e| panic!("k={k}: recovery failed: {e}"));
        let repairs: Vec<String> = p
            .take_pid()
            .into_iter()
            .filter(|c| !c.starts_with("zfs list"))
            .collect();
        // Which repair each crash point needs (the copies out are PID-1 and PID-2).
        let expected: &[&str] = match k {
            5 => &["zfs promote tank/cache/c-dl"],
            6 => &["zfs rename tank/cache-tmp/PID-1-c-dl tank/cache/c-dl"],
            7 => &["zfs destroy -d tank/cache/c-dl@g1"],
            _ => &[],
        };
        for e in expected {
            assert!(repairs.iter().any(|r| r == e), "k={k}: {e} in {repairs:#?}");
        }
        let (gens, copies) = cache_state(&p, "c-dl");
        assert_eq!(gens.len(), 1, "k={k}: one generation: {:?}", p.zfs.names());
        assert!(copies.is_empty(), "k={k}: copies left: {copies:?}");
        let c = st.cache_checkout("dl", 0, 0).await.unwrap();
        let v = read(&c.path.join("v"));
        assert!(v == "1" || v == "2", "k={k}: {v}");
        if k >= total.unwrap() {
            assert_eq!(v, "2", "a finished release is kept");
        }
        // The cache works on.
        std::fs::write(c.path.join("v"), "3").unwrap();
        st.cache_release(c, true).await.unwrap();
        let c = st.cache_checkout("dl", 0, 0).await.unwrap();
        assert_eq!(read(&c.path.join("v")), "3", "k={k}");
        st.cache_release(c, false).await.unwrap();
        k += 1;
    }
    assert_eq!(total, Some(8));
}

#[tokio::test]
async fn fake_zfs_a_crash_after_any_command_of_a_first_cache_checkout_is_repaired() {
    for k in 0..=5 {
        let p = pool();
        let st = p.store(8);
        st.recover().await.unwrap();
        p.zfs.crash_after(k);
        let _ = st.cache_checkout("new", 0, 0).await;
        p.zfs.restart();
        let st = p.store(8);
        st.recover().await.unwrap();
        assert!(cache_state(&p, "c-new").1.is_empty(), "k={k}");
        let c = st.cache_checkout("new", 0, 0).await.unwrap();
        assert_eq!(std::fs::read_dir(&c.path).unwrap().count(), 0, "k={k}");
        st.cache_release(c, true).await.unwrap();
        assert_eq!(
            cache_state(&p, "c-new").0.len(),
            1,
            "k={k}: {:?}",
            p.zfs.names()
        );
    }
}

#[tokio::test]
async fn fake_zfs_a_crash_after_any_command_of_a_build_or_delete_is_repaired() {
    // Every prefix of: prepare (with children), commit, delete.
    let mut total = None;
    let mut k = 0;
    while total.is_none_or(|t| k <= t) {
        let p = pool();
        let st = p.store(8);
        st.recover().await.unwrap();
        macos_base(&p).await;
        p.take();
        let run = async {
            let d = st.prepare("step", Some("base")).await?;
            std::fs::write(d.rootfs.join("home/built"), "yes").unwrap();
            st.commit(&d).await?;
            st.delete("step").await
        };
        if total.is_none() {
            run.await.unwrap();
            total = Some(count(&p));
            continue;
        }
        p.zfs.crash_after(k);
        let _ = run.await;
        p.zfs.restart();
        drop(st);
        let st = p.store(8);
        st.recover().await.unwrap();
        let ids = st.list().await.unwrap();
        // Every dataset left is a whole result: it and its children have their snapshot.
        for ds in p.under("tank/result/") {
            if !ds.contains('@') {
                assert!(p.has(&format!("{ds}@snap")), "k={k}: half result {ds}");
            }
        }
        assert!(
            ids.iter().all(|i| i == "base" || i == "step"),
            "k={k}: {ids:?}"
        );
        if ids.contains(&"step".to_string()) {
            let dir = st.result("step").await.unwrap().unwrap();
            assert_eq!(read(&dir.join("rootfs/home/built")), "yes", "k={k}");
        } else {
            // The same id builds again.
            let d = st.prepare("step", Some("base")).await.unwrap();
            st.commit(&d).await.unwrap();
        }
        k += 1;
    }
    assert_eq!(total, Some(10));
}

#[tokio::test]
async fn fake_zfs_base_images_are_cloned_with_their_children() {
    use obuilder_engine::fetch::Fetcher;
    use obuilder_stores::zfs_base::ZfsBaseImages;
    let p = pool();
    // One result mounted at most: the base step's children must go with it.
    let st = p.store(1);
    st.recover().await.unwrap();
    // A base image as `zfs recv` leaves it: tank/base-image/macos/{home,brew}@snap.
    p.run(&["create", "tank/base-image"]).await;
    p.run(&["create", "tank/base-image/macos"]).await;
    for sub in ["home", "brew"] {
        let ds = format!("tank/base-image/macos/{sub}");
        p.run(&["create", &ds]).await;
        let f = p.root.join(format!("base-image/macos/{sub}/from-base"));
        std::fs::write(&f, sub).unwrap();
    }
    p.run(&["snapshot", "-r", "tank/base-image/macos@snap"])
        .await;
    let fetcher = ZfsBaseImages::new("tank", p.zfs.clone(), Arc::new(testkit::fakes::FakeFetcher));
    let log: obuilder_engine::log::LogSink = Arc::new(|_| {});
    let image = fetcher.resolve("macos", &log).await.unwrap();
    assert_eq!(
        image.source["children"],
        serde_json::json!(["brew", "home"])
    );
    // Anything else goes to the wrapped fetcher.
    let other = fetcher
        .resolve("registry.example/macos:1", &log)
        .await
        .unwrap();
    assert_eq!(other.source, serde_json::Value::Null);
    let none = fetcher.resolve("no-such-base", &log).await.unwrap();
    assert_eq!(none.source, serde_json::Value::Null);

    // The base step: the store's empty build, the children cloned into it by the fetcher.
    p.take();
    let id = image.base_id();
    let d = st.prepare(&id, None).await.unwrap();
    let config = fetcher.fetch(&image, &d.rootfs, &log).await.unwrap();
    assert!(config.env.is_empty(), "a ZFS base image carries no env");
    let calls = p.take();
    assert_eq!(
        calls[2..],
        s(&[
            &format!("zfs clone -o canmount=noauto -o mountpoint=ROOT/result/{id}/rootfs/brew tank/base-image/macos/brew@snap tank/result/{id}/brew"),
            &format!("zfs mount tank/result/{id}/brew"),
            &format!("zfs clone -o canmount=noauto -o mountpoint=ROOT/result/{id}/rootfs/home tank/base-image/macos/home@snap tank/result/{id}/home"),
            &format!("zfs mount tank/result/{id}/home"),
        ]),
        "{calls:#?}"
    );
    assert_eq!(read(&d.rootfs.join("home/from-base")), "home");
    st.commit(&d).await.unwrap();
    // A step on it gets both children, cloned from the base step's snapshots.
    let step = st.prepare("step", Some(&id)).await.unwrap();
    assert_eq!(read(&step.rootfs.join("brew/from-base")), "brew");
    assert_eq!(
        p.zfs.origin("tank/result/step/home").as_deref(),
        Some(format!("tank/result/{id}/home@snap").as_str())
    );
    st.commit(&step).await.unwrap();

    // The base step's children, mounted by the fetcher and not by the store, were found
    // and unmounted with it when the step made room.
    assert!(
        !p.zfs
            .mounted()
            .iter()
            .any(|d| d.starts_with(&format!("tank/result/{id}"))),
        "{:?}",
        p.zfs.mounted()
    );
    // A new snapshot of the base image is a new base (no stale result is reused).
    p.run(&["destroy", "-r", "-R", "tank/base-image/macos@snap"])
        .await;
    p.run(&["snapshot", "-r", "tank/base-image/macos@snap"])
        .await;
    let again = fetcher.resolve("macos", &log).await.unwrap();
    assert_ne!(again.base_id(), id);
}

/// `build --keep-failed` on ZFS: a failed step's datasets are unmounted (children first),
/// renamed with their children, given mount points under the new name and snapshotted; the
/// kept result mounts on demand with its children. A crash after any of those commands
/// leaves either the whole kept result or nothing (start-up removes the unsnapshotted
/// datasets).
#[tokio::test]
async fn fake_zfs_a_failed_step_is_kept_with_its_children() {
    let p = pool();
    let st = p.store(8);
    st.recover().await.unwrap();
    macos_base(&p).await;
    let d = st.prepare("step", Some("base")).await.unwrap();
    std::fs::write(d.rootfs.join("home/half-built"), "yes").unwrap();
    std::fs::write(d.rootfs.join("top"), "top").unwrap();
    // The step's log is still open for followers: the unmount is forced.
    p.zfs.make_busy("tank/result/step", 5);
    p.take();
    let kept = st.commit_as(&d, "step-kept").await.unwrap();
    assert_eq!(
        p.take(),
        s(&[
            "zfs unmount -f tank/result/step/home",
            "zfs unmount -f tank/result/step/brew",
            "zfs unmount -f tank/result/step",
            "zfs rename tank/result/step tank/result/step-kept",
            "zfs list -H -o name -r -d 1 -t filesystem tank/result/step-kept",
            "zfs set mountpoint=ROOT/result/step-kept/rootfs/brew tank/result/step-kept/brew",
            "zfs set mountpoint=ROOT/result/step-kept/rootfs/home tank/result/step-kept/home",
            "zfs snapshot -r tank/result/step-kept@snap",
        ])
    );
    assert_eq!(kept, p.root.join("result/step-kept"));
    assert_eq!(
        st.list().await.unwrap(),
        s(&["base", "step-kept"]),
        "the failed id is free again"
    );
    let dir = st.result("step-kept").await.unwrap().unwrap();
    assert_eq!(read(&dir.join("rootfs/home/half-built")), "yes");
    assert_eq!(read(&dir.join("rootfs/top")), "top");
    assert_eq!(read(&dir.join("rootfs/brew/in-brew")), "brew");
    // A later step goes on from it, and it is deleted like any result.
    let next = st.prepare("next", Some("step-kept")).await.unwrap();
    assert_eq!(read(&next.rootfs.join("home/half-built")), "yes");
    st.discard(&next).await.unwrap();
    st.delete("step-kept").await.unwrap();
    assert!(
        p.under("tank/result/step").is_empty(),
        "{:?}",
        p.zfs.names()
    );

    // A crash after each command.
    for k in 0..8 {
        let p = pool();
        let st = p.store(8);
        st.recover().await.unwrap();
        macos_base(&p).await;
        let d = st.prepare("step", Some("base")).await.unwrap();
        std::fs::write(d.rootfs.join("home/half-built"), "yes").unwrap();
        p.zfs.crash_after(k);
        let _ = st.commit_as(&d, "step-kept").await;
        p.zfs.restart();
        drop(st);
        let st = p.store(8);
        st.recover().await.unwrap();
        for ds in p.under("tank/result/") {
            if !ds.contains('@') {
                assert!(p.has(&format!("{ds}@snap")), "k={k}: half result {ds}");
            }
        }
        let ids = st.list().await.unwrap();
        if ids.contains(&"step-kept".to_string()) {
            let dir = st.result("step-kept").await.unwrap().unwrap();
            assert_eq!(read(&dir.join("rootfs/home/half-built")), "yes", "k={k}");
        } else {
            assert_eq!(ids, s(&["base"]), "k={k}");
        }
    }
}
