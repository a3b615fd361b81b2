//! The builder's policy layer over a real (rsync copy) store and a fake sandbox: shared
//! in-flight steps, cancellation only when the last waiter leaves, failures not cached.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use obuilder_engine::exec::RealExec;
use obuilder_engine::log::buffer_sink;
use obuilder_engine::{BuildError, BuildOptions, Builder};
use obuilder_spec::Spec;
use obuilder_stores::rsync::{RsyncMode, RsyncStore};
use testkit::fake_fetcher::FakeFetcher;
use testkit::fake_sandbox::FakeSandbox;
use testkit::{require, Cap};

async fn setup() -> (tempfile::TempDir, Arc<FakeSandbox>, Arc<Builder>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RsyncStore::new(
        dir.path().join("store"),
        RsyncMode::Copy,
        RealExec::shared(),
    ));
    let sandbox = FakeSandbox::new();
    let b = Builder::new(store, sandbox.clone(), Arc::new(FakeFetcher))
        .await
        .unwrap();
    (dir, sandbox, Arc::new(b))
}

fn spec(cmd: &str) -> Spec {
    Spec::parse(&format!(
        "((from img) (shell /bin/sh -c) (run (shell {cmd:?})))"
    ))
    .unwrap()
}

fn redact(s: &str) -> String {
    let re: Vec<&str> = s.split('"').collect();
    re.iter()
        .enumerate()
        .map(|(i, p)| {
            if i % 2 == 1 && p.len() == 64 {
                "[ID]"
            } else {
                p
            }
        })
        .collect::<Vec<_>>()
        .join("\"")
}

