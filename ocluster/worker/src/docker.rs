//! Dockerfile jobs (reference/ocluster.md §3.3), run with a Docker-compatible CLI named by
//! the worker's `--docker-cli`: `docker`, or `buildah`/`podman` (no daemon needed).
//!
//! `build --pull --iidfile F -f DOCKERFILE CONTEXT` with the job's build args, secrets (as
//! files in a private directory), `--squash`; then, if the job asks and the worker allows
//! the repository, a push whose `repo@sha256:…` digest is the job's result. Registry
//! credentials go into a throw-away config directory (`DOCKER_CONFIG` and
//! `REGISTRY_AUTH_FILE`), never into the user's.

use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;

use obuilder_engine::exec::{Cmd, SharedExec};
use obuilder_engine::CancellationToken;
use tokio::io::AsyncReadExt;

use crate::{JobLog, JobResult};

/// How to drive the CLI.
#[derive(Debug, Clone)]
pub struct DockerCli {
    pub program: String,
    /// Registries reached over plain HTTP (`--insecure-registry`).
    pub insecure: Vec<String>,
}

impl DockerCli {
    /// buildah and podman push with `--digestfile`; docker prints the digest.
    fn is_buildah_like(&self) -> bool {
        let base = Path::new(&self.program)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("");
        base.contains("buildah") || base.contains("podman")
    }
}

/// What a `dockerBuild` job asks for.
#[derive(Debug, Clone, Default)]
pub struct DockerJob {
    /// The Dockerfile's text, or its path inside the context.
    pub contents: Option<String>,
    pub path: Option<String>,
    pub push_target: String,
    pub push_user: String,
    pub push_password: String,
    pub build_args: Vec<String>,
    pub squash: bool,
    pub buildkit: bool,
    pub secrets: Vec<(String, Vec<u8>)>,
}

/// A Dockerfile path inside the context: relative, no `..`, every directory on the way a
/// real directory and the file a regular file (no symlinks out of the context).
pub fn check_dockerfile_path(ctx: &Path, path: &str) -> Result<PathBuf, String> {
    let p = Path::new(path);
    if path.is_empty() || path == "-" || p.is_absolute() {
        return Err(format!(
            "Dockerfile path {path:?} must be relative to the context"
        ));
    }
    let mut at = ctx.to_path_buf();
    let parts: Vec<Component> = p.components().collect();
    for (i, c) in parts.iter().enumerate() {
        let Component::Normal(name) = c else {
            return Err(format!("Dockerfile path {path:?} may not contain {c:?}"));
        };
        at.push(name);
        let meta =
            std::fs::symlink_metadata(&at).map_err(|e| format!("Dockerfile path {path:?}: {e}"))?;
        let last = i + 1 == parts.len();
        if (last && !meta.is_file()) || (!last && !meta.is_dir()) {
            return Err(format!(
                "Dockerfile path {path:?}: {} is not a regular {}",
                at.display(),
                if last { "file" } else { "directory" }
            ));
        }
    }
    Ok(at)
}

/// The repository of a push target (`host:5000/repo:tag` → `host:5000/repo`).
pub fn repository_of(target: &str) -> &str {
    let target = target.split('@').next().unwrap_or(target);
    match target.rfind(':') {
        Some(i) if !target[i..].contains('/') => &target[..i],
        _ => target,
    }
}

fn registry_of(repo: &str) -> &str {
    repo.split('/').next().unwrap_or(repo)
}

enum Step {
    Done(Vec<u8>),
    Cancelled,
    Failed(String),
}

