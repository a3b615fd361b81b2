//! Putting a builder together: which store, which sandbox, where base images come from,
//! and how every build is treated, as one value ([`BuilderConfig`]) that opens a
//! [`Builder`]. The `obuilder` CLI converts its flags into it; a cluster worker or any
//! other program that drives the engine as a library builds one directly.
//!
//! Also here, because both need it: [`healthcheck`] (is this machine able to build?) and
//! [`store_stats`], which reads a store without opening a sandbox or changing anything.

pub mod healthcheck;
pub mod units;

use std::path::PathBuf;
use std::sync::Arc;

use obuilder_engine::exec::{RealExec, SharedExec};
use obuilder_engine::store::{Store, StoreError};
use obuilder_engine::{BuildError, Builder, BuilderOptions, CacheStats};
use obuilder_fetch::images::ImageStore;
use obuilder_fetch::{FetchConfig, ImageFetcher};
pub use obuilder_sandbox::SandboxSpec;
pub use obuilder_stores::StoreSpec;

pub use healthcheck::{healthcheck, HealthcheckError, HealthcheckOptions};

/// Why a builder could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The store cannot be used as asked (wrong filesystem, missing, another mode).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// This platform has no sandbox to run steps in.
    #[error(
        "this platform has no default sandbox; choose one with --sandbox ({})",
        obuilder_sandbox::FORMS
    )]
    NoSandbox,
    /// The sandbox cannot run here.
    #[error(transparent)]
    Sandbox(obuilder_engine::sandbox::SandboxError),
    /// The store and the sandbox cannot work together.
    #[error("{0}")]
    Pairing(String),
    /// Opening the store's database or recovering it failed.
    #[error("cannot open store {store}")]
    Open {
        store: String,
        #[source]
        source: BuildError,
    },
}

/// Everything that makes a builder.
#[derive(Clone)]
pub struct BuilderConfig {
    pub store: StoreSpec,
    /// `None`: the platform's default ([`SandboxSpec::platform_default`]).
    pub sandbox: Option<SandboxSpec>,
    pub fetch: FetchConfig,
    pub options: BuilderOptions,
    /// The seam every external command goes through.
    pub exec: SharedExec,
}

impl BuilderConfig {
    /// A store with the platform's sandbox, local images then registries, and default
    /// options.
    pub fn new(store: StoreSpec) -> BuilderConfig {
        BuilderConfig {
            store,
            sandbox: None,
            fetch: FetchConfig::default(),
            options: BuilderOptions::default(),
            exec: RealExec::shared(),
        }
    }

    /// The sandbox to use.
    pub fn sandbox(&self) -> Result<SandboxSpec, ConfigError> {
        self.sandbox
            .clone()
            .or_else(SandboxSpec::platform_default)
            .ok_or(ConfigError::NoSandbox)
    }

    /// Where the store keeps its database, images and sandbox state.
    pub fn state_dir(&self) -> PathBuf {
        self.store.state_dir()
    }

    /// The store's local images (nothing is created until one is added).
    pub fn images(&self) -> ImageStore {
        ImageStore::new(&self.state_dir())
    }

    /// The image fetcher over the store's images.
    pub fn fetcher(&self) -> ImageFetcher {
        self.fetch.fetcher(self.images())
    }

    /// The sandbox to open with this store: a docker: store and the Docker sandbox go
    /// together, on one engine, the sandbox naming things with the store's prefix.
    fn paired_sandbox(&self) -> Result<SandboxSpec, ConfigError> {
        let mut sandbox = match (&self.sandbox, &self.store) {
            // Commands that run no step (delete, push, …) follow the store.
            (None, StoreSpec::Docker { .. }) => SandboxSpec::Docker(Default::default()),
            _ => self.sandbox()?,
        };
        match (&self.store, &mut sandbox) {
            (
                StoreSpec::Docker {
                    cli,
                    root,
                    platform,
                    ..
                },
                SandboxSpec::Docker(o),
            ) => {
                o.cli = cli.clone();
                o.prefix = obuilder_stores::docker::prefix(root);
                o.windows = *platform == obuilder_stores::docker::Platform::Windows;
            }
            (StoreSpec::Docker { .. }, _) => return Err(ConfigError::Pairing(
                "a docker: store runs its steps with --sandbox docker".into(),
            )),
            (_, SandboxSpec::Docker(_)) => return Err(ConfigError::Pairing(
                "--sandbox docker needs a docker: store (--store docker:/PATH): its steps' results are images".into(),
            )),
            _ => {}
        }
        Ok(sandbox)
    }

