//! A worker and a client written for the tests. Each runs in its own process: the test
//! binary re-executes itself (`--exact peer`) with `OCLUSTER_TEST_PEER` naming the role,
//! and the role reports what happens as `PEER: ...` lines on stdout.
//!
//! The worker runs "jobs" whose OBuilder spec is a tiny script:
//! - `echo TEXT`: logs TEXT and succeeds with it as the result;
//! - `slowecho TEXT`: logs `started`, and a second later TEXT, and succeeds with it;
//! - `wait`: logs `waiting` and runs until it is cancelled or released;
//! - `spam N`: logs N bytes, then runs until it is cancelled or released;
//! - `sleep MS TEXT`: logs `started`, and MS ms later succeeds with TEXT, saying
//!   `done sleep MS TEXT`;
//! - `tick N`: logs `tick I` every 200 ms, N times, then succeeds with `ticked`;
//! - `fail`: fails with "Build failed".

use std::cell::RefCell;
use std::io::Write;
use std::rc::Rc;

use capnp::Error;
use ocluster_api::schema_capnp::{job, job_descr, queue, registration, submission, worker};
use ocluster_net::SecretKey;
use tokio::sync::Notify;

pub const ENV: &str = "OCLUSTER_TEST_PEER";

/// Prints a line for the test (errors as the sender wrote them: without the prefix the
/// receiving RPC layer adds).
pub fn say(line: impl std::fmt::Display) {
    let line = line.to_string().replace("remote exception: ", "");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "PEER: {line}");
    let _ = out.flush();
}

/// Runs the role that `OCLUSTER_TEST_PEER` names (fields separated by `|`), then exits.
pub fn main() {
    let Ok(role) = std::env::var(ENV) else { return };
    let args: Vec<String> = role.split('|').map(str::to_string).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    let code = local.block_on(&rt, async move {
        match args[0].as_str() {
            "worker" => {
                run_worker(
                    &args[1],
                    &args[2],
                    args[3].parse().unwrap(),
                    args.get(4).map(String::as_str).unwrap_or(""),
                )
                .await
            }
            "client" => run_client(&args[1..]).await,
            "resubmitter" => run_resubmitter(&args[1..]).await,
            other => panic!("unknown peer role {other}"),
        }
    });
    std::process::exit(code)
}

async fn connect(cap: &str) -> ocluster_net::vat::Connected {
    let sr = ocluster_net::capfile::read(std::path::Path::new(cap)).unwrap();
    let key = SecretKey::generate_ephemeral().unwrap();
    match ocluster_net::vat::connect(&sr, &key).await {
        Ok(c) => c,
        Err(e) => {
            say(format!("connect-error {e}"));
            std::process::exit(2)
        }
    }
}

// ---- worker ---------------------------------------------------------------------------------

#[derive(Default)]
struct JobState {
    spec: String,
    log: Vec<u8>,
    result: Option<Result<String, String>>,
    cancelled: bool,
    notify: Rc<Notify>,
}

impl JobState {
    fn append(&mut self, s: &str) {
        self.log.extend_from_slice(s.as_bytes());
        self.notify.notify_waiters();
    }
    fn finish(&mut self, r: Result<String, String>) {
        if self.result.is_none() {
            self.result = Some(r);
        }
        self.notify.notify_waiters();
    }
}

/// The worker-hosted `Job`. Its methods let go of `self` before they wait, so that the
/// release of the last reference drops it at once (which cancels, as the original's
/// `release` handler does).
struct TestJob {
    st: Rc<RefCell<JobState>>,
}

impl Drop for TestJob {
    fn drop(&mut self) {
        let mut st = self.st.borrow_mut();
        if st.result.is_none() && !st.spec.is_empty() {
            say(format!("released {}", st.spec));
            st.cancelled = true;
            st.finish(Err("Job released".into()));
        }
    }
}

