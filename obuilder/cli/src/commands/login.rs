//! `obuilder login|logout REGISTRY`: credentials for pulls and pushes, kept in the Docker
//! config (`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`), which docker, podman
//! and skopeo read too.

use std::io::{BufRead, IsTerminal};
use std::process::ExitCode;

use obuilder_fetch::credentials::{base64, docker_config_path, normalize_host, store_docker_auth};
use obuilder_fetch::registry::{Registry, RegistryOptions};

use super::process::usage;

#[derive(clap::Args)]
pub struct LoginArgs {
    /// The registry: `HOST[:PORT]` (`docker.io` for Docker Hub).
    #[arg(value_name = "REGISTRY")]
    registry: String,
    /// The user name (asked for on a terminal if not given).
    #[arg(short, long)]
    username: Option<String>,
    /// Read the password (or token) from standard input, as CI does.
    #[arg(long)]
    password_stdin: bool,
    /// A registry (`HOST` or `HOST:PORT`) to reach over plain HTTP. Repeatable.
    #[arg(
        long = "insecure-registry",
        value_name = "HOST[:PORT]",
        env = "OBUILDER_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    insecure: Vec<String>,
}

#[derive(clap::Args)]
pub struct LogoutArgs {
    /// The registry whose credentials to forget.
    #[arg(value_name = "REGISTRY")]
    registry: String,
}

fn read_line(prompt: &str) -> anyhow::Result<String> {
    eprint!("{prompt}");
    let mut s = String::new();
    std::io::stdin().lock().read_line(&mut s)?;
    Ok(s.trim_end_matches(['\r', '\n']).to_string())
}

pub async fn login(a: LoginArgs) -> anyhow::Result<ExitCode> {
    let host = normalize_host(&a.registry);
    let tty = std::io::stdin().is_terminal();
    let user = match a.username {
        Some(u) => u,
        None if tty && !a.password_stdin => read_line("Username: ")?,
        None => return Err(usage("give --username (standard input is not a terminal)")),
    };
    let password = if a.password_stdin || !tty {
        let mut s = String::new();
        std::io::stdin().lock().read_line(&mut s)?;
        s.trim_end_matches(['\r', '\n']).to_string()
    } else {
        // (No echo control without a terminal library: say so rather than pretend.)
        read_line("Password (shown as typed; use --password-stdin to avoid that): ")?
    };
    if user.is_empty() || password.is_empty() {
        return Err(usage("an empty user name or password"));
    }
    let basic = base64(format!("{user}:{password}").as_bytes());
    let registry = Registry::new(RegistryOptions {
        insecure: a.insecure,
        ..RegistryOptions::default()
    });
    registry.check_login(&host, &basic).await?;
    let path = docker_config_path(None)
        .ok_or_else(|| anyhow::anyhow!("no HOME or DOCKER_CONFIG to keep credentials in"))?;
    store_docker_auth(&path, &host, Some(&basic))
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    crate::outln!(
        "Login succeeded for {host} (credentials in {})",
        path.display()
    )?;
    Ok(ExitCode::SUCCESS)
}

pub async fn logout(a: LogoutArgs) -> anyhow::Result<ExitCode> {
    let host = normalize_host(&a.registry);
    let path = docker_config_path(None)
        .ok_or_else(|| anyhow::anyhow!("no HOME or DOCKER_CONFIG where credentials would be"))?;
    if !path.exists() {
        eprintln!(
            "obuilder: not logged in to {host} ({} does not exist)",
            path.display()
        );
        return Ok(ExitCode::from(super::process::exit::USAGE));
    }
    if store_docker_auth(&path, &host, None)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?
    {
        crate::outln!("Removed the credentials for {host} from {}", path.display())?;
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("obuilder: not logged in to {host} in {}", path.display());
        Ok(ExitCode::from(super::process::exit::USAGE))
    }
}
