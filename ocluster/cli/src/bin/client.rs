//! `ocluster-client`: submits a job to a scheduler and follows it (reference/ocluster.md
//! §4.3): prints `Tailing log:`, streams the log live, then `Result: "…"`. Exits 1 if the
//! job fails; Ctrl-C cancels the job.
//!
//! If the scheduler goes away mid-job, the client connects again and submits the same
//! job: a scheduler of ours kept it (queued or running jobs survive its restart) and
//! hands that same job back rather than running it twice.

use std::path::PathBuf;

use clap::{Args as ClapArgs, Parser, Subcommand};
use ocluster::{connect, error_text, init_logging, load_cap, Verbosity};
use ocluster_api::schema_capnp::{job_descr, submission, ticket};

/// Submit jobs to an OCluster scheduler.
#[derive(Parser, Debug)]
#[command(name = "ocluster-client", version)]
struct Args {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    verbosity: Verbosity,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Submit an OBuilder spec.
    SubmitObuilder {
        #[command(flatten)]
        common: Common,
        /// The spec to build.
        #[arg(long, value_name = "FILE")]
        local_file: PathBuf,
    },
    /// Submit a Dockerfile build.
    SubmitDocker {
        #[command(flatten)]
        common: Common,
        /// A Dockerfile on this machine, sent with the job.
        #[arg(long, value_name = "PATH", conflicts_with = "context_dockerfile")]
        local_dockerfile: Option<PathBuf>,
        /// A Dockerfile inside the build context (default: Dockerfile).
        #[arg(long, value_name = "PATH")]
        context_dockerfile: Option<String>,
        /// Push the result to REPO:TAG.
        #[arg(long, value_name = "REPO:TAG")]
        push_to: Option<String>,
        /// The registry user for the push.
        #[arg(long, value_name = "USER")]
        push_user: Option<String>,
        /// A file whose first line is the registry password.
        #[arg(long, value_name = "FILE")]
        push_password: Option<PathBuf>,
        /// A --build-arg for the build, repeatable.
        #[arg(long, value_name = "ARG")]
        build_arg: Vec<String>,
        #[arg(long)]
        squash: bool,
        #[arg(long)]
        buildkit: bool,
        /// Keep .git in the build context.
        #[arg(long)]
        include_git: bool,
    },
}

#[derive(ClapArgs, Debug)]
struct Common {
    /// The client's submission cap file.
    #[arg(short = 'c', long = "connect", value_name = "FILE")]
    connect: PathBuf,
    /// The pool to build on.
    #[arg(long, value_name = "ID")]
    pool: String,
    /// Jobs with the same hint go to the same workers when they can.
    #[arg(long, value_name = "HINT", default_value = "")]
    cache_hint: String,
    /// Ahead of every non-urgent job (the same as --priority urgent).
    #[arg(long, conflicts_with = "priority")]
    urgent: bool,
    /// How soon the job runs: background, low, normal, high or urgent (or 0-4); higher
    /// first. An OCaml scheduler knows only urgent or not: above normal is sent as urgent.
    #[arg(long, value_name = "LEVEL", value_parser = parse_priority)]
    priority: Option<u8>,
    /// When the scheduler goes away mid-job, keep trying to reach it again for this many
    /// seconds (then submit the job again, which gives back the same job); 0 to give
    /// up at once, as the original does.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    reconnect_for: u64,
    /// A secret for the build: ID:FILE (the whole file), repeatable.
    #[arg(long, value_name = "ID:FILE")]
    secret: Vec<String>,
    /// The Git repository of the build context, then one or more full commit hashes
    /// (merged in order).
    #[arg(value_name = "URL")]
    repository: Option<String>,
    #[arg(value_name = "HASH")]
    commits: Vec<String>,
}

fn parse_priority(s: &str) -> Result<u8, String> {
    const NAMES: [&str; 5] = ["background", "low", "normal", "high", "urgent"];
    NAMES
        .iter()
        .position(|n| *n == s)
        .or_else(|| s.parse::<usize>().ok().filter(|n| *n < NAMES.len()))
        .map(|n| n as u8)
        .ok_or_else(|| format!("expected one of {} or 0-4", NAMES.join(", ")))
}

/// `normal`, the level of a job that is not urgent.
const NORMAL: u8 = 2;

fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("{msg}");
    std::process::exit(1)
}

fn read(path: &std::path::Path, what: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| die(format!("{what} {}: {e}", path.display())))
}