#[tokio::test]
async fn identical_steps_in_flight_run_once_and_both_see_the_log() {
    require!(Cap::Tool("rsync"));
    let (_d, sandbox, b) = setup().await;
    let s = spec("block then finish");
    let (sink1, log1) = buffer_sink();
    let (sink2, log2) = buffer_sink();
    let (b1, b2, s1, s2) = (b.clone(), b.clone(), s.clone(), s.clone());
    let started = sandbox.started.notified();
    let t1 = tokio::spawn(async move { b1.build(&s1, &BuildOptions::new("/tmp", sink1)).await });
    started.await;
    let t2 = tokio::spawn(async move { b2.build(&s2, &BuildOptions::new("/tmp", sink2)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    sandbox.release.notify_waiters();
    let (r1, r2) = (t1.await.unwrap().unwrap(), t2.await.unwrap().unwrap());
    assert_eq!(r1, r2);
    assert_eq!(
        sandbox.runs.load(Ordering::SeqCst),
        1,
        "the shared step ran once"
    );
    let expected = "(from img)\n---> saved as \"[ID]\"\n/: (shell /bin/sh -c)\n/: (run (shell \"block then finish\"))\nran: block then finish\n---> saved as \"[ID]\"\n";
    assert_eq!(redact(&log1.lock().unwrap()), expected);
    let l2 = redact(&log2.lock().unwrap());
    assert!(
        l2.ends_with("ran: block then finish\n---> saved as \"[ID]\"\n"),
        "the second waiter replays and follows the log:\n{l2}"
    );
    // Afterwards it is a cache hit.
    let (sink3, log3) = buffer_sink();
    assert_eq!(
        b.build(&s, &BuildOptions::new("/tmp", sink3))
            .await
            .unwrap(),
        r1
    );
    assert!(log3.lock().unwrap().contains("from cache"));
    // The attached build hit the base; the third hit the base and the step.
    assert_eq!(b.stats.hits.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn one_of_two_waiters_leaving_does_not_cancel_the_step() {
    require!(Cap::Tool("rsync"));
    let (_d, sandbox, b) = setup().await;
    let s = spec("block a");
    let o1 = BuildOptions::new("/tmp", buffer_sink().0);
    let o2 = BuildOptions::new("/tmp", buffer_sink().0);
    let c1 = o1.cancel.clone();
    let (b1, b2, s1, s2) = (b.clone(), b.clone(), s.clone(), s.clone());
    let started = sandbox.started.notified();
    let t1 = tokio::spawn(async move { b1.build(&s1, &o1).await });
    started.await;
    let t2 = tokio::spawn(async move { b2.build(&s2, &o2).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    c1.cancel();
    assert_eq!(t1.await.unwrap(), Err(BuildError::Cancelled));
    assert_eq!(
        sandbox.cancelled.load(Ordering::SeqCst),
        0,
        "the other waiter keeps it alive"
    );
    sandbox.release.notify_waiters();
    assert!(t2.await.unwrap().is_ok());
}

#[tokio::test]
async fn the_last_waiter_leaving_cancels_and_records_nothing() {
    require!(Cap::Tool("rsync"));
    let (d, sandbox, b) = setup().await;
    let s = spec("block b");
    let o = BuildOptions::new("/tmp", buffer_sink().0);
    let c = o.cancel.clone();
    let b1 = b.clone();
    let started = sandbox.started.notified();
    let t = tokio::spawn(async move { b1.build(&s, &o).await });
    started.await;
    c.cancel();
    assert_eq!(t.await.unwrap(), Err(BuildError::Cancelled));
    b.wait_idle().await;
    assert_eq!(sandbox.cancelled.load(Ordering::SeqCst), 1);
    assert_eq!(b.db().count().unwrap(), 1, "only the base is recorded");
    assert_eq!(
        std::fs::read_dir(d.path().join("store/result-tmp"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn failures_are_not_cached_and_restart_recovers_db_agreement() {
    require!(Cap::Tool("rsync"));
    let (d, sandbox, b) = setup().await;
    let (sink, log) = buffer_sink();
    let e = b
        .build(&spec("fail now"), &BuildOptions::new("/tmp", sink))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("`fail now` failed with exit status 1"),
        "{e}"
    );
    assert!(
        log.lock().unwrap().contains("ran: fail now"),
        "the failed step's log is shown"
    );
    b.build(
        &spec("fail now"),
        &BuildOptions::new("/tmp", buffer_sink().0),
    )
    .await
    .unwrap_err();
    assert_eq!(
        sandbox.runs.load(Ordering::SeqCst),
        2,
        "a failure is never cached"
    );
    // A result on disk the database never heard of (crash between commit and insert) is
    // adopted at the next start; a row whose result vanished is dropped.
    let id = b
        .build(&spec("ok"), &BuildOptions::new("/tmp", buffer_sink().0))
        .await
        .unwrap();
    b.db().delete(&id).unwrap();
    drop(b);
    // A crash leaves its process's open marker behind (and the kernel drops its locks).
    std::fs::write(d.path().join("store/state/open/999999999"), "").unwrap();
    let store = Arc::new(RsyncStore::new(
        d.path().join("store"),
        RsyncMode::Copy,
        RealExec::shared(),
    ));
    let b2 = Builder::new(store, FakeSandbox::new(), Arc::new(FakeFetcher))
        .await
        .unwrap();
    assert!(b2.db().get(&id).unwrap().is_some());
}

#[tokio::test]
async fn prune_never_removes_what_a_running_build_uses() {
    require!(Cap::Tool("rsync"));
    let (_d, sandbox, b) = setup().await;
    let s = Spec::parse(
        "((from img) (shell /bin/sh -c) (run (shell \"one\")) (run (shell \"block two\")))",
    )
    .unwrap();
    let b1 = b.clone();
    let started = sandbox.started.notified();
    let t = tokio::spawn(async move {
        b1.build(&s, &BuildOptions::new("/tmp", buffer_sink().0))
            .await
    });
    started.await;
    // `one` is a leaf in the db, but the running build stands on it.
    let removed = b.prune("9999-12-31", 100, &buffer_sink().0).await.unwrap();
    assert_eq!(removed, 0);
    sandbox.release.notify_waiters();
    t.await.unwrap().unwrap();
    let removed = b.prune("9999-12-31", 100, &buffer_sink().0).await.unwrap();
    assert_eq!(removed, 3, "after the build everything goes, leaves first");
}

#[tokio::test]
async fn a_build_arriving_while_its_step_is_cancelling_waits_then_starts_afresh() {
    require!(Cap::Tool("rsync"));
    let (_d, sandbox, b) = setup().await;
    let s = spec("block c");
    let o1 = BuildOptions::new("/tmp", buffer_sink().0);
    let c1 = o1.cancel.clone();
    let (b1, s1) = (b.clone(), s.clone());
    let started = sandbox.started.notified();
    let t1 = tokio::spawn(async move { b1.build(&s1, &o1).await });
    started.await;
    // The only waiter leaves: the step is being cancelled...
    c1.cancel();
    // ...and a new request for the same step arrives at once.
    let (sink2, log2) = buffer_sink();
    let (b2, s2) = (b.clone(), s.clone());
    let restarted = sandbox.started.notified();
    let t2 = tokio::spawn(async move { b2.build(&s2, &BuildOptions::new("/tmp", sink2)).await });
    assert_eq!(t1.await.unwrap(), Err(BuildError::Cancelled));
    restarted.await;
    sandbox.release.notify_waiters();
    let id = t2
        .await
        .unwrap()
        .expect("the new build runs the step afresh");
    assert_eq!(sandbox.cancelled.load(Ordering::SeqCst), 1);
    assert_eq!(
        sandbox.runs.load(Ordering::SeqCst),
        2,
        "cancelled once, then run again"
    );
    let log = redact(&log2.lock().unwrap());
    assert!(
        log.ends_with("ran: block c\n---> saved as \"[ID]\"\n"),
        "{log}"
    );
    assert!(b.store().result(&id).await.unwrap().is_some());
}

#[tokio::test]
async fn both_waiters_leaving_cancels_the_step() {
    require!(Cap::Tool("rsync"));
    let (_d, sandbox, b) = setup().await;
    let s = spec("block d");
    let (o1, o2) = (
        BuildOptions::new("/tmp", buffer_sink().0),
        BuildOptions::new("/tmp", buffer_sink().0),
    );
    let (c1, c2) = (o1.cancel.clone(), o2.cancel.clone());
    let (b1, b2, s1, s2) = (b.clone(), b.clone(), s.clone(), s.clone());
    let started = sandbox.started.notified();
    let t1 = tokio::spawn(async move { b1.build(&s1, &o1).await });
    started.await;
    let t2 = tokio::spawn(async move { b2.build(&s2, &o2).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    c1.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        sandbox.cancelled.load(Ordering::SeqCst),
        0,
        "one waiter is left"
    );
    c2.cancel();
    assert_eq!(t1.await.unwrap(), Err(BuildError::Cancelled));
    assert_eq!(t2.await.unwrap(), Err(BuildError::Cancelled));
    b.wait_idle().await;
    assert_eq!(
        sandbox.cancelled.load(Ordering::SeqCst),
        1,
        "the last one leaving cancels the step"
    );
    assert_eq!(b.db().count().unwrap(), 1, "only the base is recorded");
}