impl job::Server for TestJob {
    async fn log(
        self: Rc<Self>,
        params: job::LogParams,
        mut results: job::LogResults,
    ) -> Result<(), Error> {
        let start = params.get()?.get_start();
        let st = self.st.clone();
        drop(self);
        loop {
            let notify = st.borrow().notify.clone();
            let changed = notify.notified();
            {
                let st = st.borrow();
                let len = st.log.len() as i64;
                let start = if start < 0 {
                    (len + start).max(0)
                } else {
                    start.min(len)
                };
                if start < len || st.result.is_some() {
                    let end = len.min(start + 10240);
                    let mut r = results.get();
                    r.set_log(&st.log[start as usize..end as usize]);
                    r.set_next(end);
                    return Ok(());
                }
            }
            changed.await;
        }
    }

    async fn result(
        self: Rc<Self>,
        _: job::ResultParams,
        mut results: job::ResultResults,
    ) -> Result<(), Error> {
        let st = self.st.clone();
        drop(self);
        loop {
            let notify = st.borrow().notify.clone();
            let changed = notify.notified();
            if let Some(r) = st.borrow().result.clone() {
                return match r {
                    Ok(out) => {
                        results.get().set_output(out.as_str());
                        Ok(())
                    }
                    Err(e) => Err(Error::failed(e)),
                };
            }
            changed.await;
        }
    }

    async fn cancel(
        self: Rc<Self>,
        _: job::CancelParams,
        _: job::CancelResults,
    ) -> Result<(), Error> {
        let mut st = self.st.borrow_mut();
        if st.result.is_none() {
            say(format!("cancelled {}", st.spec));
        }
        st.cancelled = true;
        st.finish(Err("Job cancelled".into()));
        Ok(())
    }
}

struct TestWorker {
    name: String,
}

impl worker::Server for TestWorker {
    async fn metrics(
        self: Rc<Self>,
        params: worker::MetricsParams,
        mut results: worker::MetricsResults,
    ) -> Result<(), Error> {
        let source = match params.get()?.get_source()? {
            worker::MetricsSource::Agent => "agent",
            worker::MetricsSource::Host => "host",
        };
        let mut r = results.get();
        r.set_content_type("text/plain; version=0.0.4");
        r.set_data(format!("test_worker_{source}{{name=\"{}\"}} 1\n", self.name).as_str());
        Ok(())
    }

    async fn self_update(
        self: Rc<Self>,
        _: worker::SelfUpdateParams,
        _: worker::SelfUpdateResults,
    ) -> Result<(), Error> {
        say("self-update");
        // Exit once the answer has gone, as a worker that restarts into a new binary.
        tokio::task::spawn_local(async {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            std::process::exit(0)
        });
        Ok(())
    }
}