/// Runs `argv` with `env`, its output into the log; killed on cancel.
async fn run_logged(
    exec: &SharedExec,
    env: &[(String, String)],
    argv: Vec<String>,
    stdin: Option<&[u8]>,
    log: &JobLog,
    cancel: &CancellationToken,
) -> Step {
    let mut full = vec!["env".to_string()];
    full.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
    full.extend(argv);
    let cmd = Cmd::new(full);
    let mut child = match exec.spawn(
        &cmd,
        if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        },
        Stdio::piped(),
        Stdio::piped(),
    ) {
        Ok(c) => c,
        Err(e) => return Step::Failed(e.to_string()),
    };
    if let (Some(data), Some(mut w)) = (stdin, child.stdin.take()) {
        use tokio::io::AsyncWriteExt;
        let _ = w.write_all(data).await;
        drop(w);
    }
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let mut captured = Vec::new();
    let pump = async {
        let (mut a, mut b) = ([0u8; 8192], [0u8; 8192]);
        let (mut out_open, mut err_open) = (true, true);
        while out_open || err_open {
            tokio::select! {
                n = out.read(&mut a), if out_open => match n {
                    Ok(0) | Err(_) => out_open = false,
                    Ok(n) => { log.write(&a[..n]); captured.extend_from_slice(&a[..n]); }
                },
                n = err.read(&mut b), if err_open => match n {
                    Ok(0) | Err(_) => err_open = false,
                    Ok(n) => log.write(&b[..n]),
                },
            }
        }
    };
    tokio::select! {
        _ = pump => {}
        _ = cancel.cancelled() => {
            let _ = child.kill().await;
            return Step::Cancelled;
        }
    }
    match child.wait().await {
        Ok(st) if st.success() => Step::Done(captured),
        Ok(st) => Step::Failed(format!("{} failed ({st})", cmd.display())),
        Err(e) => Step::Failed(e.to_string()),
    }
}

