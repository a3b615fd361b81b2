//! Fakes of the three interfaces, for tests of the policy layer without root, runc or a
//! real filesystem. Each exposes state a test can wait on, so tests order themselves by
//! what happened, never by sleeping.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use obuilder_engine::fetch::{FetchError, Fetcher, ImageConfig, ResolvedImage};
use obuilder_engine::log::{LogSink, StepLog};
use obuilder_engine::sandbox::{RunConfig, Sandbox, SandboxError, UserIds};
use obuilder_engine::store::{BuildDir, CacheCopy, CacheInfo, DiskUsage, Store, StoreError};
use obuilder_engine::CancellationToken;
use obuilder_spec::User;
use tokio::sync::watch;

/// Waits until `cond` holds, checking every millisecond; panics after 10 s (a test that
/// waits on state must not hang forever when the state never comes).
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A sandbox that runs nothing: each run writes `ran: CMD` to the step log and
/// `ROOTFS/last-cmd`, and counts itself. A command containing `fail` exits 1; one
/// containing `block` waits until [`FakeSandbox::release`] or its cancellation.
#[derive(Default)]
pub struct FakeSandbox {
    pub runs: AtomicUsize,
    pub cancelled: AtomicUsize,
    /// Calls of `warm` that have returned.
    pub warms: AtomicUsize,
    /// Runs that started before any `warm` had returned.
    pub unwarmed_runs: AtomicUsize,
    /// Each `warm` takes this many ms first (as a sandbox's takes time to start its work).
    pub warm_ms: AtomicU64,
    /// How many runs are blocked now.
    blocked: watch::Sender<usize>,
    /// Bumped to let blocked runs go.
    releases: watch::Sender<u64>,
}

impl FakeSandbox {
    pub fn new() -> Arc<FakeSandbox> {
        Arc::new(FakeSandbox::default())
    }

    /// Waits until `n` runs are blocked.
    pub async fn wait_blocked(&self, n: usize) {
        let mut rx = self.blocked.subscribe();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|b| *b == n))
            .await
            .expect("timed out waiting for blocked runs")
            .expect("sandbox gone");
    }

    /// Lets every blocked run finish.
    pub fn release(&self) {
        self.releases.send_modify(|g| *g += 1);
    }

    pub fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    pub fn cancelled(&self) -> usize {
        self.cancelled.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Sandbox for FakeSandbox {
    fn default_shell(&self) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into()]
    }

    fn user(&self, user: &User) -> Result<UserIds, SandboxError> {
        match user {
            User::Unix { uid, gid } => Ok(UserIds {
                uid: *uid,
                gid: *gid,
            }),
            User::Name(n) => Err(SandboxError::Unsupported(format!("user {n:?}"))),
        }
    }

    fn warm(&self) {
        std::thread::sleep(Duration::from_millis(self.warm_ms.load(Ordering::SeqCst)));
        self.warms.fetch_add(1, Ordering::SeqCst);
    }

    async fn run(
        &self,
        c: &RunConfig,
        rootfs: &Path,
        log: &StepLog,
        cancel: &CancellationToken,
    ) -> Result<(), SandboxError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if self.warms.load(Ordering::SeqCst) == 0 {
            self.unwarmed_runs.fetch_add(1, Ordering::SeqCst);
        }
        let cmd = c.argv.last().cloned().unwrap_or_default();
        log.write(format!("ran: {cmd}\n").as_bytes())
            .map_err(SandboxError::io("cannot write the log of", rootfs))?;
        let last = rootfs.join("last-cmd");
        std::fs::write(&last, &cmd).map_err(SandboxError::io("cannot write", &last))?;
        if cmd.contains("fail") {
            return Err(SandboxError::Failed { cmd, status: 1 });
        }
        if cmd.contains("block") {
            let mut rx = self.releases.subscribe();
            rx.borrow_and_update();
            self.blocked.send_modify(|b| *b += 1);
            let r = tokio::select! {
                _ = rx.changed() => Ok(()),
                _ = cancel.cancelled() => {
                    self.cancelled.fetch_add(1, Ordering::SeqCst);
                    Err(SandboxError::Cancelled)
                }
            };
            self.blocked.send_modify(|b| *b -= 1);
            return r;
        }
        Ok(())
    }
}

/// A fetcher giving every image an empty rootfs with a fixed env.
pub struct FakeFetcher;

#[async_trait]
impl Fetcher for FakeFetcher {
    async fn resolve(&self, name: &str, _log: &LogSink) -> Result<ResolvedImage, FetchError> {
        Ok(ResolvedImage {
            name: name.into(),
            digest: format!("sha256:{}", "0".repeat(64)),
            source: serde_json::Value::Null,
            result: None,
        })
    }

    async fn fetch(
        &self,
        _image: &ResolvedImage,
        _rootfs: &Path,
        _log: &LogSink,
    ) -> Result<ImageConfig, FetchError> {
        Ok(ImageConfig {
            env: vec![("PATH".into(), "/bin".into())],
            ..ImageConfig::default()
        })
    }
}

/// A store whose bookkeeping is in memory, over plain directories in a temp dir (step
/// logs are real files): no root, no copy-on-write. A child's tree starts empty (the
/// fake sandbox needs nothing from its parent). Its free space is set by the test.
pub struct FakeStore {
    root: PathBuf,
    results: Mutex<BTreeSet<String>>,
    caches: Mutex<Vec<(String, usize)>>,
    next: AtomicU64,
    /// What `df` reports as free (of 1 GiB).
    pub free_bytes: AtomicU64,
    pub prepared: AtomicUsize,
}