/// How the original prints a Cap'n Proto error: `Failed: REASON.`
fn show(e: &capnp::Error) -> String {
    let kind = match e.kind {
        capnp::ErrorKind::Disconnected => "Disconnected",
        capnp::ErrorKind::Overloaded => "Overloaded",
        capnp::ErrorKind::Unimplemented => "Unimplemented",
        _ => "Failed",
    };
    format!("{kind}: {}.", error_text(e))
}

fn main() {
    cli_docs::generate_if_asked(<Args as clap::CommandFactory>::command);
    let args = Args::parse();
    init_logging(&args.verbosity);
    let common = match &args.command {
        Command::SubmitObuilder { common, .. } | Command::SubmitDocker { common, .. } => common,
    };
    if let (Some(repo), true) = (&common.repository, common.commits.is_empty()) {
        die(format!("No commits requested from repository {repo:?}!"))
    }
    let mut secrets = Vec::new();
    for s in &common.secret {
        let Some((id, file)) = s.split_once(':') else {
            die(format!("--secret {s:?}: expected ID:FILE"))
        };
        secrets.push((id.to_string(), read(std::path::Path::new(file), "--secret")));
    }
    let sr = load_cap(&common.connect).unwrap_or_else(|e| die(e));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| die(e));
    let local = tokio::task::LocalSet::new();
    let fill = |mut d: job_descr::Builder<'_>| {
        d.set_cache_hint(common.cache_hint.as_str());
        if let Some(repo) = &common.repository {
            d.set_repository(repo.as_str());
        }
        let mut c = d.reborrow().init_commits(common.commits.len() as u32);
        for (i, h) in common.commits.iter().enumerate() {
            c.set(i as u32, h.as_str());
        }
        let mut s = d.reborrow().init_secrets(secrets.len() as u32);
        for (i, (id, value)) in secrets.iter().enumerate() {
            let mut e = s.reborrow().get(i as u32);
            e.set_id(id.as_str());
            e.set_value(value.as_str());
        }
        fill_action(&args.command, d.init_action());
    };
    let code = local.block_on(&rt, async {
        let mut conn = connect(&sr).await.unwrap_or_else(|e| die(e));
        loop {
            let sub: submission::Client =
                capnp::capability::FromClientHook::new(conn.cap.hook.add_ref());
            let ticket = submit(&sub, common, &fill).await;
            match follow(&ticket).await {
                Ok(code) => return code,
                Err(e) if common.reconnect_for > 0 && !alive(&sub).await => {
                    eprintln!(
                        "Lost the scheduler ({}); connecting again to submit the job again \
                         (the scheduler kept it, so it is the same job)…",
                        show(&e).trim_end_matches('.')
                    );
                    conn = reconnect(&sr, common.reconnect_for).await;
                    println!("--- the job's log, from its start as the scheduler has it ---");
                }
                Err(e) => {
                    println!("{}", show(&e));
                    return 1;
                }
            }
        }
    });
    std::process::exit(code)
}

fn fill_action(cmd: &Command, a: job_descr::action::Builder<'_>) {
    match cmd {
        Command::SubmitObuilder { local_file, .. } => {
            a.init_obuilder()
                .set_spec(read(local_file, "--local-file").as_str());
        }
        Command::SubmitDocker {
            local_dockerfile,
            context_dockerfile,
            push_to,
            push_user,
            push_password,
            build_arg,
            squash,
            buildkit,
            include_git,
            ..
        } => {
            let mut d = a.init_docker_build();
            match local_dockerfile {
                Some(p) => d
                    .reborrow()
                    .init_dockerfile()
                    .set_contents(read(p, "--local-dockerfile").as_str()),
                None => d
                    .reborrow()
                    .init_dockerfile()
                    .set_path(context_dockerfile.as_deref().unwrap_or("Dockerfile")),
            }
            if let Some(t) = push_to {
                d.set_push_target(t.as_str());
            }
            if let Some(u) = push_user {
                d.set_push_user(u.as_str());
            }
            if let Some(p) = push_password {
                let pw = read(p, "--push-password");
                d.set_push_password(pw.lines().next().unwrap_or(""));
            }
            let mut l = d.reborrow().init_build_args(build_arg.len() as u32);
            for (i, b) in build_arg.iter().enumerate() {
                l.set(i as u32, b.as_str());
            }
            d.set_squash(*squash);
            d.set_buildkit(*buildkit);
            d.set_include_git(*include_git);
        }
    }
}

