//! The scheduler, the admin tool, and a worker and client written for the tests, each in
//! its own process, talking Cap'n Proto over real TLS on 127.0.0.1.

// Tests start the real programs as processes.
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{admin_with, stderr, stdout, Peer, Scheduler};

/// The entry point of the peer processes (does nothing in a normal test run).
#[test]
fn peer() {
    common::peer::main();
}

#[test]
fn submit_pipelines_job_log_and_result() {
    let s = Scheduler::start(&["linux"], &[]);
    let alice = s.add_client("alice");
    let mut w = Peer::worker(&s.pool_cap("linux"), "w1", 1);
    let mut c = Peer::client(&alice, "linux", "echo hello", "", "follow");
    assert_eq!(c.expect("log"), "log hello");
    assert_eq!(c.expect("result"), "result ok hello");
    assert_eq!(c.wait(), 0);
    assert_eq!(w.expect("job"), "job w1 echo hello hint=");
    // A failing job's error reaches the client.
    let mut c = Peer::client(&alice, "linux", "fail", "", "follow");
    assert_eq!(c.expect("result"), "result error Build failed");
    assert_eq!(c.wait(), 1);
    let show = s.admin_ok(&["show", "linux"]);
    assert!(show.contains("  w1 (0): [] (0 running)"), "{show}");
    assert!(show.contains("clients: alice(1)"), "{show}");
    assert_eq!(s.admin_ok(&["show", "linux", "w1"]), "w1: Running\n");
}

#[test]
fn cancel_kills_a_running_job_and_the_worker_goes_on() {
    let s = Scheduler::start(&["linux"], &[]);
    let alice = s.add_client("alice");
    let mut w = Peer::worker(&s.pool_cap("linux"), "w1", 1);
    let mut c = Peer::client(&alice, "linux", "wait", "", "cancel-on-start");
    assert_eq!(c.expect("log"), "log waiting");
    assert_eq!(w.expect("cancelled"), "cancelled wait");
    let r = c.expect("result");
    assert!(r.contains("Job cancelled"), "{r}");
    assert_eq!(c.wait(), 1);
    let mut c = Peer::client(&alice, "linux", "echo again", "", "follow");
    assert_eq!(c.expect("result"), "result ok again");
}

/// An `ocurrent` client whose ticket has come and whose job stays a promise (no worker).
fn queued_and_unsettled(c: &mut Peer) {
    c.expect("queued");
    assert_eq!(
        c.expect_within("settled", Duration::from_millis(700)),
        None,
        "settled while queued: {:?}",
        c.seen
    );
}

/// As OCurrent's plugin uses it: the ticket's job is a promise that settles only once a
/// worker has taken the job ("Waiting for worker…" until then), and the ticket, which the
/// plugin lets go of then, no longer stands for a queued job: the job runs to its end.
#[test]
fn the_job_settles_when_a_worker_takes_it_as_ocurrent_expects() {
    let s = Scheduler::start(&["linux"], &[]);
    let alice = s.add_client("alice");
    let mut c = Peer::client(&alice, "linux", "echo settled-then-ran", "", "ocurrent");
    queued_and_unsettled(&mut c);
    let _w = Peer::worker(&s.pool_cap("linux"), "w1", 1);
    c.expect("settled");
    assert_eq!(c.expect("result"), "result ok settled-then-ran");
}

/// The same for a job kept across a restart, which its client claims by submitting it
/// again (as OCurrent's plugin does once it has reconnected).
#[test]
fn a_kept_job_claimed_again_settles_when_a_worker_takes_it() {
    let mut s = Scheduler::start(&["linux"], &[]);
    let alice = s.add_client("alice");
    let mut first = Peer::client(&alice, "linux", "echo kept", "hk", "follow");
    common::wait_until(
        || backlog(&s.admin_ok(&["show", "linux"])).len() == 1,
        || "job not queued".into(),
    );
    s.crash();
    first.wait();
    s.restart();
    let mut c = Peer::client(&alice, "linux", "echo kept", "hk", "ocurrent");
    queued_and_unsettled(&mut c);
    assert_eq!(backlog(&s.admin_ok(&["show", "linux"])), ["alice:hk"]);
    let mut w = Peer::worker(&s.pool_cap("linux"), "w1", 1);
    c.expect("settled");
    assert_eq!(c.expect("result"), "result ok kept");
    assert_eq!(w.expect("job"), "job w1 echo kept hint=hk");
    assert_eq!(w.expect_within("job", Duration::from_millis(500)), None);
}

#[test]
fn releasing_the_last_reference_cancels() {
    let s = Scheduler::start(&["linux"], &[]);
    let alice = s.add_client("alice");
    let mut w = Peer::worker(&s.pool_cap("linux"), "w1", 2);
    // The client process goes away.
    let mut c2 = Peer::client(&alice, "linux", "wait", "", "exit-on-start");
    c2.expect("exiting");
    assert_eq!(w.expect("released"), "released wait");
    // References dropped, connection kept.
    let mut c1 = Peer::client(&alice, "linux", "wait", "", "drop-on-start");
    c1.expect("dropped");
    assert_eq!(w.expect("released"), "released wait");
    // Both slots are free again.
    let mut a = Peer::client(&alice, "linux", "echo a", "", "follow");
    let mut b = Peer::client(&alice, "linux", "echo b", "", "follow");
    assert_eq!(a.expect("result"), "result ok a");
    assert_eq!(b.expect("result"), "result ok b");
}

/// A queued job's `result` and `log` wait in the job as bare responders; calls its client
/// gives up meanwhile (here a hundred `log`s, each cancelled) are let go of, and the calls
/// still open are answered once a worker takes the job.
#[test]
fn calls_given_up_on_a_queued_job_leave_it_working() {
    let s = Scheduler::start(&["linux"], &[]);
    let alice = s.add_client("alice");
    let mut c = Peer::client(&alice, "linux", "echo patient", "", "fickle");
    c.expect("fickle-done");
    assert_eq!(
        backlog(&s.admin_ok(&["show", "linux"])),
        ["alice:(no cache hint)"]
    );
    let mut w = Peer::worker(&s.pool_cap("linux"), "w1", 1);
    assert_eq!(c.expect("log"), "log patient");
    assert_eq!(c.expect("result"), "result ok patient");
    assert_eq!(w.expect("job"), "job w1 echo patient hint=");
}

