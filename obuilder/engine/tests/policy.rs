//! The policy layer over an in-memory store and a fake sandbox (no root needed): shared
//! in-flight steps, cancellation only when the last waiter leaves, failures not cached,
//! pins against pruning, crash recovery, stale build dirs, a full store. Every test
//! orders itself by observable state (blocked runs, waiter counts), never by sleeping.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use obuilder_engine::log::{buffer_sink, null_sink};
use obuilder_engine::store::Store;
use obuilder_engine::{BuildError, BuildOptions, Builder, FailureKind};
use obuilder_spec::Spec;
use testkit::fakes::{eventually, FakeFetcher, FakeSandbox, FakeStore};

struct Setup {
    _dir: tempfile::TempDir,
    store: Arc<FakeStore>,
    sandbox: Arc<FakeSandbox>,
    b: Arc<Builder>,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = FakeStore::new(&dir.path().join("store"));
    let sandbox = FakeSandbox::new();
    let b = Builder::new(store.clone(), sandbox.clone(), Arc::new(FakeFetcher))
        .await
        .unwrap();
    Setup {
        _dir: dir,
        store,
        sandbox,
        b: Arc::new(b),
    }
}

fn spec(cmd: &str) -> Spec {
    Spec::parse(&format!("((from img) (run (shell {cmd:?})))")).unwrap()
}

fn opts() -> BuildOptions {
    BuildOptions::new("/tmp", null_sink())
}

fn redact(s: &str) -> String {
    testkit::e2e::redact(s)
}

/// Waits until the step `b` is building has `n` waiters.
async fn waiters(b: &Builder, n: usize) {
    eventually(&format!("{n} waiters"), || {
        b.in_flight().iter().any(|s| s.waiters == n)
    })
    .await
}

fn spawn_build(
    b: &Arc<Builder>,
    s: &Spec,
    o: BuildOptions,
) -> tokio::task::JoinHandle<Result<String, BuildError>> {
    let (b, s) = (b.clone(), s.clone());
    tokio::spawn(async move { b.build(&s, &o).await })
}

#[tokio::test]
async fn identical_steps_in_flight_run_once_and_both_see_the_log() {
    let t = setup().await;
    let s = spec("block then finish");
    let (sink1, log1) = buffer_sink();
    let (sink2, log2) = buffer_sink();
    let t1 = spawn_build(&t.b, &s, BuildOptions::new("/tmp", sink1));
    t.sandbox.wait_blocked(1).await;
    let t2 = spawn_build(&t.b, &s, BuildOptions::new("/tmp", sink2));
    waiters(&t.b, 2).await;
    t.sandbox.release();
    let (r1, r2) = (t1.await.unwrap().unwrap(), t2.await.unwrap().unwrap());
    assert_eq!(r1, r2);
    assert_eq!(t.sandbox.runs(), 1, "the shared step ran once");
    let expected = "(from img)\n---> saved as \"[ID]\"\n/: (run (shell \"block then finish\"))\nran: block then finish\n---> saved as \"[ID]\"\n";
    assert_eq!(redact(&log1.lock().unwrap()), expected);
    let l2 = redact(&log2.lock().unwrap());
    assert!(
        l2.ends_with("ran: block then finish\n---> saved as \"[ID]\"\n"),
        "the second waiter replays and follows the log:\n{l2}"
    );
    // Afterwards it is a cache hit.
    let (sink3, log3) = buffer_sink();
    assert_eq!(
        t.b.build(&s, &BuildOptions::new("/tmp", sink3))
            .await
            .unwrap(),
        r1
    );
    assert!(log3.lock().unwrap().contains("from cache"));
    // The attached build hit the base; the third hit the base and the step.
    let stats = t.b.cache_stats().unwrap();
    assert_eq!((stats.hits, stats.misses), (3, 3));
}

#[tokio::test]
async fn one_of_two_waiters_leaving_does_not_cancel_the_step() {
    let t = setup().await;
    let s = spec("block a");
    let o1 = opts();
    let c1 = o1.cancel.clone();
    let t1 = spawn_build(&t.b, &s, o1);
    t.sandbox.wait_blocked(1).await;
    let t2 = spawn_build(&t.b, &s, opts());
    waiters(&t.b, 2).await;
    c1.cancel();
    assert!(matches!(t1.await.unwrap(), Err(BuildError::Cancelled)));
    waiters(&t.b, 1).await;
    assert_eq!(t.sandbox.cancelled(), 0, "the other waiter keeps it alive");
    t.sandbox.release();
    assert!(t2.await.unwrap().is_ok());
    assert_eq!(t.sandbox.cancelled(), 0);
    assert_eq!(t.sandbox.runs(), 1, "never restarted");
}

