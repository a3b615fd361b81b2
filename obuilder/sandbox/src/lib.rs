//! Sandboxes for obuilder, and [`SandboxSpec`], the `--sandbox` value that picks one at
//! run time.
//!
//! * `runc` (Linux): OCI containers, with a config made by the pure function
//!   [`oci::config`] and the default seccomp filter of [`seccomp`].

pub mod oci;
#[cfg(target_os = "linux")]
pub mod runc;
pub mod seccomp;

use std::path::Path;
use std::sync::Arc;

use obuilder_engine::exec::SharedExec;
use obuilder_engine::sandbox::{Sandbox, SandboxError};

#[cfg(target_os = "linux")]
pub use runc::RuncSandbox;

/// Flags of the runc sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuncOptions {
    /// Make sync syscalls no-ops inside the sandbox (`--fast-sync`).
    pub fast_sync: bool,
    /// The runc binary.
    pub runc: String,
    /// Most processes (threads included) a step may have at once; `None`: no limit.
    pub max_pids: Option<u64>,
    /// Most memory a step may use, in bytes; `None`: no limit.
    pub max_memory: Option<u64>,
}

/// The default process limit of a step: far above what `make -j` on a big machine
/// starts, far below what a fork bomb would.
pub const DEFAULT_MAX_PIDS: u64 = 4096;

impl Default for RuncOptions {
    fn default() -> RuncOptions {
        RuncOptions {
            fast_sync: false,
            runc: "runc".into(),
            max_pids: Some(DEFAULT_MAX_PIDS),
            max_memory: None,
        }
    }
}

/// Which sandbox runs the steps, with its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxSpec {
    /// OCI containers run by `runc` (Linux only).
    Runc(RuncOptions),
}

/// Every accepted `--sandbox` form, for error messages and help.
pub const FORMS: &str = "runc (Linux containers; the default), runc:/PATH/TO/RUNC";

/// A `--sandbox` value that is not one of [`FORMS`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid --sandbox {given:?}: {why}; accepted forms: {FORMS}")]
pub struct SandboxSpecError {
    pub given: String,
    pub why: String,
}

impl std::str::FromStr for SandboxSpec {
    type Err = SandboxSpecError;

    fn from_str(s: &str) -> Result<SandboxSpec, SandboxSpecError> {
        let bad = |why: &str| SandboxSpecError {
            given: s.to_string(),
            why: why.to_string(),
        };
        let (kind, arg) = match s.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (s, None),
        };
        match kind {
            "runc" => {
                let mut o = RuncOptions::default();
                if let Some(path) = arg {
                    if path.is_empty() {
                        return Err(bad("runc: needs the path of a runc binary after the colon"));
                    }
                    o.runc = path.to_string();
                }
                Ok(SandboxSpec::Runc(o))
            }
            other => Err(bad(&format!("unknown sandbox {other:?}"))),
        }
    }
}

impl SandboxSpec {
    /// The default sandbox of this platform.
    pub fn platform_default() -> Option<SandboxSpec> {
        #[cfg(target_os = "linux")]
        return Some(SandboxSpec::Runc(RuncOptions::default()));
        #[cfg(not(target_os = "linux"))]
        return None;
    }

    /// Makes the sandbox; it keeps its state under the store's `state_dir`.
    pub fn open(
        &self,
        state_dir: &Path,
        exec: SharedExec,
    ) -> Result<Arc<dyn Sandbox>, SandboxError> {
        match self {
            #[cfg(target_os = "linux")]
            SandboxSpec::Runc(o) => Ok(Arc::new(RuncSandbox::new(state_dir, o.clone(), exec))),
            #[cfg(not(target_os = "linux"))]
            SandboxSpec::Runc(_) => {
                let _ = (state_dir, exec);
                Err(SandboxError::Unsupported(
                    "the runc sandbox runs on Linux only".into(),
                ))
            }
        }
    }
}

impl std::fmt::Display for SandboxSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SandboxSpec::Runc(o) if o.runc == "runc" => write!(f, "runc"),
            SandboxSpec::Runc(o) => write!(f, "runc:{}", o.runc),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_lists_them_when_wrong() {
        assert_eq!(
            "runc".parse::<SandboxSpec>(),
            Ok(SandboxSpec::Runc(RuncOptions::default()))
        );
        let SandboxSpec::Runc(o) = "runc:/opt/runc".parse::<SandboxSpec>().unwrap();
        assert_eq!(o.runc, "/opt/runc");
        assert_eq!(o.max_pids, Some(DEFAULT_MAX_PIDS));
        for (bad, why) in [("crun", "unknown sandbox"), ("runc:", "needs the path")] {
            let e = bad.parse::<SandboxSpec>().unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(FORMS), "{bad}: {e}");
        }
        assert_eq!(
            "runc:/x".parse::<SandboxSpec>().unwrap().to_string(),
            "runc:/x"
        );
    }
}
