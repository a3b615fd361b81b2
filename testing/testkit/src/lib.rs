//! Test support shared by every crate's tests.
//!
//! * [`require`] / [`require!`]: capability gates. A test that needs root, a kernel feature
//!   or a tool skips with the reason; with `OBUILDER_TEST_STRICT=1` (set by `.ci/run`) the
//!   same gate fails instead, so CI cannot pass by skipping.
//! * [`LoopFs`]: a real filesystem (btrfs, xfs, ext4) on a loopback file, unmounted and
//!   deleted on drop.
//! * [`RecordingExec`]: an `Exec` that records argv and answers from a script, for tests of
//!   command sequences (including the ZFS/macOS ones that cannot run here).
//! * [`conformance`]: the store conformance suite, one body run against every backend.
//! * [`fakes`]: an in-memory store, a sandbox and a fetcher for tests of the policy layer
//!   that need no root, each with state a test can wait on (never a sleep).
//! * [`fakezfs`]: a stateful fake `zfs`/`zpool` for the ZFS store's tests (no ZFS here).
//! * [`e2e`]: helpers for tests of the real binary on loopback filesystems.

// Test support runs the real tools it sets up (mkfs, mount, registries) directly; the
// Exec seam is for the code under test.
#![allow(clippy::disallowed_methods)]

#[cfg(target_os = "linux")]
pub mod conformance;
#[cfg(target_os = "linux")]
pub mod e2e;
#[cfg(target_os = "linux")]
mod loopfs;
#[cfg(target_os = "linux")]
pub use loopfs::LoopFs;
pub mod fakezfs;
pub mod registry;

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use obuilder_engine::exec::{Cmd, Exec, ExecError, Output};