async fn run_job(st: Rc<RefCell<JobState>>) {
    let spec = st.borrow().spec.clone();
    if let Some(text) = spec.strip_prefix("echo ") {
        st.borrow_mut().append(&format!("{text}\n"));
        st.borrow_mut().finish(Ok(text.to_string()));
    } else if let Some(text) = spec.strip_prefix("slowecho ") {
        st.borrow_mut().append("started\n");
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        st.borrow_mut().append(&format!("{text}\n"));
        st.borrow_mut().finish(Ok(text.to_string()));
    } else if let Some((ms, text)) = spec.strip_prefix("sleep ").and_then(|r| r.split_once(' ')) {
        st.borrow_mut().append("started\n");
        tokio::time::sleep(std::time::Duration::from_millis(ms.parse().unwrap())).await;
        if !st.borrow().cancelled {
            // Said before the result goes: once the client has it, the line is written.
            say(format!("done {spec}"));
            st.borrow_mut().finish(Ok(text.to_string()));
        }
    } else if let Some(n) = spec.strip_prefix("tick ") {
        for i in 0..n.parse::<u32>().unwrap() {
            if st.borrow().cancelled {
                return;
            }
            st.borrow_mut().append(&format!("tick {i}\n"));
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        st.borrow_mut().finish(Ok("ticked".into()));
    } else if let Some(n) = spec.strip_prefix("spam ") {
        // N bytes of log, then wait to be stopped.
        let n: usize = n.parse().unwrap();
        let line = "x".repeat(99) + "\n";
        for _ in 0..n / 100 {
            st.borrow_mut().append(&line);
        }
        loop {
            let notify = st.borrow().notify.clone();
            let changed = notify.notified();
            if st.borrow().cancelled {
                say(format!("cancelled {spec}"));
                break;
            }
            changed.await;
        }
    } else if spec == "wait" {
        st.borrow_mut().append("waiting\n");
        loop {
            let notify = st.borrow().notify.clone();
            let changed = notify.notified();
            if st.borrow().cancelled {
                break;
            }
            changed.await;
        }
    } else {
        st.borrow_mut().finish(Err("Build failed".into()));
    }
}

/// `options`: `hb=MS` sends a heartbeat every MS ms; `wedge` stops them (but keeps the
/// connection) once a job starts, as a wedged worker would; `skew=SECS` puts the clock
/// its heartbeats give off by SECS.
async fn run_worker(cap: &str, name: &str, capacity: i32, options: &str) -> i32 {
    let heartbeat = options
        .split(',')
        .find_map(|o| o.strip_prefix("hb="))
        .map(|ms| std::time::Duration::from_millis(ms.parse().unwrap()));
    let wedge = options.split(',').any(|o| o == "wedge");
    // skew=SECS: the heartbeats say the time is off by SECS.
    let skew: f64 = options
        .split(',')
        .find_map(|o| o.strip_prefix("skew="))
        .map_or(0.0, |s| s.parse().unwrap());
    let now = move || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
            + skew
    };
    let wedged = Rc::new(std::cell::Cell::new(false));
    let conn = connect(cap).await;
    let reg: registration::Client = capnp::capability::FromClientHook::new(conn.cap.hook);
    let mut r = reg.register_request();
    r.get().set_name(name);
    r.get().set_capacity(capacity);
    r.get().set_worker(capnp_rpc::new_client(TestWorker {
        name: name.to_string(),
    }));
    let queue: queue::Client = match r.send().promise.await {
        Ok(resp) => resp.get().unwrap().get_queue().unwrap(),
        Err(e) => {
            say(format!("register-error {}", e.extra));
            return 3;
        }
    };
    if heartbeat.is_some() {
        // The first heartbeat goes before "registered".
        let mut hb = queue.heartbeat_request();
        hb.get().set_time(now());
        hb.send().promise.await.unwrap();
    }
    say("registered");
    if let Some(every) = heartbeat {
        let (queue, wedged) = (queue.clone(), wedged.clone());
        tokio::task::spawn_local(async move {
            loop {
                if !wedged.get() {
                    let mut hb = queue.heartbeat_request();
                    hb.get().set_time(now());
                    if let Err(e) = hb.send().promise.await {
                        say(format!("heartbeat-error {}", e.extra));
                        return;
                    }
                }
                tokio::time::sleep(every).await;
            }
        });
    }
    let slots = (0..capacity).map(|_| {
        let queue = queue.clone();
        let name = name.to_string();
        let wedged = wedged.clone();
        async move {
            loop {
                let st = Rc::new(RefCell::new(JobState::default()));
                let mut pop = queue.pop_request();
                pop.get()
                    .set_job(capnp_rpc::new_client(TestJob { st: st.clone() }));
                let descr = match pop.send().promise.await {
                    Ok(d) => d,
                    Err(e) => {
                        say(format!("pop-error {}", e.extra));
                        return;
                    }
                };
                let descr = descr.get().unwrap().get_descr().unwrap();
                let spec = match descr.get_action().which().unwrap() {
                    job_descr::action::Obuilder(o) => {
                        o.unwrap().get_spec().unwrap().to_string().unwrap()
                    }
                    _ => "unsupported".into(),
                };
                let hint = descr.get_cache_hint().unwrap().to_string().unwrap();
                say(format!("job {name} {spec} hint={hint}"));
                if wedge {
                    // Wedged: no more heartbeats, and the job never ends.
                    wedged.set(true);
                    std::future::pending::<()>().await;
                }
                st.borrow_mut().spec = spec;
                run_job(st).await;
            }
        }
    });
    tokio::select! {
        _ = futures::future::join_all(slots) => {}
        _ = conn.driver => say("disconnected"),
    }
    0
}

// ---- client ---------------------------------------------------------------------------------