impl FakeStore {
    pub fn new(root: &Path) -> Arc<FakeStore> {
        Arc::new(FakeStore {
            root: root.to_path_buf(),
            results: Mutex::default(),
            caches: Mutex::default(),
            next: AtomicU64::new(0),
            free_bytes: AtomicU64::new(1 << 29),
            prepared: AtomicUsize::new(0),
        })
    }

    fn tmp(&self, id: &str) -> PathBuf {
        self.root.join("tmp").join(id)
    }

    fn res(&self, id: &str) -> PathBuf {
        self.root.join("result").join(id)
    }

    /// Puts a result in the store behind the builder's back (as a crash between the
    /// commit and the database insert would leave it).
    pub fn add_result(&self, id: &str) {
        std::fs::create_dir_all(self.res(id).join("rootfs")).unwrap();
        self.results.lock().unwrap().insert(id.to_string());
    }

    /// Loses a result behind the builder's back.
    pub fn lose_result(&self, id: &str) {
        self.results.lock().unwrap().remove(id);
        let _ = std::fs::remove_dir_all(self.res(id));
    }

    /// Leaves a build dir for `id` as a builder that died mid-step would.
    pub fn leave_stale(&self, id: &str) {
        std::fs::create_dir_all(self.tmp(id).join("rootfs")).unwrap();
    }
}

fn io(what: &'static str, p: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    StoreError::io(what, p.to_path_buf())
}

#[async_trait]
impl Store for FakeStore {
    fn root(&self) -> &Path {
        &self.root
    }

    fn describe(&self) -> String {
        format!("fake:{}", self.root.display())
    }

    async fn recover(&self) -> Result<(), StoreError> {
        for d in ["tmp", "result", "state", "cache"] {
            let p = self.root.join(d);
            std::fs::create_dir_all(&p).map_err(io("cannot create", &p))?;
        }
        let tmp = self.root.join("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io("cannot create", &tmp))
    }

    async fn result(&self, id: &str) -> Result<Option<PathBuf>, StoreError> {
        Ok(self
            .results
            .lock()
            .unwrap()
            .contains(id)
            .then(|| self.res(id)))
    }

    async fn list(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.results.lock().unwrap().iter().cloned().collect())
    }

    async fn prepare(&self, id: &str, _base: Option<&str>) -> Result<BuildDir, StoreError> {
        let dir = self.tmp(id);
        std::fs::create_dir(&dir).map_err(io("cannot create", &dir))?;
        let rootfs = dir.join("rootfs");
        std::fs::create_dir(&rootfs).map_err(io("cannot create", &rootfs))?;
        self.prepared.fetch_add(1, Ordering::SeqCst);
        Ok(BuildDir {
            id: id.into(),
            dir,
            rootfs,
        })
    }

    async fn stale_build(&self, id: &str) -> Result<Option<BuildDir>, StoreError> {
        let dir = self.tmp(id);
        Ok(dir.exists().then(|| BuildDir {
            id: id.into(),
            rootfs: dir.join("rootfs"),
            dir,
        }))
    }

    async fn commit(&self, dir: &BuildDir) -> Result<PathBuf, StoreError> {
        let to = self.res(&dir.id);
        std::fs::rename(&dir.dir, &to).map_err(io("cannot publish", &to))?;
        self.results.lock().unwrap().insert(dir.id.clone());
        Ok(to)
    }

    async fn discard(&self, dir: &BuildDir) -> Result<(), StoreError> {
        std::fs::remove_dir_all(&dir.dir).map_err(io("cannot remove", &dir.dir))
    }

    async fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.results.lock().unwrap().remove(id);
        let p = self.res(id);
        match std::fs::remove_dir_all(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("cannot remove", &p)(e)),
            _ => Ok(()),
        }
    }

    async fn cache_checkout(&self, name: &str, _: u32, _: u32) -> Result<CacheCopy, StoreError> {
        let path = self.root.join("cache").join(format!(
            "{}-{}",
            name.len(),
            self.next.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&path).map_err(io("cannot create", &path))?;
        let mut c = self.caches.lock().unwrap();
        match c.iter_mut().find(|(n, _)| n == name) {
            Some((_, users)) => *users += 1,
            None => c.push((name.to_string(), 1)),
        }
        Ok(CacheCopy {
            name: name.into(),
            path,
            generation: 0,
        })
    }

    async fn cache_release(&self, copy: CacheCopy, _keep: bool) -> Result<(), StoreError> {
        if let Some((_, users)) = self
            .caches
            .lock()
            .unwrap()
            .iter_mut()
            .find(|(n, _)| *n == copy.name)
        {
            *users -= 1;
        }
        let _ = std::fs::remove_dir_all(&copy.path);
        Ok(())
    }

    async fn cache_list(&self) -> Result<Vec<CacheInfo>, StoreError> {
        Ok(self
            .caches
            .lock()
            .unwrap()
            .iter()
            .map(|(name, in_use)| CacheInfo {
                name: name.clone(),
                in_use: *in_use,
            })
            .collect())
    }

    async fn cache_delete(&self, name: &str) -> Result<(), StoreError> {
        self.caches.lock().unwrap().retain(|(n, _)| n != name);
        Ok(())
    }

    async fn df(&self) -> Result<DiskUsage, StoreError> {
        Ok(DiskUsage {
            total_bytes: 1 << 30,
            free_bytes: self.free_bytes.load(Ordering::SeqCst),
        })
    }
}