/// Something a test may need from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    Root,
    /// A tool on PATH (e.g. `runc`, `mkfs.btrfs`).
    Tool(&'static str),
    /// A file that must exist (e.g. `/bin/busybox`).
    File(&'static str),
    /// Overlayfs with the new mount API's `lowerdir+` (Linux ≥ 6.8).
    OverlayLowerdirPlus,
    /// FUSE passthrough of open files to backing files (Linux >= 6.9, built with
    /// CONFIG_FUSE_PASSTHROUGH).
    FusePassthrough,
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(tool).is_file()
        || Path::new("/sbin").join(tool).is_file()
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    let r = rustix::system::uname();
    let rel = r.release().to_string_lossy();
    let mut it = rel
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|x| x.parse::<u32>().ok());
    let (a, b) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

fn missing(cap: Cap) -> Option<String> {
    match cap {
        Cap::Root => (!rustix::process::geteuid().is_root()).then(|| "needs root".to_string()),
        Cap::Tool(t) => (!which(t)).then(|| format!("needs `{t}` (run scripts/setup.sh)")),
        Cap::File(f) => {
            (!Path::new(f).exists()).then(|| format!("needs {f} (run scripts/setup.sh)"))
        }
        Cap::OverlayLowerdirPlus => {
            (!kernel_at_least(6, 8)).then(|| "needs Linux >= 6.8 for overlayfs lowerdir+".into())
        }
        Cap::FusePassthrough => {
            let config = std::fs::read_to_string(format!(
                "/boot/config-{}",
                rustix::system::uname().release().to_string_lossy()
            ))
            .unwrap_or_default();
            if !kernel_at_least(6, 9) {
                Some("needs Linux >= 6.9 for FUSE passthrough".into())
            } else if config.contains("# CONFIG_FUSE_PASSTHROUGH is not set") {
                Some("needs a kernel built with CONFIG_FUSE_PASSTHROUGH".into())
            } else {
                None
            }
        }
    }
}

/// True when every capability is present. Otherwise prints why the test is skipped and
/// returns false, or panics when `OBUILDER_TEST_STRICT=1`.
pub fn require(test: &str, caps: &[Cap]) -> bool {
    let reasons: Vec<String> = caps.iter().filter_map(|c| missing(*c)).collect();
    if reasons.is_empty() {
        return true;
    }
    let msg = format!("{test}: {}", reasons.join(", "));
    if std::env::var("OBUILDER_TEST_STRICT").is_ok_and(|v| v == "1") {
        panic!("OBUILDER_TEST_STRICT=1 and a required capability is missing: {msg}");
    }
    eprintln!("SKIPPED {msg}");
    false
}

/// `require!(Cap::Root, Cap::Tool("runc"))` at the top of a test: skip (or fail in strict
/// mode) unless all are present.
#[macro_export]
macro_rules! require {
    ($($cap:expr),+ $(,)?) => {
        if !$crate::require(module_path!(), &[$($cap),+]) {
            return;
        }
    };
}

#[cfg(target_os = "linux")]
fn run(argv: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|e| format!("{}: {e}", argv[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{argv:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// An argv prefix and the answer to commands that start with it (stdout or stderr).
/// An argv prefix, its answer, and how many more times it applies (None: always).
type Rule = (Vec<String>, Result<String, String>, Option<usize>);

/// An `Exec` that records every command and answers from a script: the first rule whose
/// argv prefix matches gives the answer; unmatched commands succeed with no output.
#[derive(Default, Clone)]
pub struct RecordingExec {
    pub calls: Arc<Mutex<Vec<Cmd>>>,
    rules: Arc<Mutex<Vec<Rule>>>,
    /// What `spawn` really starts in place of the recorded command (default `true`).
    spawn_instead: Arc<Mutex<Option<Vec<String>>>>,
}

impl RecordingExec {
    pub fn new() -> RecordingExec {
        RecordingExec::default()
    }

    /// Commands starting with `prefix` print `stdout` and succeed.
    pub fn answer(&self, prefix: &[&str], stdout: &str) {
        self.rules.lock().unwrap().push((
            prefix.iter().map(|s| s.to_string()).collect(),
            Ok(stdout.into()),
            None,
        ));
    }

    /// A recorder answering as an engine of Windows containers on Windows Server 2022
    /// (build 20348) does: `docker version`'s OS and kernel version.
    pub fn windows_engine() -> RecordingExec {
        let exec = RecordingExec::new();
        exec.answer(
            &["docker", "version", "--format", "{{.Server.Os}}"],
            "windows\n",
        );
        exec.answer(
            &["docker", "version", "--format", "{{.Server.KernelVersion}}"],
            "10.0 20348 (20348.1.amd64fre.fe_release.210507-1500)\n",
        );
        exec
    }

    /// Commands starting with `prefix` fail with `stderr`.
    pub fn fail(&self, prefix: &[&str], stderr: &str) {
        self.rules.lock().unwrap().push((
            prefix.iter().map(|s| s.to_string()).collect(),
            Err(stderr.into()),
            None,
        ));
    }

    /// The next `times` commands starting with `prefix` fail with `stderr` (before any
    /// later rule for them applies).
    pub fn fail_times(&self, prefix: &[&str], stderr: &str, times: usize) {
        self.rules.lock().unwrap().push((
            prefix.iter().map(|s| s.to_string()).collect(),
            Err(stderr.into()),
            Some(times),
        ));
    }

    /// Makes `spawn` start this command instead of `true` (e.g. `sleep 1`, to test
    /// cancellation of a long run).
    pub fn spawn_instead(&self, argv: &[&str]) {
        *self.spawn_instead.lock().unwrap() = Some(argv.iter().map(|s| s.to_string()).collect());
    }

    /// The argv of every command so far, as strings joined by spaces.
    pub fn argvs(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.argv.join(" "))
            .collect()
    }
}

#[async_trait]
impl Exec for RecordingExec {
    async fn output(&self, cmd: &Cmd) -> Result<Output, ExecError> {
        self.calls.lock().unwrap().push(cmd.clone());
        let mut rules = self.rules.lock().unwrap();
        for (prefix, answer, left) in rules.iter_mut() {
            if cmd.argv.len() >= prefix.len() && cmd.argv[..prefix.len()] == prefix[..] {
                match left {
                    Some(0) => continue,
                    Some(n) => *n -= 1,
                    None => {}
                }
                return match answer {
                    Ok(out) => Ok(Output {
                        stdout: out.clone().into_bytes(),
                        stderr: vec![],
                    }),
                    Err(err) => Err(ExecError::Failed {
                        cmd: cmd.display(),
                        status: "exit status: 1".into(),
                        stderr: err.clone(),
                    }),
                };
            }
        }
        Ok(Output::default())
    }

    fn spawn(
        &self,
        cmd: &Cmd,
        stdin: std::process::Stdio,
        stdout: std::process::Stdio,
        stderr: std::process::Stdio,
    ) -> Result<tokio::process::Child, ExecError> {
        self.calls.lock().unwrap().push(cmd.clone());
        let argv = self
            .spawn_instead
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| vec!["true".into()]);
        tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|source| ExecError::Spawn {
                cmd: cmd.display(),
                source,
            })
    }
}

pub mod fakes;