/// Submits the job; with a priority, through this implementation's `submitWithPriority`,
/// falling back to `submit` for a scheduler that does not have it.
async fn submit(
    sub: &submission::Client,
    common: &Common,
    fill: &dyn Fn(job_descr::Builder<'_>),
) -> ticket::Client {
    let plain = |urgent: bool| {
        let mut r = sub.submit_request();
        let mut p = r.get();
        p.set_pool(common.pool.as_str());
        p.set_urgent(urgent);
        fill(p.init_descr());
        r.send().pipeline.get_ticket()
    };
    let Some(level) = common.priority else {
        return plain(common.urgent);
    };
    let mut r = sub.submit_with_priority_request();
    let mut p = r.get();
    p.set_pool(common.pool.as_str());
    p.set_priority(level);
    fill(p.init_descr());
    match r.send().promise.await {
        Ok(resp) => match resp.get().and_then(|r| r.get_ticket()) {
            Ok(t) => t,
            Err(e) => capnp::capability::FromClientHook::new(capnp_rpc::new_broken_cap(e).hook),
        },
        Err(e) if e.kind == capnp::ErrorKind::Unimplemented => {
            tracing::info!("the scheduler has no priority levels: submitting with urgent");
            plain(level > NORMAL)
        }
        Err(e) => capnp::capability::FromClientHook::new(capnp_rpc::new_broken_cap(e).hook),
    }
}

/// Follows the job's log to its end and prints its result: the exit code, or the error
/// that lost the scheduler (to connect again).
async fn follow(ticket: &ticket::Client) -> Result<i32, capnp::Error> {
    let job = ticket.job_request().send().pipeline.get_job();
    let result = job.result_request().send().promise;
    println!("Tailing log:");
    let log = async {
        let mut start = 0i64;
        loop {
            let mut l = job.log_request();
            l.get().set_start(start);
            let resp = match l.send().promise.await {
                Ok(r) => r,
                Err(e) if e.kind == capnp::ErrorKind::Disconnected => return Err(e),
                Err(e) => {
                    println!("Error tailing logs: {}", show(&e).trim_end_matches('.'));
                    return Ok(());
                }
            };
            let Ok(r) = resp.get() else { return Ok(()) };
            let data = r.get_log().unwrap_or_default();
            if data.is_empty() {
                return Ok(());
            }
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(data);
            let _ = out.flush();
            start = r.get_next();
        }
    };
    let mut log = std::pin::pin!(log);
    tokio::select! {
        r = &mut log => r?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("Cancelling job… (Ctrl-C again to stop waiting)");
            if let Err(e) = ticket.cancel_request().send().promise.await {
                eprintln!("cannot cancel: {}", show(&e));
            }
            // Show the end of the log ("Job cancelled").
            tokio::select! {
                _ = &mut log => {}
                _ = tokio::signal::ctrl_c() => std::process::exit(130),
            }
        }
    }
    match result.await {
        Ok(r) => {
            let out = r
                .get()
                .and_then(|r| r.get_output())
                .ok()
                .and_then(|t| t.to_string().ok())
                .unwrap_or_default();
            if !out.is_empty() {
                println!("Result: {out:?}");
            }
            Ok(0)
        }
        Err(e) if e.kind == capnp::ErrorKind::Disconnected => Err(e),
        Err(e) => {
            println!("{}", show(&e));
            Ok(1)
        }
    }
}

/// Whether the scheduler still answers on this connection. A job's error of the kind
/// "disconnected" may be its worker's (the scheduler relays it), not the scheduler's.
async fn alive(sub: &submission::Client) -> bool {
    let p: ocluster_api::persistent::Client =
        capnp::capability::FromClientHook::new(sub.client.hook.add_ref());
    let probe = p.save_request().send().promise;
    match tokio::time::timeout(std::time::Duration::from_secs(10), probe).await {
        Ok(Err(e)) => e.kind != capnp::ErrorKind::Disconnected,
        Ok(Ok(_)) => true,
        Err(_) => false,
    }
}

/// Connects again, trying every second for `secs` seconds.
async fn reconnect(sr: &ocluster_net::SturdyRef, secs: u64) -> ocluster_net::vat::Connected {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        match connect(sr).await {
            Ok(c) => return c,
            Err(e) if std::time::Instant::now() > deadline => die(format!(
                "gave up reaching the scheduler after {secs} s: {e}"
            )),
            Err(_) => {}
        }
    }
}