#[test]
fn cancel_and_release_while_queued() {
    let s = Scheduler::start(&["linux"], &[]);
    let alice = s.add_client("alice");
    // No worker yet: the tickets queue.
    let mut c1 = Peer::client(&alice, "linux", "echo one", "", "cancel-queued");
    c1.expect("queued");
    let r = c1.expect("result");
    assert!(r.contains("Ticket cancelled"), "{r}");
    let mut c2 = Peer::client(&alice, "linux", "echo two", "", "exit-queued");
    c2.expect("queued");
    assert_eq!(c2.wait(), 0);
    // Wait for the scheduler to see the disconnect.
    let deadline = Instant::now() + common::TIMEOUT;
    loop {
        let show = s.admin_ok(&["show", "linux"]);
        if show.contains("queue: (backlog) []") {
            break;
        }
        assert!(Instant::now() < deadline, "{show}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut w = Peer::worker(&s.pool_cap("linux"), "w1", 1);
    let mut c3 = Peer::client(&alice, "linux", "echo three", "", "follow");
    assert_eq!(c3.expect("result"), "result ok three");
    // The worker never saw the withdrawn jobs.
    assert_eq!(w.expect("job"), "job w1 echo three hint=");
}

#[test]
fn worker_killed_mid_job_then_reconnects() {
    // As the original: no second attempt.
    let s = Scheduler::start(&["linux"], &["--max-attempts=1"]);
    let alice = s.add_client("alice");
    let mut w = Peer::worker(&s.pool_cap("linux"), "w1", 1);
    let mut c = Peer::client(&alice, "linux", "wait", "", "follow");
    c.expect("log waiting");
    w.kill();
    let r = c.expect("result");
    assert!(r.starts_with("result error"), "{r}");
    assert_eq!(c.wait(), 1);
    // A second worker with the same name is refused while the first is registered, and
    // accepted once it has gone.
    let mut w2 = Peer::worker(&s.pool_cap("linux"), "w1", 1);
    let mut c = Peer::client(&alice, "linux", "echo back", "", "follow");
    assert_eq!(c.expect("result"), "result ok back");
    let mut dup = Peer::spawn(&["worker", s.pool_cap("linux").to_str().unwrap(), "w1", "1"]);
    let r = dup.expect("register-error");
    assert!(r.contains("Worker already registered!"), "{r}");
    w2.kill();
    let show = s.admin_ok(&["show", "--terse", "linux"]);
    assert_eq!(show, "w1\n");
}

#[test]
fn revoked_client_and_unknown_pool_are_refused() {
    let s = Scheduler::start(&["linux", "macos"], &[]);
    let alice = s.add_client("alice");
    let bob = s.add_client("bob");
    assert_eq!(s.admin_ok(&["list-clients"]), "alice\nbob\n");
    s.admin_ok(&["remove-client", "bob"]);
    assert_eq!(s.admin_ok(&["list-clients"]), "alice\n");
    let _w = Peer::worker(&s.pool_cap("linux"), "w1", 1);
    // carol is connected when she is removed: her next submit is refused.
    let carol = s.add_client("carol");
    let flag = s.dir.path().join("removed");
    let again = format!("again-after:{}", flag.display());
    let mut c = Peer::client(&carol, "linux", "echo x", "", &again);
    assert_eq!(c.expect("first-done"), "first-done 0");
    s.admin_ok(&["remove-client", "carol"]);
    std::fs::write(&flag, "").unwrap();
    assert_eq!(
        c.expect("result error"),
        "result error Access has been revoked"
    );
    // bob's cap file, used after his removal, names no service any more.
    let mut c = Peer::client(&bob, "linux", "echo x", "", "follow");
    let r = c.expect("result");
    assert!(r.contains("Unknown persistent service ID"), "{r}");
    let mut c = Peer::client(&alice, "nope", "echo x", "", "follow");
    let r = c.expect("result");
    assert!(
        r.contains(r#"Pool ID "nope" not one of {linux, macos}"#),
        "{r}"
    );
    let mut c = Peer::client(&alice, "linux", "echo fine", "", "follow");
    assert_eq!(c.expect("result"), "result ok fine");
    // Removing a client that does not exist, or adding one twice, says so.
    let out = s.admin(&["remove-client", "carol"]);
    assert!(!out.status.success());
    let out = s.admin(&["add-client", "alice"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("alice"), "{}", stderr(&out));
}

#[test]
fn same_cache_hint_goes_to_the_same_worker() {
    let s = Scheduler::start(&["linux"], &[]);
    let alice = s.add_client("alice");
    let mut w1 = Peer::worker(&s.pool_cap("linux"), "w1", 1);
    let mut w2 = Peer::worker(&s.pool_cap("linux"), "w2", 1);
    let mut c = Peer::client(&alice, "linux", "echo first", "opam", "follow");
    assert_eq!(c.expect("result"), "result ok first");
    let first = if w1.expect_within("job", Duration::from_secs(1)).is_some() {
        "w1"
    } else {
        w2.expect("job");
        "w2"
    };
    for i in 0..3 {
        let spec = format!("echo again{i}");
        let mut c = Peer::client(&alice, "linux", &spec, "opam", "follow");
        assert_eq!(c.expect("result"), format!("result ok again{i}"));
        let w = if first == "w1" { &mut w1 } else { &mut w2 };
        assert_eq!(w.expect("job"), format!("job {first} {spec} hint=opam"));
    }
}

/// A wrong fingerprint, an unknown service id, garbage bytes and an oversized frame are
/// each refused cleanly, and the scheduler serves the others all along.
#[test]
fn refusals_leave_the_scheduler_serving() {
    let s = Scheduler::start(&["linux"], &[]);
    let admin = std::fs::read_to_string(s.admin_cap()).unwrap();
    let dir = tempfile::tempdir().unwrap();

    // Wrong fingerprint.
    let fp_start = admin.find("sha-256:").unwrap() + 8;
    let mut wrong = admin.clone();
    let c = if &admin[fp_start..fp_start + 1] == "A" {
        "B"
    } else {
        "A"
    };
    wrong.replace_range(fp_start..fp_start + 1, c);
    let p = dir.path().join("wrong-fp.cap");
    std::fs::write(&p, &wrong).unwrap();
    let out = admin_with(&p, &["show"]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("the cap file expects"), "{e}");
    assert!(!e.contains("panicked"), "{e}");

    // Unknown service id.
    let slash = admin.rfind('/').unwrap();
    let unknown = format!("{}/{}\n", &admin[..slash], "A".repeat(43));
    let p = dir.path().join("unknown.cap");
    std::fs::write(&p, unknown).unwrap();
    let out = admin_with(&p, &["show"]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("Unknown persistent service ID"), "{e}");

    // Garbage, then a frame header that claims 1 GiB, on raw TCP to the TLS port.
    let port = {
        let at = admin.rfind('@').unwrap();
        admin[at + 1..slash].rsplit(':').next().unwrap().to_string()
    };
    let addr = format!("127.0.0.1:{port}");
    for bytes in [
        b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        [0u32.to_le_bytes(), (1u32 << 27).to_le_bytes()].concat(),
    ] {
        let mut t = std::net::TcpStream::connect(&addr).unwrap();
        t.set_read_timeout(Some(common::TIMEOUT)).unwrap();
        let _ = t.write_all(&bytes);
        let mut buf = Vec::new();
        let _ = t.read_to_end(&mut buf); // the scheduler hangs up
    }

    assert_eq!(s.admin_ok(&["show"]), "linux\n");
    assert!(s.child.as_ref().is_some());
}

#[test]
fn admin_errors_are_clear() {
    let s = Scheduler::start(&["linux"], &[]);
    let dir = tempfile::tempdir().unwrap();
    let check = |out: std::process::Output, want: &str| {
        assert!(!out.status.success());
        let e = stderr(&out);
        assert!(e.contains(want), "wanted {want:?} in {e:?}");
        assert!(!e.contains("panicked"), "{e}");
    };
    // No such file.
    check(
        admin_with(&dir.path().join("missing.cap"), &["show"]),
        "missing.cap",
    );
    // Not a cap file.
    let bad = dir.path().join("bad.cap");
    std::fs::write(&bad, "hello\n").unwrap();
    check(admin_with(&bad, &["show"]), "bad.cap");
    // Nobody listening there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let admin = std::fs::read_to_string(s.admin_cap()).unwrap();
    let at = admin.rfind('@').unwrap();
    let slash = admin.rfind('/').unwrap();
    let gone = format!(
        "{}@127.0.0.1:{port}{}",
        &admin[..at],
        &admin[slash..].trim_end()
    );
    let p = dir.path().join("gone.cap");
    std::fs::write(&p, gone).unwrap();
    check(admin_with(&p, &["show"]), &format!("127.0.0.1:{port}"));
    // Unknown pool and worker; no -c at all.
    check(s.admin(&["show", "nope"]), "No such pool");
    check(s.admin(&["forget", "linux", "nobody"]), "nobody");
    check(
        s.admin(&["set-rate", "linux", "nobody", "2"]),
        "No such user",
    );
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ocluster-admin"));
    cmd.arg("show");
    check(common::run_bounded(cmd), "--connect");
    // -c before the verb works as well as after it.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ocluster-admin"));
    cmd.arg("-c").arg(s.admin_cap()).arg("show");
    let out = common::run_bounded(cmd);
    assert_eq!(stdout(&out), "linux\n");
    assert_eq!(
        stderr(&out),
        format!(
            "Connecting to tcp:127.0.0.1:{}... OK\n",
            admin[at + 1..slash].rsplit(':').next().unwrap()
        )
    );
}

#[test]
fn pause_drain_update_and_forget() {
    let s = Scheduler::start(&["linux"], &[]);
    let alice = s.add_client("alice");
    let cap = s.pool_cap("linux");
    let mut w = Peer::worker(&cap, "w1", 1);
    let mut c = Peer::client(&alice, "linux", "wait", "", "follow");
    c.expect("log waiting");

    // pause --wait reports progress until the running job ends.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ocluster-admin"));
    cmd.args(["pause", "--wait", "linux", "w1", "-c"])
        .arg(s.admin_cap());
    let pause = std::thread::spawn(move || common::run_bounded(cmd));
    common::wait_until(
        || s.admin_ok(&["show", "linux", "w1"]) == "w1: Paused\n",
        String::new,
    );
    std::thread::sleep(Duration::from_millis(300));
    drop(c); // kills the client: the job is released and ends
    w.expect("released wait");
    let out = pause.join().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "Waiting for jobs to finish…\nw1: Running jobs: 1\nw1: Running jobs: 0\nSuccess.\n"
    );
    // Paused: a new job waits.
    let mut c = Peer::client(&alice, "linux", "echo later", "", "follow");
    assert!(w.expect_within("job", Duration::from_millis(500)).is_none());
    assert_eq!(s.admin_ok(&["unpause", "linux", "w1"]), "Success.\n");
    assert_eq!(c.expect("result"), "result ok later");

    // update: drain, selfUpdate, wait for the worker to come back.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ocluster-admin"));
    cmd.args(["update", "linux", "-c"]).arg(s.admin_cap());
    let update = std::thread::spawn(move || common::run_bounded(cmd));
    w.expect("self-update");
    assert_eq!(w.wait(), 0);
    let _w = Peer::worker(&cap, "w1", 1);
    let out = update.join().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "Testing update on first worker in pool: \"w1\"\nw1: Restarting\n\
         Canary updated OK. Updating the others: []\nAll pool workers restarted.\n"
    );

    // forget: refused while connected, done once gone.
    let out = s.admin(&["forget", "linux", "w1"]);
    assert!(!out.status.success());
    drop(_w);
    common::wait_until(
        || s.admin(&["forget", "linux", "w1"]).status.success(),
        String::new,
    );
    assert_eq!(s.admin_ok(&["show", "--terse", "linux"]), "");
}

#[test]
fn admin_pause_survives_a_restart() {
    let mut s = Scheduler::start(&["linux"], &[]);
    assert_eq!(
        s.admin_ok(&["pause", "--auto-create", "linux", "w9"]),
        "Success.\n"
    );
    s.restart();
    assert_eq!(s.admin_ok(&["show", "linux", "w9"]), "w9: Paused\n");
    let _w = Peer::worker(&s.pool_cap("linux"), "w9", 1);
    assert_eq!(s.admin_ok(&["show", "linux", "w9"]), "w9: Paused\n");
    s.add_client("alice");
    s.admin_ok(&["set-rate", "linux", "alice", "3"]);
    s.restart();
    // Clients show once they submit, with the rate the database kept.
    let show = s.admin_ok(&["show", "linux"]);
    assert!(show.ends_with("\nclients:\n"), "{show}");
    let _w = Peer::worker(&s.pool_cap("linux"), "w9", 1);
    let alice = s.dir.path().join("alice.cap");
    let mut c = Peer::client(&alice, "linux", "echo x", "", "cancel-queued");
    c.expect("queued");
    let show = s.admin_ok(&["show", "linux"]);
    assert!(show.contains("\nclients: alice(3)"), "{show}");
}

/// The original scheduler's key and database: the same cap files, and its clients work.
#[test]
fn golden_drop_in_for_the_original_state_dir() {
    let Some(golden) = common::replay::golden("tls") else {
        return;
    };
    let dir = common::replay::original_state(&golden, "");
    let s = Scheduler::start_in(dir, &["linux-x86_64"], &["--default-clients=alice"]);
    // Same fingerprint and ids; only the address differs.
    let strip = |uri: &str| {
        let at = uri.rfind('@').unwrap();
        let slash = uri.rfind('/').unwrap();
        format!("{}{}", &uri[..at], &uri[slash..])
    };
    let ours_admin = std::fs::read_to_string(s.admin_cap()).unwrap();
    for name in ["admin", "pool-linux-x86_64"] {
        let theirs = std::fs::read_to_string(golden.join(format!("{name}.cap"))).unwrap();
        let ours = std::fs::read_to_string(s.cap(name)).unwrap();
        assert_eq!(strip(&ours), strip(&theirs), "{name}.cap");
        assert!(ours.ends_with('\n') && !ours.ends_with("\n\n"));
    }
    // alice already has a cap (the db has her): not written again.
    assert!(!s.cap("submit-alice").exists());
    assert_eq!(s.admin_ok(&["list-clients"]), "alice\nbob\n");
    assert_eq!(
        s.admin_ok(&["show", "linux-x86_64"]),
        // As the original: known workers come from the database, clients appear as they
        // submit (or are given a rate).
        "capacity: 0\nqueue: (backlog) []\nregistered:\ndisconnected:\n  worker-1\nclients:\n"
    );
    // The original's client caps, pointed at our address, work.
    let at = ours_admin.rfind('@').unwrap();
    let slash = ours_admin.rfind('/').unwrap();
    let addr = &ours_admin[at..slash];
    let _w = Peer::worker(&s.pool_cap("linux-x86_64"), "worker-1", 1);
    for name in ["bob", "submit-alice"] {
        let theirs = std::fs::read_to_string(golden.join(format!("{name}.cap"))).unwrap();
        let (a, b) = (theirs.rfind('@').unwrap(), theirs.rfind('/').unwrap());
        let moved = format!("{}{addr}{}", &theirs[..a], &theirs[b..]);
        let p = s.dir.path().join(format!("{name}-here.cap"));
        std::fs::write(&p, moved).unwrap();
        let mut c = Peer::client(&p, "linux-x86_64", "echo golden", "golden", "follow");
        assert_eq!(c.expect("result"), "result ok golden", "{name}");
    }
    assert_eq!(
        s.admin_ok(&["show", "linux-x86_64", "worker-1"]),
        "worker-1: Running\n"
    );
}

#[test]
fn prometheus_metrics_and_worker_relay() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let listen = format!("--listen-prometheus=127.0.0.1:{port}");
    let s = Scheduler::start(&["linux"], &[&listen]);
    let alice = s.add_client("alice");
    let _w = Peer::worker(&s.pool_cap("linux"), "w1", 3);
    let mut c = Peer::client(&alice, "linux", "echo m", "", "follow");
    c.expect("result ok");
    let get = |path: &str| -> String {
        let mut t = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        t.set_read_timeout(Some(common::TIMEOUT)).unwrap();
        write!(t, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut s = String::new();
        t.read_to_string(&mut s).unwrap();
        s
    };
    let m = get("/metrics");
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    for name in [
        "ocluster_pool_jobs_accepted_total",
        "ocluster_pool_workers_connected",
        "ocluster_pool_workers_capacity",
        "ocluster_pool_workers_ready",
        "ocluster_pool_workers_paused",
        "ocluster_pool_queue_length",
        "ocluster_scheduler_client_submitted_jobs",
    ] {
        assert!(m.contains(name), "no {name} in {m}");
    }
    assert!(
        m.contains(r#"ocluster_pool_workers_capacity{pool="linux"} 3"#),
        "{m}"
    );
    // (glibc's count of the heap in use: a number of bytes, more than none)
    let heap = m
        .lines()
        .find_map(|l| l.strip_prefix("ocluster_scheduler_heap_bytes "))
        .unwrap_or_else(|| panic!("no heap in {m}"));
    assert!(heap.parse::<u64>().unwrap() > 0, "{heap}");
    assert!(
        m.contains(r#"ocluster_pool_jobs_accepted_total{pool="linux"} 1"#),
        "{m}"
    );
    let a = get("/pool/linux/worker/w1/metrics");
    assert!(a.contains(r#"test_worker_agent{name="w1"} 1"#), "{a}");
    let h = get("/pool/linux/worker/w1/host-metrics");
    assert!(h.contains(r#"test_worker_host{name="w1"} 1"#), "{h}");
    let missing = get("/pool/linux/worker/nobody/metrics");
    assert!(missing.starts_with("HTTP/1.1 400"), "{missing}");
    assert!(missing.ends_with("Worker not connected"), "{missing}");
}

/// Plain TCP (`--capnp-disable-tls`): cap files say `insecure`; and the admin service and
/// a pool's on one connection, as an OCaml process holding both would ask for them (it
/// reuses its connection to a scheduler), each work.
#[test]
fn insecure_mode_and_two_services_on_one_connection() {
    use capnp_rpc::rpc_capnp::message;
    use common::replay::{results, root, show};
    let s = Scheduler::start(&["linux"], &["--capnp-disable-tls"]);
    let admin = std::fs::read_to_string(s.admin_cap()).unwrap();
    assert!(admin.starts_with("capnp://insecure@127.0.0.1:"), "{admin}");
    assert_eq!(s.admin_ok(&["show"]), "linux\n");
    let id = |cap: &std::path::Path| ocluster_net::capfile::read(cap).unwrap().service_id;
    let frame = |f: &dyn Fn(message::Builder<'_>)| {
        let mut m = capnp::message::Builder::new_default();
        f(m.init_root::<message::Builder>());
        capnp::serialize::write_message_to_words(&m)
    };
    let bootstrap = |q: u32, id: Vec<u8>| {
        frame(&move |m: message::Builder<'_>| {
            let mut b = m.init_bootstrap();
            b.set_question_id(q);
            b.init_deprecated_object_id()
                .set_as(capnp::text::Reader::from(&id[..]))
                .unwrap();
        })
    };
    let mut t = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    t.set_read_timeout(Some(common::TIMEOUT)).unwrap();
    t.write_all(&bootstrap(0, id(&s.admin_cap()))).unwrap();
    t.write_all(&bootstrap(1, id(&s.pool_cap("linux"))))
        .unwrap();
    // Admin.pools on the first.
    t.write_all(&frame(&|m: message::Builder<'_>| {
        let mut c = m.init_call();
        c.set_question_id(2);
        c.set_interface_id(ocluster_api::ids::ADMIN);
        c.set_method_id(0);
        c.reborrow()
            .init_target()
            .init_promised_answer()
            .set_question_id(0);
        c.init_params().init_cap_table(0);
    }))
    .unwrap();
    let mut got = Vec::new();
    let mut pools = None;
    while pools.is_none() {
        let m = capnp::serialize::read_message(&mut t, Default::default())
            .unwrap_or_else(|e| panic!("{e}; so far: {got:?}"));
        got.push(show(&m));
        if let message::Return(Ok(r)) = root(&m).which().unwrap() {
            if r.get_answer_id() == 2 {
                let p: ocluster_api::admin::pools_results::Reader<'_> = results(&m)
                    .unwrap_or_else(|e| panic!("{e}; so far: {got:?}"))
                    .get_content()
                    .get_as()
                    .unwrap();
                pools = Some(p.get_names().unwrap().get(0).unwrap().to_string().unwrap());
            }
        }
    }
    assert_eq!(pools.as_deref(), Some("linux"), "{got:?}");
    assert!(
        got.contains(&r#"return a0 caps [("senderHosted", 0)]"#.to_string()),
        "{got:?}"
    );
    assert!(
        got.contains(&r#"return a1 caps [("senderHosted", 1)]"#.to_string()),
        "{got:?}"
    );
    let alice = s.add_client("alice");
    let _w = Peer::worker(&s.pool_cap("linux"), "w1", 1);
    let mut c = Peer::client(&alice, "linux", "echo plain", "", "follow");
    assert_eq!(c.expect("result"), "result ok plain");
}

#[test]
fn unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sched.sock");
    let listen = format!("--capnp-listen-address=unix:{}", sock.display());
    let s = Scheduler::start(&["linux"], &[&listen]);
    let admin = std::fs::read_to_string(s.admin_cap()).unwrap();
    assert!(admin.contains(&format!("@{}/", sock.display())), "{admin}");
    assert_eq!(s.admin_ok(&["show"]), "linux\n");
    let alice = s.add_client("alice");
    let _w = Peer::worker(&s.pool_cap("linux"), "w1", 1);
    let mut c = Peer::client(&alice, "linux", "echo unix", "", "follow");
    assert_eq!(c.expect("result"), "result ok unix");
}

#[test]
fn exec_and_bulk_admin_verbs() {
    let s = Scheduler::start(&["linux"], &[]);
    let _w1 = Peer::worker(&s.pool_cap("linux"), "w1", 1);
    let _w2 = Peer::worker(&s.pool_cap("linux"), "w2", 1);
    let out = s.dir.path().join("exec.out");
    // Each whole `{}` argument is the worker's name.
    let script = r#"echo "$1" >> "$2""#;
    s.admin_ok(&[
        "exec",
        "linux",
        "--",
        "sh",
        "-c",
        script,
        "sh",
        "{}",
        out.to_str().unwrap(),
    ]);
    let mut names: Vec<String> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    names.sort();
    assert_eq!(names, ["w1", "w2"]);
    let failed = s.admin(&["exec", "linux", "--", "false"]);
    assert!(!failed.status.success());
    assert!(
        stderr(&failed).contains("Sub-process failed with exit code 1"),
        "{}",
        stderr(&failed)
    );

    // Without a worker and without --all: the candidates, and exit 1.
    let out = s.admin(&["pause", "linux"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("w1 (active, connected)"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        s.admin_ok(&["pause", "--all", "linux"]),
        "Updating w1, w2…\nSuccess.\n"
    );
    assert_eq!(s.admin_ok(&["show", "linux", "w2"]), "w2: Paused\n");
    assert_eq!(
        s.admin_ok(&["unpause", "--all", "linux"]),
        "Updating w1, w2…\nSuccess.\n"
    );
    assert_eq!(s.admin_ok(&["show", "--terse", "linux", "w1"]), "Running\n");
    let out = s.admin(&["forget", "linux"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("\nSpecify which worker you want to forget.\nCandidates are:\n"),
        "{}",
        stderr(&out)
    );
}

/// A worker lost mid-job: the job runs again on another worker, the client sees one job
/// (its log says what happened) and one result.
#[test]
fn a_lost_worker_s_job_runs_again_elsewhere() {
    let s = Scheduler::start(&["linux"], &[]);
    let alice = s.add_client("alice");
    let mut w1 = Peer::worker(&s.pool_cap("linux"), "w1", 1);
    let mut c = Peer::client(&alice, "linux", "slowecho twice", "", "follow");
    assert_eq!(c.expect("log"), "log started");
    w1.expect("job w1 slowecho twice");
    let mut w2 = Peer::worker(&s.pool_cap("linux"), "w2", 1);
    w1.kill();
    let lost = c.expect("log Worker w1 was lost");
    assert!(lost.ends_with("queued again (attempt 2 of 3)"), "{lost}");
    assert_eq!(c.expect("log Running"), "log Running again on w2");
    w2.expect("job w2 slowecho twice");
    assert_eq!(c.expect("log"), "log started");
    assert_eq!(c.expect("log"), "log twice");
    assert_eq!(c.expect("result"), "result ok twice");
    assert_eq!(c.wait(), 0);

    // Out of attempts: the client gets the loss as its error.
    let s = Scheduler::start(&["linux"], &["--max-attempts=2"]);
    let alice = s.add_client("alice");
    let mut c = Peer::client(&alice, "linux", "wait", "", "follow");
    for n in ["a", "b"] {
        let mut w = Peer::worker(&s.pool_cap("linux"), n, 1);
        w.expect("job");
        w.kill();
    }
    let r = c
        .expect_within("result", common::TIMEOUT)
        .unwrap_or_else(|| panic!("no result; saw {:?}\n{}", c.seen, s.log()));
    assert!(r.starts_with("result error"), "{r}");
    assert_eq!(c.wait(), 1);
}

/// `add-worker` gives a worker a registration capability of its own, pinned to its
/// name; `remove-worker` revokes it at once; `--no-shared-pool-cap` turns the shared one
/// off.
#[test]
fn workers_with_capabilities_of_their_own() {
    let mut s = Scheduler::start(&["linux"], &[]);
    let alice = s.add_client("alice");
    let cap = s.dir.path().join("w1.cap");
    std::fs::write(&cap, s.admin_ok(&["add-worker", "linux", "w1"])).unwrap();
    let mut w1 = Peer::worker(&cap, "w1", 1);
    let mut other = Peer::spawn(&["worker", cap.to_str().unwrap(), "w2", "1"]);
    let r = other.expect("register-error");
    assert!(
        r.contains(r#"This capability registers worker "w1", not "w2""#),
        "{r}"
    );
    let mut c = Peer::client(&alice, "linux", "echo pinned", "", "follow");
    assert_eq!(c.expect("result"), "result ok pinned");
    // The shared pool cap still works for (OCaml) workers.
    let shared = s.dir.path().join("shared.cap");
    std::fs::copy(s.pool_cap("linux"), &shared).unwrap();
    let w2 = Peer::worker(&shared, "w2", 1);
    drop(w2);

    // Revoked: the worker is disconnected at once and its cap restores nothing.
    s.admin_ok(&["remove-worker", "linux", "w1"]);
    w1.expect("pop-error");
    let mut again = Peer::spawn(&["worker", cap.to_str().unwrap(), "w1", "1"]);
    let r = again.expect("register-error");
    assert!(r.contains("Unknown persistent service ID"), "{r}");
    let out = s.admin(&["remove-worker", "linux", "w1"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no registration capability"),
        "{}",
        stderr(&out)
    );
    let out = s.admin(&["add-worker", "nope", "w1"]);
    assert!(stderr(&out).contains("No such pool"), "{}", stderr(&out));

    // Only workers' own caps.
    std::fs::write(&cap, s.admin_ok(&["add-worker", "linux", "w1"])).unwrap();
    s.extra.push("--no-shared-pool-cap".into());
    s.restart();
    assert!(!s.pool_cap("linux").exists());
    let mut old = Peer::spawn(&["worker", shared.to_str().unwrap(), "w2", "1"]);
    let r = old.expect("register-error");
    assert!(r.contains("Unknown persistent service ID"), "{r}");
    let _w1 = Peer::worker(&cap, "w1", 1);
    let mut c = Peer::client(&alice, "linux", "echo only-pinned", "", "follow");
    assert_eq!(c.expect("result"), "result ok only-pinned");
}

/// A worker that sends heartbeats and stops (wedged, its connection still open) is taken
/// as lost: its job runs on another worker, and it may register again under its name.
#[test]
fn a_wedged_worker_is_taken_as_lost() {
    let s = Scheduler::start(&["linux"], &["--heartbeat-timeout=1"]);
    let alice = s.add_client("alice");
    let cap = s.pool_cap("linux");
    let mut w1 = Peer::spawn(&["worker", cap.to_str().unwrap(), "w1", "1", "hb=100,wedge"]);
    w1.expect("registered");
    let mut c = Peer::client(&alice, "linux", "slowecho saved", "", "follow");
    w1.expect("job w1 slowecho saved");
    let _w2 = Peer::spawn(&["worker", cap.to_str().unwrap(), "w2", "1", "hb=100"]);
    let lost = c
        .expect_within("log Worker w1 was lost", common::TIMEOUT)
        .unwrap_or_else(|| panic!("saw {:?}\n{}", c.seen, s.log()));
    assert!(lost.contains("queued again (attempt 2 of 3)"), "{lost}");
    assert_eq!(c.expect("log Running"), "log Running again on w2");
    assert_eq!(c.expect("result"), "result ok saved");
    assert!(s.log().contains("sent no heartbeat"), "{}", s.log());
    // Its name is free again: a new w1 registers while the old connection is open.
    let mut again = Peer::spawn(&["worker", cap.to_str().unwrap(), "w1", "1", "hb=100"]);
    again.expect("registered");
    drop(w1);
}

/// A pool's job limits: a job that runs too long, or writes too much log, is cancelled
/// on its worker and fails saying why.
#[test]
fn job_time_and_log_limits() {
    let s = Scheduler::start(
        &["linux", "big"],
        &[
            "--job-time-limit=1s",
            "--job-time-limit=big=1h",
            "--job-log-limit=big=10K",
        ],
    );
    let alice = s.add_client("alice");
    let mut w = Peer::worker(&s.pool_cap("linux"), "w1", 1);
    let mut c = Peer::client(&alice, "linux", "wait", "", "follow");
    c.expect("log waiting");
    assert_eq!(w.expect("cancelled"), "cancelled wait");
    let note = c.expect("log Job stopped");
    assert_eq!(
        note,
        "log Job stopped: it ran longer than the limit of 1 s of pool linux"
    );
    let r = c.expect("result");
    assert!(r.contains("it ran longer than the limit"), "{r}");
    assert_eq!(c.wait(), 1);

    let mut w = Peer::worker(&s.pool_cap("big"), "w2", 1);
    let mut c = Peer::client(&alice, "big", "spam 50000", "", "follow");
    assert_eq!(w.expect("cancelled"), "cancelled spam 50000");
    let r = c.expect("result");
    assert!(
        r.contains("its log passed the limit of 10240 bytes of pool big"),
        "{r}"
    );
}

/// The jobs queued in `show`'s backlog, as `client:hint`.
fn backlog(show: &str) -> Vec<String> {
    let line = show
        .lines()
        .find(|l| l.starts_with("queue: (backlog)"))
        .unwrap_or_else(|| panic!("no backlog in {show}"));
    // Items are `client:label@when…`, and a label may hold spaces.
    let mut items = Vec::new();
    let mut item = String::new();
    for word in line
        .trim_start_matches("queue: (backlog) [")
        .trim_end_matches(']')
        .split_whitespace()
    {
        if !item.is_empty() {
            item.push(' ');
        }
        item.push_str(word);
        if let Some((head, _)) = item.split_once('@') {
            items.push(head.to_string());
            item.clear();
        }
    }
    items
}

/// `kill -9` of the scheduler: what was queued is queued again after the restart, in the
/// same order, with the clients' fair-share clocks; a client that submits the same job
/// again (as the OCurrent plugin does) gets that job, not a second one.
#[test]
fn queued_jobs_and_fair_clocks_survive_kill_9() {
    let mut s = Scheduler::start(&["linux"], &[]);
    let alice = s.add_client("alice");
    let bob = s.add_client("bob");
    let jobs = [
        (&alice, "echo a1", "ha", ""),
        (&alice, "echo a2", "hb", ""),
        (&bob, "echo b1", "hc", ""),
        (&alice, "echo a3", "hd", "urgent"),
    ];
    let mut clients = Vec::new();
    for (n, (cap, spec, hint, urgent)) in jobs.iter().enumerate() {
        clients.push(Peer::spawn(&[
            "client",
            cap.to_str().unwrap(),
            "linux",
            spec,
            hint,
            urgent,
            "follow",
        ]));
        common::wait_until(
            || backlog(&s.admin_ok(&["show", "linux"])).len() > n,
            || format!("job {n} not queued"),
        );
    }
    let before = s.admin_ok(&["show", "linux"]);
    assert_eq!(
        backlog(&before),
        // `show` lists the backlog last-to-run first.
        ["alice:hb", "bob:hc", "alice:ha", "alice:hd"],
        "{before}"
    );
    s.crash();
    for c in &mut clients {
        c.wait();
    }
    s.restart();
    let after = s.admin_ok(&["show", "linux"]);
    assert_eq!(backlog(&after), backlog(&before), "{after}\n{}", s.log());
    // alice's clock is still 3 jobs (1 800 s) ahead, bob's one.
    let clients_line = after.lines().find(|l| l.starts_with("clients:")).unwrap();
    assert_eq!(clients_line, "clients: alice(1)+30m bob(1)+10m", "{after}");

    // alice submits a2 again: it is the kept job.
    let mut again = Peer::client(&alice, "linux", "echo a2", "hb", "follow");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(backlog(&s.admin_ok(&["show", "linux"])).len(), 4);
    let mut w = Peer::worker(&s.pool_cap("linux"), "w1", 1);
    assert_eq!(again.expect("result"), "result ok a2");
    assert_eq!(again.wait(), 0);
    // Every kept job runs, once.
    for (spec, hint) in [("a3", "hd"), ("a1", "ha"), ("b1", "hc"), ("a2", "hb")] {
        assert_eq!(w.expect("job"), format!("job w1 echo {spec} hint={hint}"));
    }
    assert_eq!(w.expect_within("job", Duration::from_millis(500)), None);
    let show = s.admin_ok(&["show", "linux"]);
    assert!(show.contains("queue: (ready) [w1]"), "{show}");
    // Nothing is left to restore.
    s.crash();
    s.restart();
    let show = s.admin_ok(&["show", "linux"]);
    assert!(show.contains("queue: (backlog) []"), "{show}");
}

/// `kill -9` of the scheduler three times, at random points, while 500 jobs go through two
/// workers, with a client that submits again after each restart as the OCurrent plugin
/// does: every job's result comes, once. A job runs again only if a kill cut it: per slot
/// and kill, the job that ends before the worker sees the connection go (its result
/// lost with it) and the one whose result was on its way. Without de-duplication every
/// job that was queued at a kill (hundreds) would run twice.
#[test]
fn kill_9_under_load_loses_and_duplicates_nothing() {
    const JOBS: usize = 500;
    const KILLS: usize = 3;
    const SLOTS: usize = 8;
    let mut s = Scheduler::start(&["linux"], &[]);
    let alice = s.add_client("alice");
    let workers = |s: &Scheduler| -> Vec<Peer> {
        ["w1", "w2"]
            .iter()
            .map(|n| Peer::worker(&s.pool_cap("linux"), n, (SLOTS / 2) as u32))
            .collect()
    };
    let mut ws = workers(&s);
    let mut old = Vec::new();
    let mut c = Peer::spawn(&[
        "resubmitter",
        alice.to_str().unwrap(),
        "linux",
        &JOBS.to_string(),
        "50",
    ]);
    // A seed printed for a rerun; the kills come 150-650 ms apart.
    let seed = std::env::var("KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos() as u64
        });
    eprintln!("KILL_SEED={seed}");
    let mut rng = seed;
    for _ in 0..KILLS {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(150 + (rng >> 33) % 500));
        s.crash();
        s.restart();
        old.append(&mut ws);
        ws = workers(&s);
    }
    assert!(
        c.expect_within("all-done", Duration::from_secs(120))
            .is_some(),
        "not all results came: {} of {JOBS}\n{}",
        c.seen.iter().filter(|l| l.starts_with("result ")).count(),
        s.log()
    );
    let mut results = std::collections::BTreeMap::<String, usize>::new();
    for l in &c.seen {
        if let Some(job) = l.strip_prefix("result ") {
            *results.entry(job.to_string()).or_default() += 1;
        }
    }
    assert_eq!(results.len(), JOBS, "{:?}", c.seen);
    assert!(results.values().all(|n| *n == 1), "{results:?}");
    // Every worker said `done` before sending its result, but the threads reading their
    // output may not have passed the last lines on yet: read until all are in (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    let runs = loop {
        let mut runs = std::collections::BTreeMap::<String, usize>::new();
        for w in old.iter_mut().chain(ws.iter_mut()) {
            w.drain();
            for l in &w.seen {
                if let Some(job) = l.strip_prefix("done sleep 50 ") {
                    *runs.entry(job.to_string()).or_default() += 1;
                }
            }
        }
        if runs.len() == JOBS || Instant::now() > deadline {
            break runs;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let again: usize = runs.values().map(|n| n - 1).sum();
    eprintln!("{JOBS} jobs, {KILLS} kills: {again} ran again to the end");
    assert_eq!(runs.len(), JOBS);
    assert!(again <= 2 * KILLS * SLOTS, "{again} runs again: {runs:?}");
}

/// The real `ocluster-client`: `--priority` reaches the queue; when the scheduler is
/// killed and started again mid-job, the client connects again, submits the job again
/// and follows the job the scheduler kept, which runs once.
#[test]
fn client_priority_and_reconnection() {
    let mut s = Scheduler::start(&["linux"], &[]);
    let alice = s.add_client("alice");
    let spec = s.dir.path().join("spec");
    std::fs::write(&spec, "echo kept").unwrap();
    let mut client = std::process::Command::new(env!("CARGO_BIN_EXE_ocluster-client"))
        .args(["submit-obuilder", "-c"])
        .arg(&alice)
        .args(["--pool", "linux", "--priority", "high", "--local-file"])
        .arg(&spec)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let show = || s.admin_ok(&["show", "linux"]);
    common::wait_until(
        || show().contains("+high]"),
        || format!("{}\n{}", show(), s.log()),
    );
    s.crash();
    s.restart();
    common::wait_until(
        || {
            s.log()
                .contains("submitted again a job kept from before the restart")
        },
        || s.log(),
    );
    let show = s.admin_ok(&["show", "linux"]);
    assert_eq!(backlog(&show), ["alice:(no cache hint)"], "{show}");
    let mut w = Peer::worker(&s.pool_cap("linux"), "w1", 1);
    assert_eq!(w.expect("job"), "job w1 echo kept hint=");
    common::wait_until(
        || client.try_wait().unwrap().is_some(),
        || "the client did not end".into(),
    );
    let out = client.wait_with_output().unwrap();
    let (stdout, stderr) = (stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stderr.contains("Lost the scheduler"), "{stderr}");
    assert!(stdout.ends_with("kept\nResult: \"kept\"\n"), "{stdout}");
    assert_eq!(w.expect_within("job", Duration::from_millis(500)), None);
}

/// Costs are learned from run times, and an idle worker takes a job that has waited in
/// a busy worker's queue for longer than its learned cost (the original would leave it
/// there until the busy worker was free).
#[test]
fn learned_costs_and_work_stealing() {
    let s = Scheduler::start(&["linux"], &[]);
    let alice = s.add_client("alice");
    let mut w1 = Peer::worker(&s.pool_cap("linux"), "w1", 1);
    // Two short runs teach the scheduler that "h" takes well under a second, cached or
    // not.
    for n in ["a1", "a2"] {
        let mut c = Peer::client(&alice, "linux", &format!("sleep 300 {n}"), "h", "follow");
        assert_eq!(c.expect("result"), format!("result ok {n}"));
        assert_eq!(w1.expect("job"), format!("job w1 sleep 300 {n} hint=h"));
    }
    // w1 is busy for good; w2 is idle; the next "h" job goes to w1's queue (it has the
    // cache), and after about a second moves to w2.
    let _busy = Peer::client(&alice, "linux", "wait", "h", "follow");
    w1.expect("job w1 wait");
    let mut w2 = Peer::worker(&s.pool_cap("linux"), "w2", 1);
    let mut c = Peer::client(&alice, "linux", "echo stolen", "h", "follow");
    assert_eq!(c.expect("result"), "result ok stolen");
    assert_eq!(w2.expect("job"), "job w2 echo stolen hint=h");
    let metrics = s.admin_ok(&["show", "linux"]);
    assert!(metrics.contains("w1 (0): []"), "{metrics}");
    assert!(
        s.log()
            .contains("an idle worker takes a job that waited longer than expected"),
        "{}",
        s.log()
    );
}

/// `GET path` on 127.0.0.1:port; the status and the body.
fn http_get(port: u16, path: &str) -> (u16, String) {
    http_get_from("127.0.0.1", port, path, "")
}

/// `GET path` on host:port with extra header lines; the status and the body.
fn http_get_from(host: &str, port: u16, path: &str, headers: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect((host, port)).unwrap();
    s.set_read_timeout(Some(common::TIMEOUT)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    (status, body.unwrap_or_default())
}

/// Runs headless Chromium on `url` with `args` (`--dump-dom`, `--screenshot=…`); its
/// stdout.
fn chromium(url: &str, args: &[&str]) -> String {
    let mut cmd = std::process::Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--window-size=1280,1000",
    ])
    .arg(format!(
        "--user-data-dir={}",
        tempfile::tempdir().unwrap().keep().display()
    ))
    .args(args)
    .arg(url);
    let out = common::run_bounded(cmd);
    assert!(out.status.success(), "chromium: {}", stderr(&out));
    stdout(&out)
}

/// The live status page, in headless Chromium: pools, workers (with a paused one and a
/// disconnected one), the queue per client, and a running job whose log on its page
/// grows from one load to the next; a screenshot is taken and checked.
#[test]
fn live_status_page_in_chromium() {
    if !testkit::require(
        "live_status_page_in_chromium",
        &[testkit::Cap::Tool("chromium")],
    ) {
        return;
    }
    let s = Scheduler::start(&["linux"], &["--listen-http=127.0.0.1:0"]);
    let port = status_port(&s, "127.0.0.1");
    let alice = s.add_client("alice");
    let bob = s.add_client("bob");
    s.admin_ok(&["pause", "--auto-create", "linux", "w-old"]);
    let mut w1 = Peer::worker(&s.pool_cap("linux"), "w1", 1);
    let _w2 = Peer::worker(&s.pool_cap("linux"), "w2", 1);
    s.admin_ok(&["pause", "linux", "w2"]);
    let _ticking = Peer::client(&alice, "linux", "tick 200", "opam", "follow");
    w1.expect("job w1 tick 200");
    let _queued = Peer::client(&bob, "linux", "echo later", "<b>dune</b>", "follow");
    common::wait_until(
        || http_get(port, "/").1.contains("&lt;b&gt;dune&lt;/b&gt;"),
        || http_get(port, "/").1,
    );

    let url = format!("http://127.0.0.1:{port}/");
    let dom = chromium(&url, &["--dump-dom"]);
    for want in [
        "<h2>Pool linux</h2>",
        "<td>w1</td><td class=\"active\">active</td><td>1</td>",
        "<td>w2</td><td class=\"paused\">paused (admin pause)</td>",
        "<td>w-old</td><td class=\"gone\">disconnected, paused</td>",
        ">opam</a></td><td>alice</td><td>w1</td><td>normal</td>",
        "<li>&lt;b&gt;dune&lt;/b&gt; <span class=\"muted\">(bob, normal",
        "<tr><td>bob</td><td>1</td>",
        "<meta http-equiv=\"refresh\" content=\"2\">",
    ] {
        assert!(dom.contains(want), "{want:?} not in the page:\n{dom}");
    }
    // Nothing but the page itself is loaded: no script, nothing from elsewhere.
    assert!(!dom.contains("<script"), "{dom}");
    assert!(!dom.contains("http://") || !dom.contains("src="), "{dom}");

    // The running job's page: its log tail grows between loads.
    let job = dom
        .split("<a href=\"/pool/linux/job/")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_string();
    let job_url = format!("{url}pool/linux/job/{job}");
    let ticks = |dom: &str| dom.matches("tick ").count();
    let first = chromium(&job_url, &["--dump-dom"]);
    assert!(first.contains("<pre id=\"log\">tick 0\n"), "{first}");
    std::thread::sleep(Duration::from_millis(1200));
    let second = chromium(&job_url, &["--dump-dom"]);
    assert!(
        ticks(&second) > ticks(&first),
        "the log did not grow:\n{first}\n---\n{second}"
    );
    assert!(second.contains("<meta http-equiv=\"refresh\" content=\"1\">"));

    // A screenshot of the overview: a PNG of the window's size, not a blank page.
    let shot = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&url, &[&format!("--screenshot={}", shot.display())]);
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let (w, h) = (
        u32::from_be_bytes(png[16..20].try_into().unwrap()),
        u32::from_be_bytes(png[20..24].try_into().unwrap()),
    );
    assert_eq!((w, h), (1280, 1000));
    // Blank, it compresses to a few hundred bytes; with the tables, to tens of KB.
    assert!(png.len() > 10_000, "{} bytes: a blank page?", png.len());
    eprintln!("screenshot: {}", shot.display());

    // JSON for tools, and the job's log as text.
    let (status, json) = http_get(port, "/status.json");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["pools"][0]["name"], "linux");
    assert_eq!(v["pools"][0]["running"][0]["client"], "alice");
    let (status, text) = http_get(port, &format!("/pool/linux/job/{job}/log"));
    assert_eq!(status, 200);
    assert!(text.starts_with("tick 0\n"), "{text}");
    assert_eq!(http_get(port, "/pool/linux/job/999999").0, 404);
}

/// The port of the status page, from the scheduler's log (the scheduler writes its cap
/// files, which `start` waits for, before it serves the page: wait for the line too).
fn status_port(s: &Scheduler, host: &str) -> u16 {
    let find = || {
        s.log()
            .split(&format!("Status page on http://{host}:"))
            .nth(1)
            .and_then(|r| r.split('/').next())
            .and_then(|p| p.parse().ok())
    };
    common::wait_until(
        || find().is_some(),
        || format!("no status page address in {}", s.log()),
    );
    find().unwrap()
}

/// A worker cut off by a network partition (its namespace's link taken down, so its
/// connection is not reset, only silent) is taken as lost once its heartbeats stop; its
/// job runs again on another worker; when the link comes back the old run is stopped and
/// the client still has one result.
#[test]
fn a_partitioned_worker_is_detected_and_its_job_runs_elsewhere() {
    let Some(net) = common::NetPair::new("part") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("secrets")).unwrap();
    let listen = format!("--capnp-listen-address=tcp:{}:0", net.a_ip);
    let s = Scheduler::start_in_netns(
        dir,
        Some(&net.a),
        &["linux"],
        &[&listen, "--heartbeat-timeout=2"],
    );
    let alice = s.add_client("alice");
    let pool = s.pool_cap("linux");
    let worker = |ns: &str, name: &str| {
        let mut w = Peer::spawn_in(
            Some(ns),
            &["worker", pool.to_str().unwrap(), name, "1", "hb=300"],
        );
        w.expect("registered");
        w
    };
    let mut w1 = worker(&net.b, "w1");
    let mut c = Peer::spawn_in(
        Some(&net.a),
        &[
            "client",
            alice.to_str().unwrap(),
            "linux",
            "tick 15",
            "",
            "",
            "follow",
        ],
    );
    w1.expect("job w1 tick 15");
    c.expect("log tick 0");
    let mut w2 = worker(&net.a, "w2");
    net.cut();
    let lost = c.expect("log Worker w1 was lost");
    assert!(lost.ends_with("queued again (attempt 2 of 3)"), "{lost}");
    assert_eq!(c.expect("log Running"), "log Running again on w2");
    w2.expect("job w2 tick 15");
    net.heal();
    assert_eq!(c.expect("result"), "result ok ticked");
    assert_eq!(c.wait(), 0);
    assert_eq!(c.seen.iter().filter(|l| l.starts_with("result")).count(), 1);
    // Back on the network, w1 hears that it was let go of (its old run's result, if it
    // sends one, goes nowhere), and that it must register again.
    let told = w1
        .expect_within("heartbeat-error", common::TIMEOUT)
        .unwrap_or_else(|| panic!("{:?}\n{}", w1.seen, s.log()));
    assert!(told.ends_with("register again"), "{told}");
}

/// Off loopback, the status page needs the token of --http-token-file (and without one
/// it is refused, saying how to allow it); the scheduler runs in a namespace of the
/// test's, and the browser is on the other side of a veth link.
#[test]
fn the_status_page_off_loopback_needs_the_token() {
    let Some(net) = common::NetPair::new("http") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("secrets")).unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "a-long-enough-token-0123\n").unwrap();
    let listen = format!("--capnp-listen-address=tcp:{}:0", net.a_ip);
    let http = format!("--listen-http={}:0", net.a_ip);
    let token = format!("--http-token-file={}", token_file.display());
    let s = Scheduler::start_in_netns(dir, Some(&net.a), &["linux"], &[&listen, &http, &token]);
    let port = status_port(&s, &net.a_ip);
    let host = net.a_ip.clone();
    let (none, bad, header, query) = common::NetPair::run_in(&net.b, move || {
        (
            http_get_from(&host, port, "/", ""),
            http_get_from(
                &host,
                port,
                "/",
                "Authorization: Bearer wrong-token-wrong-token\r\n",
            ),
            http_get_from(
                &host,
                port,
                "/",
                "Authorization: Bearer a-long-enough-token-0123\r\n",
            ),
            http_get_from(
                &host,
                port,
                "/status.json?token=a-long-enough-token-0123",
                "",
            ),
        )
    });
    assert_eq!(none.0, 401, "{none:?}");
    assert_eq!(bad.0, 401, "{bad:?}");
    assert_eq!(header.0, 200, "{header:?}");
    assert!(header.1.contains("<h2>Pool linux</h2>"));
    assert_eq!(query.0, 200, "{query:?}");
    // The metrics are not the status page: no token, as the original.
    let host = net.a_ip.clone();
    let metrics =
        common::NetPair::run_in(&net.b, move || http_get_from(&host, port, "/metrics", ""));
    assert_eq!(metrics.0, 200);
    drop(s);

    // No token file: only loopback may read it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("secrets")).unwrap();
    let s = Scheduler::start_in_netns(dir, Some(&net.a), &["linux"], &[&listen, &http]);
    let port = status_port(&s, &net.a_ip);
    let host = net.a_ip.clone();
    let refused = common::NetPair::run_in(&net.b, move || http_get_from(&host, port, "/", ""));
    assert_eq!(refused.0, 403);
    assert!(refused.1.contains("--http-token-file"), "{refused:?}");
    assert!(s
        .log()
        .contains("only loopback browsers may read the status page"));
}

/// A worker whose clock is off (by its heartbeats) is paused and given no work; the
/// others are fed.
#[test]
fn a_worker_with_a_wrong_clock_is_paused_not_fed() {
    let s = Scheduler::start(&["linux"], &["--max-clock-skew=60"]);
    let alice = s.add_client("alice");
    let mut off = Peer::spawn(&[
        "worker",
        s.pool_cap("linux").to_str().unwrap(),
        "w-off",
        "2",
        "hb=200,skew=3600",
    ]);
    off.expect("registered");
    common::wait_until(
        || s.admin_ok(&["show", "linux", "w-off"]) == "w-off: Paused\n",
        || s.log(),
    );
    let show = s.admin_ok(&["show", "linux"]);
    assert!(show.contains("w-off (0): (inactive: clock skew)"), "{show}");
    assert!(s.log().contains("clock is +3600 s off ours"), "{}", s.log());
    let mut ok = Peer::spawn(&[
        "worker",
        s.pool_cap("linux").to_str().unwrap(),
        "w-ok",
        "1",
        "hb=200",
    ]);
    ok.expect("registered");
    for n in ["a", "b"] {
        let mut c = Peer::client(&alice, "linux", &format!("echo {n}"), "", "follow");
        assert_eq!(c.expect("result"), format!("result ok {n}"));
        assert_eq!(ok.expect("job"), format!("job w-ok echo {n} hint="));
    }
    assert_eq!(off.expect_within("job", Duration::from_millis(300)), None);
}

/// A job that carries secrets is never written to the scheduler's disk (it is not kept
/// across a restart, as in the original); the database is for the scheduler's user only.
#[test]
fn jobs_with_secrets_are_not_written_to_disk() {
    let mut s = Scheduler::start(&["linux"], &[]);
    let alice = s.add_client("alice");
    let secret = s.dir.path().join("secret");
    std::fs::write(&secret, "hunter2-the-secret-value").unwrap();
    let spec = s.dir.path().join("spec");
    std::fs::write(&spec, "echo with-a-secret").unwrap();
    let mut client = std::process::Command::new(env!("CARGO_BIN_EXE_ocluster-client"))
        .args(["submit-obuilder", "-c"])
        .arg(&alice)
        .args(["--pool", "linux", "--reconnect-for=0", "--secret"])
        .arg(format!("token:{}", secret.display()))
        .arg("--local-file")
        .arg(&spec)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _plain = Peer::client(&alice, "linux", "echo plain", "", "follow");
    common::wait_until(
        || backlog(&s.admin_ok(&["show", "linux"])).len() >= 2,
        String::new,
    );
    let state = s.state();
    let on_disk = || {
        let mut all = Vec::new();
        for e in std::fs::read_dir(&state).unwrap() {
            all.extend(std::fs::read(e.unwrap().path()).unwrap());
        }
        all
    };
    let bytes = on_disk();
    let has = |b: &[u8], what: &str| b.windows(what.len()).any(|w| w == what.as_bytes());
    assert!(has(&bytes, "echo plain"), "the plain job is kept");
    assert!(!has(&bytes, "hunter2"), "the secret is on disk");
    assert!(
        !has(&bytes, "with-a-secret"),
        "the job with a secret is on disk"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(state.join("scheduler.db"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    s.crash();
    let _ = client.kill();
    let _ = client.wait();
    s.restart();
    let show = s.admin_ok(&["show", "linux"]);
    assert_eq!(backlog(&show), ["alice:(no cache hint)"], "{show}");
}

/// The golden session's admin commands (`commands.txt`, the TLS run, up to the jobs),
/// as the original was run: each output, stderr's `Connecting to … OK` line and then
/// stdout, is the original's byte for byte but for the port.
#[test]
fn the_golden_admin_session_prints_what_the_original_printed() {
    let Some(golden) = common::replay::golden("tls") else {
        return;
    };
    let s = Scheduler::start(&["linux-x86_64"], &["--default-clients=alice"]);
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ocluster-admin"));
        // The verb first, then `-c`, as in the golden commands.
        cmd.arg(args[0])
            .arg("-c")
            .arg(s.admin_cap())
            .args(&args[1..]);
        let out = common::run_bounded(cmd);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        (stderr(&out), stdout(&out))
    };
    let expect = |file: &str| {
        std::fs::read_to_string(golden.join(file))
            .unwrap()
            .replace("127.0.0.1:9400", &format!("127.0.0.1:{}", s.port))
    };
    let both = |(e, o): (String, String)| format!("{e}{o}");
    let (err, bob) = run(&["add-client", "bob"]);
    assert_eq!(err, expect("add-client.stderr"));
    let bob_cap = bob.trim_end();
    assert!(bob_cap.starts_with("capnp://sha-256:"), "{bob}");
    assert_eq!(both(run(&["show"])), expect("show.txt"));
    assert_eq!(
        both(run(&["show", "linux-x86_64"])),
        expect("show-pool-initial.txt")
    );
    assert_eq!(both(run(&["list-clients"])), expect("list-clients.txt"));
    assert_eq!(
        both(run(&["set-rate", "linux-x86_64", "bob", "2.5"])),
        expect("set-rate.txt")
    );
    assert_eq!(
        both(run(&["show", "linux-x86_64"])),
        expect("show-pool-after-set-rate.txt")
    );
    let _w = Peer::worker(&s.pool_cap("linux-x86_64"), "worker-1", 1);
    common::wait_until(
        || {
            s.admin_ok(&["show", "linux-x86_64"])
                .contains("worker-1 (0)")
        },
        || "worker-1 did not register".into(),
    );
    assert_eq!(
        both(run(&["show", "linux-x86_64"])),
        expect("show-pool-with-worker.txt")
    );
    assert_eq!(
        both(run(&["show", "linux-x86_64", "worker-1"])),
        expect("show-worker.txt")
    );
}
