//! The sandbox's flags, shared by `obuilder` and `ocluster-worker` so that a worker takes
//! the very flags `obuilder build` does; they become the library's plain
//! [`SandboxSpec`].

use obuilder_config::units::parse_size;
use obuilder_config::SandboxSpec;
use obuilder_sandbox::{NativeOptions, RuncOptions};

#[derive(clap::Args, Clone, Debug)]
pub struct SandboxArgs {
    /// What runs the steps: native (Linux containers, set up by obuilder itself without a
    /// runtime binary), runc (the same containers, run by runc: slower to start),
    /// runc:/PATH/TO/RUNC, or user (a build user per step, with the step's snapshot as its home and Homebrew prefix: the macOS
    /// design, also on Linux; see --user-pool). The user sandbox has no network isolation
    /// on macOS (steps have the host's network); on Linux a step without (network host)
    /// gets a network namespace of its own. On FreeBSD: jail (a jail per step, on a ZFS
    /// store; a vnet jail with only a loopback unless (network host)). docker: a container
    /// per step by a Docker-compatible engine, with --store docker:PATH (see --docker-cli).
    /// Default: native on Linux, user on macOS; docker for a docker: store; runc with
    /// --runc PATH.
    #[arg(long, value_name = "SANDBOX", env = "OBUILDER_SANDBOX")]
    pub sandbox: Option<String>,
    /// Make sync syscalls (fsync, sync, …) no-ops inside the sandbox: much faster on btrfs;
    /// the store's commit writes each result to the disk whole before publishing it.
    #[arg(long)]
    pub fast_sync: bool,
    /// The runc binary to use (as --sandbox runc:PATH); alone, it chooses the runc sandbox.
    #[arg(long, value_name = "PATH")]
    pub runc: Option<String>,
    /// Most processes and threads a step may have at once; 0 for no limit.
    #[arg(long, value_name = "N", default_value_t = obuilder_sandbox::DEFAULT_MAX_PIDS)]
    pub max_pids: u64,
    /// Most memory a step may use (e.g. 2G); no limit by default.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_memory: Option<u64>,
    /// --sandbox user: the build users' uids, one per step running at once (created on
    /// first use as obuilderUID on Linux, macUID on macOS). Default: 61000-61003 on Linux,
    /// 1000-1000 on macOS.
    #[arg(long, value_name = "FROM-TO", value_parser = parse_uid_range)]
    pub user_pool: Option<(u32, u32)>,
    /// --sandbox user: one build user, UID (the original's flag: --user-pool UID-UID).
    #[arg(long, value_name = "UID", conflicts_with = "user_pool")]
    pub uid: Option<u32>,
    /// --sandbox user: the build users' primary group (default: the first uid).
    #[arg(long, value_name = "GID")]
    pub user_group: Option<u32>,
    /// --sandbox user: the home path every build user sees, redirected to its step's
    /// snapshot (default: the first build user's, e.g. /Users/mac1000).
    #[arg(long, value_name = "PATH")]
    pub home_path: Option<String>,
    /// --sandbox user: the Homebrew prefix, redirected like the home (default on macOS:
    /// /opt/homebrew on Apple silicon, /usr/local on Intel; none on Linux).
    #[arg(long, value_name = "PATH")]
    pub brew_path: Option<String>,
    /// --sandbox user: no FUSE; copy the snapshot into the real home path and prefix with
    /// rsync before each step and back after it, one step at a time (the original's first
    /// design).
    #[arg(long)]
    pub no_fuse: bool,
    /// --sandbox docker: the CPUs a step may use (e.g. 2.5); the engine's default if unset.
    #[arg(long, value_name = "N")]
    pub docker_cpus: Option<f64>,
    /// --sandbox docker: the memory a step may use, as Docker takes it (e.g. 4g).
    #[arg(long, value_name = "SIZE")]
    pub docker_memory: Option<String>,
    /// --sandbox docker: the isolation of Windows containers: default, process or hyperv
    /// (hyperv unless given, with --docker-platform windows).
    #[arg(long, value_name = "KIND", value_parser = ["default", "process", "hyperv"])]
    pub docker_isolation: Option<String>,
    /// --sandbox docker: the network for steps with (network host) (e.g. nat on Windows);
    /// steps without (network …) get none.
    #[arg(long, value_name = "NAME")]
    pub docker_network: Option<String>,
    /// --sandbox user: the obuilderfs binary, started when nothing is mounted on the paths.
    #[arg(long, value_name = "PATH")]
    pub obuilderfs: Option<String>,
}