    /// Opens the store (checking its filesystem first), the sandbox and the fetcher; the
    /// builder recovers the store from any crash if it has it to itself.
    pub async fn open(&self) -> Result<Builder, ConfigError> {
        let sandbox = self.paired_sandbox()?;
        // A docker: store's helper containers run as the steps do.
        let isolation = match &sandbox {
            SandboxSpec::Docker(o) => o.effective_isolation().map(String::from),
            _ => None,
        };
        let store = self.store.open_with(self.exec.clone(), isolation)?;
        store.ready_state().await?;
        let state = store.state_dir();
        let sb = sandbox
            .open(&state, self.exec.clone())
            .map_err(ConfigError::Sandbox)?;
        let mut fetcher: Arc<dyn obuilder_engine::fetch::Fetcher> = Arc::new(self.fetcher());
        if let StoreSpec::Docker {
            cli,
            platform,
            pull,
            ..
        } = &self.store
        {
            // Windows images come from the engine's own pull (foreign layers).
            if *pull || *platform == obuilder_stores::docker::Platform::Windows {
                fetcher = Arc::new(obuilder_stores::docker_pull::DockerPull::new(
                    cli.clone(),
                    self.exec.clone(),
                ));
            }
        }
        if let StoreSpec::Zfs { pool, .. } = &self.store {
            // `(from NAME)` clones POOL/base-image/NAME when there is one.
            fetcher = Arc::new(obuilder_stores::zfs_base::ZfsBaseImages::new(
                pool.clone(),
                self.exec.clone(),
                fetcher,
            ));
        }
        Builder::with_options(store, sb, fetcher, self.options.clone())
            .await
            .map_err(|source| ConfigError::Open {
                store: self.store.to_string(),
                source,
            })
    }

    /// Opens a store that must exist already, for commands that only look at it or
    /// change one thing (caches): no sandbox, no recovery, nothing created.
    pub fn open_existing_store(&self) -> Result<Arc<dyn Store>, ConfigError> {
        Ok(self.store.open_existing(self.exec.clone())?)
    }
}

/// What `df` shows of a store besides its free space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub results: u64,
    pub cache: CacheStats,
}

/// Reads a store's counts from its database without changing anything.
pub fn store_stats(store: &dyn Store) -> Result<StoreStats, ConfigError> {
    let path = store.state_dir().join("db/db.sqlite");
    let open_err = |e| ConfigError::Open {
        store: store.describe(),
        source: BuildError::from(obuilder_engine::StepError::Db(e)),
    };
    let Some(db) = obuilder_engine::db::Db::open_existing(&path).map_err(open_err)? else {
        return Ok(StoreStats::default());
    };
    let results = db.count().map_err(open_err)? as u64;
    let (hits, misses) = db.hit_miss().map_err(open_err)?;
    Ok(StoreStats {
        results,
        cache: CacheStats {
            hits: hits as u64,
            misses: misses as u64,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn the_docker_store_and_sandbox_name_things_alike() {
        for root in ["/var/lib/obuilder", "/tmp/a b/store"] {
            let store = StoreSpec::Docker {
                root: root.into(),
                cli: "podman".into(),
                platform: obuilder_stores::docker::Platform::Windows,
                pull: false,
            };
            let SandboxSpec::Docker(o) = BuilderConfig::new(store).paired_sandbox().unwrap() else {
                panic!("a docker: store opens the Docker sandbox");
            };
            assert_eq!(o.prefix, obuilder_stores::docker::prefix(Path::new(root)));
            assert_eq!(o.cli, "podman");
            assert!(o.windows);
        }
    }
}