/// Builds (and pushes) in `ctx`. `allow_push` lists the repositories a push may go to.
pub async fn run(
    cli: &DockerCli,
    exec: &SharedExec,
    job: DockerJob,
    ctx: &Path,
    allow_push: &[String],
    log: &JobLog,
    cancel: &CancellationToken,
) -> JobResult {
    macro_rules! step {
        ($e:expr) => {
            match $e {
                Step::Done(out) => out,
                Step::Cancelled => return JobResult::Cancelled,
                Step::Failed(msg) => return JobResult::Failed(msg),
            }
        };
    }
    let push = !job.push_target.is_empty();
    let repo = repository_of(&job.push_target).to_string();
    if push && !allow_push.contains(&repo) {
        return JobResult::Failed(format!(
            "Push to {repo:?} is not allowed by this worker (--allow-push: {})",
            if allow_push.is_empty() {
                "none".to_string()
            } else {
                allow_push.join(", ")
            }
        ));
    }
    let dockerfile = match (&job.contents, &job.path) {
        (Some(text), _) => {
            let p = ctx.join("Dockerfile");
            if let Err(e) = std::fs::write(&p, text) {
                return JobResult::Failed(format!("cannot write the Dockerfile: {e}"));
            }
            p
        }
        (None, Some(path)) => match check_dockerfile_path(ctx, path) {
            Ok(p) => p,
            Err(e) => return JobResult::Failed(e),
        },
        (None, None) => match check_dockerfile_path(ctx, "Dockerfile") {
            Ok(p) => p,
            Err(e) => return JobResult::Failed(e),
        },
    };
    // Private files: the image id, the secrets, the credentials, the registries.
    let private = match tempfile::Builder::new().prefix("docker-job-").tempdir() {
        Ok(d) => d,
        Err(e) => return JobResult::Failed(format!("cannot make a private directory: {e}")),
    };
    let _ = std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700));
    let config = private.path().join("config");
    let _ = std::fs::create_dir(&config);
    // buildah wants the auth file to exist; docker reads config.json.
    for f in ["auth.json", "config.json"] {
        let _ = std::fs::write(config.join(f), "{\"auths\":{}}\n");
    }
    let mut env = vec![
        ("DOCKER_CONFIG".to_string(), config.display().to_string()),
        (
            "REGISTRY_AUTH_FILE".to_string(),
            config.join("auth.json").display().to_string(),
        ),
    ];
    if !cli.insecure.is_empty() {
        let conf: String = cli
            .insecure
            .iter()
            .map(|r| format!("[[registry]]\nlocation = {r:?}\ninsecure = true\n\n"))
            .collect();
        let path = config.join("registries.conf");
        if let Err(e) = std::fs::write(&path, conf) {
            return JobResult::Failed(format!("cannot write {}: {e}", path.display()));
        }
        env.push((
            "CONTAINERS_REGISTRIES_CONF".to_string(),
            path.display().to_string(),
        ));
    }
    if job.buildkit {
        env.push(("DOCKER_BUILDKIT".to_string(), "1".to_string()));
    }
    let iidfile = private.path().join("iid");
    let mut argv = vec![cli.program.clone(), "build".to_string()];
    for a in &job.build_args {
        argv.push("--build-arg".into());
        argv.push(a.clone());
    }
    if job.squash {
        argv.push("--squash".into());
    }
    for (i, (id, value)) in job.secrets.iter().enumerate() {
        let f = private.path().join(format!("secret-{i}"));
        if let Err(e) = std::fs::write(&f, value) {
            return JobResult::Failed(format!("cannot write secret {id:?}: {e}"));
        }
        let _ = std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600));
        argv.push("--secret".into());
        argv.push(format!("id={id},src={}", f.display()));
    }
    argv.extend([
        "--pull".to_string(),
        "--iidfile".to_string(),
        iidfile.display().to_string(),
        "-f".to_string(),
        dockerfile.display().to_string(),
        ctx.display().to_string(),
    ]);
    step!(run_logged(exec, &env, argv, None, log, cancel).await);
    let iid = match std::fs::read_to_string(&iidfile) {
        Ok(s) => s.trim().to_string(),
        Err(e) => return JobResult::Failed(format!("the build wrote no image id: {e}")),
    };
    if !push {
        return JobResult::Ok(iid);
    }
    if !job.push_user.is_empty() {
        let argv = vec![
            cli.program.clone(),
            "login".to_string(),
            "--username".to_string(),
            job.push_user.clone(),
            "--password-stdin".to_string(),
            registry_of(&repo).to_string(),
        ];
        step!(
            run_logged(
                exec,
                &env,
                argv,
                Some(job.push_password.as_bytes()),
                log,
                cancel
            )
            .await
        );
    }
    let digest = if cli.is_buildah_like() {
        let digestfile = private.path().join("digest");
        let argv = vec![
            cli.program.clone(),
            "push".to_string(),
            "--digestfile".to_string(),
            digestfile.display().to_string(),
            iid.clone(),
            format!("docker://{}", job.push_target),
        ];
        step!(run_logged(exec, &env, argv, None, log, cancel).await);
        std::fs::read_to_string(&digestfile)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    } else {
        let tag = vec![
            cli.program.clone(),
            "tag".to_string(),
            iid.clone(),
            job.push_target.clone(),
        ];
        step!(run_logged(exec, &env, tag, None, log, cancel).await);
        let argv = vec![
            cli.program.clone(),
            "push".to_string(),
            job.push_target.clone(),
        ];
        let out = step!(run_logged(exec, &env, argv, None, log, cancel).await);
        String::from_utf8_lossy(&out)
            .split_whitespace()
            .find(|w| w.starts_with("sha256:"))
            .unwrap_or("")
            .to_string()
    };
    if !digest.starts_with("sha256:") {
        return JobResult::Failed(format!(
            "pushed {}, but the CLI gave no digest",
            job.push_target
        ));
    }
    JobResult::Ok(format!("{repo}@{digest}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_of_targets() {
        assert_eq!(repository_of("127.0.0.1:5000/app:v1"), "127.0.0.1:5000/app");
        assert_eq!(repository_of("127.0.0.1:5000/app"), "127.0.0.1:5000/app");
        assert_eq!(repository_of("org/app:latest"), "org/app");
        assert_eq!(registry_of("127.0.0.1:5000/app"), "127.0.0.1:5000");
    }

    #[test]
    fn dockerfile_paths_stay_in_the_context() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/Dockerfile"), "FROM x\n").unwrap();
        std::os::unix::fs::symlink("/etc", d.path().join("out")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("link")).unwrap();
        assert!(check_dockerfile_path(d.path(), "sub/Dockerfile").is_ok());
        for bad in [
            "",
            "-",
            "/etc/passwd",
            "../x",
            "sub/../sub/Dockerfile",
            "out/passwd",
            "link",
            "sub",
        ] {
            assert!(check_dockerfile_path(d.path(), bad).is_err(), "{bad}");
        }
    }
}