fn parse_uid_range(s: &str) -> Result<(u32, u32), String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    match (a.trim().parse::<u32>(), b.trim().parse::<u32>()) {
        (Ok(a), Ok(b)) if a > 0 && a <= b => Ok((a, b)),
        _ => Err(format!(
            "{s:?}: expected FROM-TO (e.g. 61000-61003), with 0 < FROM <= TO"
        )),
    }
}

impl SandboxArgs {
    /// The sandbox these flags describe, or what is wrong with them.
    pub fn spec(&self) -> Result<SandboxSpec, String> {
        let spec: SandboxSpec = match (&self.sandbox, &self.runc) {
            (Some(s), _) => s
                .parse()
                .map_err(|e: obuilder_sandbox::SandboxSpecError| e.to_string())?,
            (None, Some(_)) => SandboxSpec::Runc(RuncOptions::default()),
            (None, None) => SandboxSpec::platform_default().ok_or_else(|| {
                format!(
                    "this platform has no default sandbox: choose one with --sandbox ({})",
                    obuilder_sandbox::FORMS
                )
            })?,
        };
        if let (Some(runc), false) = (&self.runc, matches!(spec, SandboxSpec::Runc(_))) {
            return Err(format!(
                "--runc {runc} goes with the runc sandbox, not --sandbox {spec}: drop one of them"
            ));
        }
        Ok(match spec {
            SandboxSpec::Runc(o) => SandboxSpec::Runc(RuncOptions {
                runc: self.runc.clone().unwrap_or(o.runc),
                fast_sync: self.fast_sync,
                max_pids: (self.max_pids > 0).then_some(self.max_pids),
                max_memory: self.max_memory,
            }),
            SandboxSpec::Native(_) => SandboxSpec::Native(NativeOptions {
                fast_sync: self.fast_sync,
                max_pids: (self.max_pids > 0).then_some(self.max_pids),
                max_memory: self.max_memory,
            }),
            SandboxSpec::User(mut o) => {
                if let Some((a, b)) = self.user_pool.or(self.uid.map(|u| (u, u))) {
                    (o.first_uid, o.last_uid) = (a, b);
                }
                o.gid = self.user_group;
                o.home = self.home_path.clone();
                o.prefix = self.brew_path.clone();
                o.fuse = !self.no_fuse;
                o.obuilderfs = match &self.obuilderfs {
                    Some(p) => p.clone(),
                    None => default_obuilderfs(),
                };
                o.validate()?;
                SandboxSpec::User(o)
            }
            SandboxSpec::Jail => SandboxSpec::Jail,
            SandboxSpec::Docker(mut o) => {
                o.cpus = self.docker_cpus;
                o.memory = self.docker_memory.clone();
                o.isolation = self.docker_isolation.clone();
                o.network = self.docker_network.clone();
                SandboxSpec::Docker(o)
            }
        })
    }
}

/// obuilderfs next to this binary if it is there (as installed together), else on PATH.
fn default_obuilderfs() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("obuilderfs")))
        .filter(|p| p.is_file())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| "obuilderfs".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        sandbox: SandboxArgs,
    }

    fn spec(args: &[&str]) -> Result<SandboxSpec, String> {
        Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?
            .sandbox
            .spec()
    }

    #[test]
    fn the_default_and_what_runc_alone_chooses() {
        // (OBUILDER_SANDBOX, which clap reads, is not set in this test's environment.)
        if std::env::var_os("OBUILDER_SANDBOX").is_some() {
            return;
        }
        #[cfg(target_os = "linux")]
        assert!(matches!(spec(&[]), Ok(SandboxSpec::Native(_))));
        let Ok(SandboxSpec::Runc(o)) = spec(&["--runc", "/opt/runc"]) else {
            panic!("--runc alone chooses runc")
        };
        assert_eq!(o.runc, "/opt/runc");
        let e = spec(&["--sandbox", "native", "--runc", "/opt/runc"]).unwrap_err();
        assert!(e.contains("goes with the runc sandbox"), "{e}");
        assert!(matches!(
            spec(&["--sandbox", "runc:/x", "--runc", "/y"]),
            Ok(SandboxSpec::Runc(RuncOptions { runc, .. })) if runc == "/y"
        ));
    }
}