#[tokio::test]
async fn the_last_waiter_leaving_cancels_and_records_nothing() {
    let t = setup().await;
    let o = opts();
    let c = o.cancel.clone();
    let task = spawn_build(&t.b, &spec("block b"), o);
    t.sandbox.wait_blocked(1).await;
    c.cancel();
    assert!(matches!(task.await.unwrap(), Err(BuildError::Cancelled)));
    t.b.wait_idle().await;
    assert_eq!(t.sandbox.cancelled(), 1);
    assert_eq!(t.b.count().unwrap(), 1, "only the base is recorded");
    assert_eq!(
        std::fs::read_dir(t.store.root().join("tmp"))
            .unwrap()
            .count(),
        0,
        "the build dir is discarded"
    );
}

#[tokio::test]
async fn both_waiters_leaving_cancels_the_step() {
    let t = setup().await;
    let s = spec("block d");
    let (o1, o2) = (opts(), opts());
    let (c1, c2) = (o1.cancel.clone(), o2.cancel.clone());
    let t1 = spawn_build(&t.b, &s, o1);
    t.sandbox.wait_blocked(1).await;
    let t2 = spawn_build(&t.b, &s, o2);
    waiters(&t.b, 2).await;
    c1.cancel();
    assert!(matches!(t1.await.unwrap(), Err(BuildError::Cancelled)));
    waiters(&t.b, 1).await;
    assert_eq!(t.sandbox.cancelled(), 0, "one waiter is left");
    c2.cancel();
    assert!(matches!(t2.await.unwrap(), Err(BuildError::Cancelled)));
    t.b.wait_idle().await;
    assert_eq!(t.sandbox.cancelled(), 1, "the last one leaving cancels");
    assert_eq!(t.b.count().unwrap(), 1, "only the base is recorded");
}

#[tokio::test]
async fn a_build_arriving_while_its_step_is_cancelling_waits_then_starts_afresh() {
    let t = setup().await;
    let s = spec("block c");
    let o1 = opts();
    let c1 = o1.cancel.clone();
    let t1 = spawn_build(&t.b, &s, o1);
    t.sandbox.wait_blocked(1).await;
    // The only waiter leaves: the step is being cancelled...
    c1.cancel();
    // ...and a new request for the same step arrives at once.
    let (sink2, log2) = buffer_sink();
    let t2 = spawn_build(&t.b, &s, BuildOptions::new("/tmp", sink2));
    assert!(matches!(t1.await.unwrap(), Err(BuildError::Cancelled)));
    eventually("the step restarted", || {
        t.sandbox.runs() == 2 && t.sandbox.cancelled() == 1
    })
    .await;
    t.sandbox.wait_blocked(1).await;
    t.sandbox.release();
    let id = t2
        .await
        .unwrap()
        .expect("the new build runs the step afresh");
    assert_eq!(t.sandbox.runs(), 2, "cancelled once, then run again");
    let log = redact(&log2.lock().unwrap());
    assert!(
        log.ends_with("ran: block c\n---> saved as \"[ID]\"\n"),
        "{log}"
    );
    assert!(t.b.store().result(&id).await.unwrap().is_some());
}

#[tokio::test]
async fn failures_are_named_typed_and_not_cached() {
    let t = setup().await;
    let (sink, log) = buffer_sink();
    let s =
        Spec::parse("((from img) (env A b) (run (shell ok)) (run (shell \"fail now\")))").unwrap();
    let e =
        t.b.build(&s, &BuildOptions::new("/tmp", sink))
            .await
            .unwrap_err();
    // What a worker reports, without parsing text.
    assert_eq!(e.kind(), FailureKind::Exited { status: 1 });
    assert_eq!(e.exit_status(), Some(1));
    let step = e.step().unwrap();
    assert_eq!((step.index, step.total), (3, 3));
    assert_eq!(step.heading, "/: (run (shell \"fail now\"))");
    assert_eq!(e.to_string(), "`fail now` exited with status 1");
    assert!(
        std::error::Error::source(&e).is_some(),
        "the cause is chained"
    );
    assert!(
        log.lock().unwrap().contains("ran: fail now"),
        "its log is shown"
    );
    t.b.build(&s, &opts()).await.unwrap_err();
    assert_eq!(
        t.sandbox.runs(),
        3,
        "ok once, then fail twice: never cached"
    );
    // Invalid specs and missing secrets are spec failures, before anything runs.
    let e =
        t.b.build(
            &Spec::parse("((from img) (run (secrets (tok (target /t))) (shell x)))").unwrap(),
            &opts(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), FailureKind::Spec);
    assert!(e.step().is_none());
    assert!(e.to_string().contains("needs secret(s) \"tok\""), "{e}");
}