/// `client|CAP|POOL|SPEC|HINT|URGENT|ACTION`, where ACTION is one of `follow` (print the
/// log and the result), `cancel-on-start`, `drop-on-start`, `exit-on-start`, and
/// `cancel-queued` and `exit-queued` (once the ticket has come), `again-after:PATH`
/// (follow a job, then submit it again on the same connection once PATH exists), and
/// `ocurrent` (as OCurrent's plugin: say `queued` once the ticket has come and `settled`
/// once the job has, then let go of the ticket and follow the job).
async fn run_client(args: &[String]) -> i32 {
    let [cap, pool, spec, hint, urgent, action] = args else {
        panic!("client: bad arguments {args:?}")
    };
    let conn = connect(cap).await;
    let sub: submission::Client = capnp::capability::FromClientHook::new(conn.cap.hook);
    if let Some(path) = action.strip_prefix("again-after:") {
        // Two jobs on one connection, the second once PATH exists.
        let code = submit(&sub, pool, spec, hint, urgent, "follow").await;
        say(format!("first-done {code}"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !std::path::Path::new(path).exists() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        return submit(&sub, pool, spec, hint, urgent, "follow").await;
    }
    submit(&sub, pool, spec, hint, urgent, action).await
}

async fn submit(
    sub: &submission::Client,
    pool: &str,
    spec: &str,
    hint: &str,
    urgent: &str,
    action: &str,
) -> i32 {
    let mut r = sub.submit_request();
    r.get().set_pool(pool);
    r.get().set_urgent(urgent == "urgent");
    {
        let mut d = r.get().init_descr();
        d.set_cache_hint(hint);
        d.reborrow().init_action().init_obuilder().set_spec(spec);
    }
    let capnp::capability::RemotePromise {
        promise: submitted,
        pipeline,
    } = r.send();
    let ticket = pipeline.get_ticket();
    let mut submitted = Some(submitted);
    if let Some(what) = action.strip_suffix("-queued") {
        // Wait for the ticket, so that the job is queued at the scheduler.
        if let Err(e) = submitted.take().unwrap().await {
            say(format!("result error {}", e.extra));
            return 1;
        }
        say("queued");
        if what == "exit" {
            std::process::exit(0)
        }
        ticket.cancel_request().send().promise.await.unwrap();
    }
    let capnp::capability::RemotePromise {
        promise: asked,
        pipeline: job_pipeline,
    } = ticket.job_request().send();
    let job = job_pipeline.get_job();
    drop(job_pipeline);
    let (ticket, submitted, pipeline) = if action == "ocurrent" {
        if let Err(e) = submitted.take().unwrap().await {
            say(format!("result error {}", e.extra));
            return 1;
        }
        say("queued");
        let settled = async {
            let r = asked.await?;
            let job = r.get()?.get_job()?;
            job.client.when_resolved().await
        };
        if let Err(e) = settled.await {
            say(format!("result error {}", e.extra));
            return 1;
        }
        say("settled");
        drop((ticket, pipeline));
        (None, None, None)
    } else {
        drop(asked);
        (Some(ticket), submitted, Some(pipeline))
    };
    let result = job.result_request().send().promise;
    if action == "fickle" {
        // Calls on the queued job, each given up (capnp-rpc sends `Finish`) before the
        // job starts: the scheduler keeps them in the job until then.
        for _ in 0..100 {
            let mut l = job.log_request();
            l.get().set_start(0);
            let p = l.send().promise;
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            drop(p);
        }
        say("fickle-done");
    }
    let mut start = 0;
    let mut started = false;
    loop {
        let mut l = job.log_request();
        l.get().set_start(start);
        let resp = match l.send().promise.await {
            Ok(r) => r,
            Err(e) => {
                say(format!("log-error {}", e.extra));
                break;
            }
        };
        let (data, next) = {
            let r = resp.get().unwrap();
            (r.get_log().unwrap().to_vec(), r.get_next())
        };
        drop(resp);
        if data.is_empty() {
            break;
        }
        start = next;
        for line in String::from_utf8_lossy(&data).lines() {
            say(format!("log {line}"));
        }
        if !started {
            started = true;
            match action {
                "cancel-on-start" => {
                    let ticket = ticket.as_ref().unwrap();
                    ticket.cancel_request().send().promise.await.unwrap();
                    say("cancel-sent");
                }
                "drop-on-start" => {
                    drop((submitted, pipeline, ticket, job, result));
                    say("dropped");
                    // Keep the connection open: the release must be what cancels.
                    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                    return 0;
                }
                "exit-on-start" => {
                    say("exiting");
                    std::process::exit(0)
                }
                _ => {}
            }
        }
    }
    match result.await {
        Ok(r) => {
            let out = r.get().unwrap().get_output().unwrap().to_string().unwrap();
            say(format!("result ok {out}"));
            0
        }
        Err(e) => {
            say(format!("result error {}", e.extra));
            1
        }
    }
}

// ---- a client that submits again, as the OCurrent plugin does --------------------------------

/// `resubmitter|CAP|POOL|N|MS`: submits N jobs `sleep MS job-I` (hints `hI%5`) at once
/// and follows each to its result. When the scheduler goes away it reconnects (every
/// 100 ms, for up to 2 minutes) and submits again each job that has no result yet, as
/// the OCurrent plugin does. Says `result job-I` once per result, then `all-done`.
async fn run_resubmitter(args: &[String]) -> i32 {
    let [cap, pool, n, ms] = args else {
        panic!("resubmitter: bad arguments {args:?}")
    };
    let n: usize = n.parse().unwrap();
    let sr = ocluster_net::capfile::read(std::path::Path::new(cap)).unwrap();
    let key = Rc::new(SecretKey::generate_ephemeral().unwrap());
    // The current connection, and its generation (a job that saw generation g fail asks
    // for g + 1; only the first asker reconnects).
    let conn: Rc<RefCell<(u64, Option<submission::Client>)>> = Rc::new(RefCell::new((0, None)));
    let connecting = Rc::new(tokio::sync::Mutex::new(()));
    let get = {
        let conn = conn.clone();
        move |seen: u64| {
            let conn = conn.clone();
            let connecting = connecting.clone();
            let sr = sr.clone();
            let key = key.clone();
            async move {
                let _g = connecting.lock().await;
                {
                    let c = conn.borrow();
                    if c.0 > seen {
                        if let Some(s) = &c.1 {
                            return (c.0, s.clone());
                        }
                    }
                }
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
                loop {
                    match ocluster_net::vat::connect(&sr, &key).await {
                        Ok(c) => {
                            let sub: submission::Client =
                                capnp::capability::FromClientHook::new(c.cap.hook);
                            drop(c.driver);
                            let mut cc = conn.borrow_mut();
                            cc.0 += 1;
                            cc.1 = Some(sub.clone());
                            return (cc.0, sub);
                        }
                        Err(e) if std::time::Instant::now() > deadline => {
                            say(format!("connect-error {e}"));
                            std::process::exit(2)
                        }
                        Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
                    }
                }
            }
        }
    };
    let jobs = (0..n).map(|i| {
        let get = get.clone();
        async move {
            let spec = format!("sleep {ms} job-{i}");
            let mut seen = 0;
            loop {
                let (generation, sub) = get(seen).await;
                seen = generation;
                let mut r = sub.submit_request();
                r.get().set_pool(pool);
                {
                    let mut d = r.get().init_descr();
                    d.set_cache_hint(format!("h{}", i % 5));
                    d.reborrow().init_action().init_obuilder().set_spec(&spec);
                }
                let ticket = r.send().pipeline.get_ticket();
                let job = ticket.job_request().send().pipeline.get_job();
                match job.result_request().send().promise.await {
                    Ok(r) => {
                        let out = r.get().unwrap().get_output().unwrap().to_string().unwrap();
                        say(format!("result {out}"));
                        return;
                    }
                    Err(e) if e.kind == capnp::ErrorKind::Disconnected => {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                    Err(e) => {
                        say(format!("result-error job-{i} {}", e.extra));
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        }
    });
    futures::future::join_all(jobs).await;
    say("all-done");
    0
}