#[tokio::test]
async fn restart_reconciles_the_database_with_the_store() {
    let t = setup().await;
    let id = t.b.build(&spec("ok"), &opts()).await.unwrap();
    let Setup { _dir, store, b, .. } = t;
    drop(b);
    // Results the database never heard of (a crash between commit and insert), and a
    // result that vanished.
    store.add_result("orphan");
    store.lose_result(&id);
    // A crash leaves its process's open marker behind (the kernel drops its locks).
    std::fs::write(store.root().join("state/open/999999999"), "").unwrap();
    let b2 = Builder::new(store.clone(), FakeSandbox::new(), Arc::new(FakeFetcher))
        .await
        .unwrap();
    assert!(b2.info("orphan").unwrap().is_some(), "adopted");
    assert!(b2.info(&id).unwrap().is_none(), "dropped");
    assert!(!store.root().join("state/open/999999999").exists());
}

#[tokio::test]
async fn prune_never_removes_what_a_running_build_uses() {
    let t = setup().await;
    let s = Spec::parse("((from img) (run (shell \"one\")) (run (shell \"block two\")))").unwrap();
    let task = spawn_build(&t.b, &s, opts());
    t.sandbox.wait_blocked(1).await;
    // `one` is a leaf in the db, but the running build stands on it.
    let removed = t.b.prune(None, 100, &null_sink()).await.unwrap();
    assert_eq!(removed, 0);
    t.sandbox.release();
    task.await.unwrap().unwrap();
    let removed = t.b.prune(None, 100, &null_sink()).await.unwrap();
    assert_eq!(removed, 3, "after the build everything goes, leaves first");
    assert_eq!(t.b.count().unwrap(), 0);
}

/// A builder that died mid-step left its build dir: under the step's lock it is stale by
/// definition, so the next builder removes it and builds.
#[tokio::test]
async fn a_stale_build_dir_is_removed_under_the_step_lock() {
    let t = setup().await;
    let s = spec("make it");
    let (sink, log) = buffer_sink();
    // Find the step's id by building once, then forget the result and leave a stale dir.
    let id = t.b.build(&s, &opts()).await.unwrap();
    t.b.delete(&id, &null_sink()).await.unwrap();
    t.store.leave_stale(&id);
    let again =
        t.b.build(&s, &BuildOptions::new("/tmp", sink))
            .await
            .unwrap();
    assert_eq!(again, id);
    assert!(log.lock().unwrap().contains("ran: make it"), "built afresh");
}

/// A store with no room left runs no step, and a step that leaves it full is not saved
/// (what it wrote may be cut short), with an error naming the store and what is free.
#[tokio::test]
async fn a_full_store_runs_nothing_and_saves_nothing() {
    let t = setup().await;
    t.b.build(&spec("base only"), &opts()).await.unwrap();
    t.store.free_bytes.store(1000, Ordering::SeqCst);
    let e = t.b.build(&spec("other"), &opts()).await.unwrap_err();
    assert_eq!(e.kind(), FailureKind::DiskFull);
    let msg = e.to_string();
    assert!(
        msg.contains("fake:") && msg.contains("1000 B left"),
        "names the store and the free space: {msg}"
    );
    assert_eq!(t.sandbox.runs(), 1, "the step never ran");
    assert_eq!(
        std::fs::read_dir(t.store.root().join("tmp"))
            .unwrap()
            .count(),
        0
    );
}

/// The database is written without waiting for the disk, so a crash of the machine can
/// damage it: the next process with the store to itself (it finds the dead marker) sets
/// it aside and rebuilds it from the results on disk, parents included.
#[tokio::test]
async fn a_damaged_database_is_rebuilt_from_the_store_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let store = FakeStore::new(&dir.path().join("store"));
    let b = Builder::new(store.clone(), FakeSandbox::new(), Arc::new(FakeFetcher))
        .await
        .unwrap();
    drop(b);
    let (base, child) = ("b".repeat(64), "c".repeat(64));
    store.add_result(&base);
    store.add_result(&child);
    std::fs::write(
        store.root().join("result").join(&child).join("parent"),
        &base,
    )
    .unwrap();
    let db = store.root().join("state/db/db.sqlite");
    std::fs::write(
        &db,
        b"this is no longer a database, a power cut saw to that",
    )
    .unwrap();
    std::fs::write(store.root().join("state/open/999999999"), "").unwrap();
    let b = Builder::new(store.clone(), FakeSandbox::new(), Arc::new(FakeFetcher))
        .await
        .unwrap();
    assert_eq!(b.count().unwrap(), 2);
    let info = b.info(&child).unwrap().unwrap();
    assert_eq!(info.parent.as_deref(), Some(base.as_str()));
    assert_eq!(b.info(&base).unwrap().unwrap().children, 1);
    assert!(
        store.root().join("state/db/db.sqlite.corrupt-0").exists(),
        "kept aside"
    );
    // The parent is no leaf: pruning takes the child first.
    let n = b.prune(None, 1, &null_sink()).await.unwrap();
    assert_eq!(n, 1);
    assert!(b.info(&child).unwrap().is_none());
}

/// A database is opened at its first use when no process died with it: one found
/// damaged then (the header intact, the tables not) fails that use with a clear error,
/// and the next process to have the store to itself rebuilds it from the results.
#[tokio::test]
async fn a_database_found_damaged_at_first_use_is_rebuilt_by_the_next_process() {
    let t = setup().await;
    let first = t.b.build(&spec("ok"), &opts()).await.unwrap();
    let Setup { _dir, store, b, .. } = t;
    drop(b);
    let db = store.root().join("state/db/db.sqlite");
    let mut bytes = std::fs::read(&db).unwrap();
    for b in bytes.iter_mut().skip(100) {
        *b = 0x5a;
    }
    std::fs::write(&db, &bytes).unwrap();
    let b = Builder::new(store.clone(), FakeSandbox::new(), Arc::new(FakeFetcher))
        .await
        .unwrap();
    let e = b.build(&spec("another"), &opts()).await.unwrap_err();
    assert!(e.to_string().contains("database"), "{e}");
    assert!(store.root().join("state/db/damaged").exists());
    drop(b);
    let b = Builder::new(store.clone(), FakeSandbox::new(), Arc::new(FakeFetcher))
        .await
        .unwrap();
    assert!(b.info(&first).unwrap().is_some(), "rebuilt from the store");
    assert!(!store.root().join("state/db/damaged").exists());
    b.build(&spec("another"), &opts()).await.unwrap();
}

/// What a sandbox prepares for a step (`warm`) is started before the step's run, even
/// for a builder's first step to miss the cache, whatever order threads run in: a sandbox
/// that takes 50 ms to start its work still has it started when the run begins. (Warmed
/// from another thread, that first step's run began first, and the native sandbox's
/// network namespace made ahead went unused.)
#[tokio::test]
async fn a_step_is_warmed_before_it_runs_even_the_first() {
    let t = setup().await;
    // The base is in the store already, as when the builder is a new process: the
    // builder's first miss is the run step.
    t.b.build(&Spec::parse("((from img))").unwrap(), &opts())
        .await
        .unwrap();
    let Setup {
        _dir,
        store,
        sandbox,
        b,
    } = t;
    drop(b);
    let b = Builder::new(store, sandbox.clone(), Arc::new(FakeFetcher))
        .await
        .unwrap();
    sandbox.warms.store(0, Ordering::SeqCst);
    sandbox.warm_ms.store(50, Ordering::SeqCst);
    b.build(&spec("true"), &opts()).await.unwrap();
    assert_eq!(sandbox.runs(), 1);
    assert_eq!(
        sandbox.unwarmed_runs.load(Ordering::SeqCst),
        0,
        "the step ran before its sandbox was warmed"
    );
    assert_eq!(sandbox.warms.load(Ordering::SeqCst), 1);
}
