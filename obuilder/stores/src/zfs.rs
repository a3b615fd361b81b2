//! `zfs:POOL` or `zfs:/PREFIX/POOL`: every result is a ZFS dataset, built in place and
//! published by a snapshot. Every command goes through the Exec seam (ZFS cannot run on the
//! machines that test this; `tests/zfs.rs` pins each sequence against a stateful fake).
//!
//! ```text
//! POOL                       mounted at ROOT (/POOL, or /PREFIX/POOL)
//! POOL/state                 the database and sandbox state (always mounted)
//! POOL/result/ID             a build (no @snap yet) or a result (@snap); canmount=noauto
//! POOL/result/ID@snap        the publication mark and the source of every clone
//! POOL/result/ID/SUB         child datasets (macOS `home`, `brew`; FreeBSD `rootfs`), cloned
//!                            with their parent and mounted at ROOT/result/ID/rootfs[/SUB]
//! POOL/cache/E               a shared cache's latest version, never mounted; @gN, N its generation
//! POOL/cache-tmp/PID-N-E     a checked-out copy, mounted at ROOT/cache-tmp/PID-N-E
//! ```
//!
//! A result is `ROOT/result/ID` itself (not the original's `.zfs/snapshot/snap`): the live
//! dataset is never written after its snapshot, it shows child datasets (a snapshot
//! directory does not), and it costs no snapshot automount.
//!
//! **Bounded mounts.** Result datasets are `canmount=noauto`: nothing mounts them at boot,
//! and this store mounts one when it is used and keeps at most `max_mounted` mounted,
//! unmounting the least recently used (a busy one, still read, is skipped). The seeds saw
//! macOS's disk arbitration slow down with thousands of mounted datasets; here the count is
//! bounded whatever the number of results.
//!
//! **Crash safety.** The snapshot `ID@snap` is the commit: a dataset without one is a build
//! that did not finish, destroyed at start-up (and by the builder before it rebuilds that
//! id). Delete destroys the snapshot first, so a crash mid-delete leaves such a dataset, not
//! a half result. A cache release is a sequence whose every prefix `recover` completes or
//! undoes (see [`ZfsStore::recover`]).
//!
//! **The original's bugs, fixed.** `zfs promote` runs only on a dataset whose `origin` says
//! it is a clone (OBuilder #89: `cannot promote … not a cloned filesystem`, from copies that
//! were created rather than cloned; here every copy is a clone of a snapshot made when the
//! cache is). "Dataset is busy" is retried a bounded number of times and then reported with
//! the mount point, instead of `fuser`, a 10 s sleep and a blind retry. Nothing names a
//! dataset other than this store's own (the original remounted a hard-coded
//! `obuilder/result`). Cache names become dataset names that ZFS accepts (`%` is reserved
//! in ZFS names: the escape uses `:`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use obuilder_engine::exec::{Cmd, ExecError, SharedExec};
use obuilder_engine::store::{BuildDir, CacheCopy, CacheInfo, DiskUsage, Store, StoreError};

use crate::cache::GenLock;

/// Settings a deployment rarely changes (tests shorten the waits).
#[derive(Debug, Clone)]
pub struct ZfsOptions {
    /// The most result datasets kept mounted when not in use.
    pub max_mounted: usize,
    /// How many times an unmount or destroy that finds the dataset busy is tried again.
    pub busy_retries: u32,
    /// The wait before the first retry (doubled each time).
    pub busy_delay: Duration,
}

impl Default for ZfsOptions {
    fn default() -> ZfsOptions {
        ZfsOptions {
            max_mounted: 32,
            busy_retries: 3,
            busy_delay: Duration::from_secs(1),
        }
    }
}

/// A mounted result: its datasets in mount order, and how many users need it mounted.
#[derive(Debug)]
struct Mounted {
    id: String,
    datasets: Vec<String>,
    pins: usize,
}

/// Mounted results, least recently used first.
#[derive(Debug, Default)]
struct Mounts {
    list: Vec<Mounted>,
}

impl Mounts {
    fn position(&self, id: &str) -> Option<usize> {
        self.list.iter().position(|m| m.id == id)
    }

    /// Marks `id` as just used; false if it is not mounted.
    fn touch(&mut self, id: &str) -> bool {
        match self.position(id) {
            Some(i) => {
                let m = self.list.remove(i);
                self.list.push(m);
                true
            }
            None => false,
        }
    }

    fn pin(&mut self, id: &str, by: isize) {
        if let Some(i) = self.position(id) {
            let m = &mut self.list[i];
            m.pins = (m.pins as isize + by).max(0) as usize;
        }
    }

    fn forget(&mut self, id: &str) {
        if let Some(i) = self.position(id) {
            self.list.remove(i);
        }
    }
}

pub struct ZfsStore {
    /// The dataset the store lives in: a pool (`tank`) or a dataset of one (`tank/obuilder`).
    pool: String,
    root: PathBuf,
    exec: SharedExec,
    opts: ZfsOptions,
    mounts: tokio::sync::Mutex<Mounts>,
    next: AtomicU64,
    /// Whether [`Store::ready_state`] has checked the pool and mounted `state`.
    ready: std::sync::atomic::AtomicBool,
}

/// A failed `zfs` command's standard error, if that is how it failed.
fn stderr_of(e: &StoreError) -> Option<&str> {
    match e {
        StoreError::Exec(ExecError::Failed { stderr, .. }) => Some(stderr),
        _ => None,
    }
}

fn missing(e: &StoreError) -> bool {
    stderr_of(e).is_some_and(|s| s.contains("does not exist") || s.contains("could not find"))
}

fn busy(e: &StoreError) -> bool {
    stderr_of(e).is_some_and(|s| s.contains("busy"))
}

/// A cache name as a dataset name component: the stores' injective escape, with `%`
/// (reserved in ZFS names) written as `:`.
pub fn dataset_escape(name: &str) -> String {
    crate::cache::escape(name).replace('%', ":")
}

fn dataset_unescape(component: &str) -> Option<String> {
    crate::cache::unescape(&component.replace(':', "%"))
}

/// The generation of a cache snapshot name `…@gN`.
fn generation_of(snapshot: &str) -> Option<u64> {
    snapshot.rsplit_once("@g")?.1.parse().ok()
}

impl ZfsStore {
    /// A store in dataset `pool`, mounted at `root`.
    pub fn new(pool: impl Into<String>, root: impl Into<PathBuf>, exec: SharedExec) -> ZfsStore {
        ZfsStore::with_options(pool, root, exec, ZfsOptions::default())
    }

    pub fn with_options(
        pool: impl Into<String>,
        root: impl Into<PathBuf>,
        exec: SharedExec,
        opts: ZfsOptions,
    ) -> ZfsStore {
        ZfsStore {
            pool: pool.into(),
            root: root.into(),
            exec,
            opts,
            mounts: tokio::sync::Mutex::new(Mounts::default()),
            next: AtomicU64::new(0),
            ready: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn ds(&self, sub: &str) -> String {
        format!("{}/{sub}", self.pool)
    }

    fn result_ds(&self, id: &str) -> String {
        self.ds(&format!("result/{id}"))
    }

    fn result_dir(&self, id: &str) -> PathBuf {
        self.root.join("result").join(id)
    }

    /// The pool's name (the first component of the store's dataset), for `zpool`.
    fn pool_name(&self) -> &str {
        self.pool.split('/').next().unwrap_or(&self.pool)
    }

    async fn zfs(&self, args: &[&str]) -> Result<String, StoreError> {
        let mut argv = vec!["zfs"];
        argv.extend_from_slice(args);
        Ok(self.exec.output(&Cmd::new(argv)).await?.stdout_str())
    }

    /// `zfs list -H` rows of `fields` (tab-separated), or `None` if `name` does not exist.
    async fn list_rows(
        &self,
        fields: &str,
        extra: &[&str],
        name: &str,
    ) -> Result<Option<Vec<Vec<String>>>, StoreError> {
        let mut args = vec!["list", "-H", "-o", fields];
        args.extend_from_slice(extra);
        args.push(name);
        match self.zfs(&args).await {
            Ok(out) => Ok(Some(
                out.lines()
                    .filter(|l| !l.is_empty())
                    .map(|l| l.split('\t').map(str::to_string).collect())
                    .collect(),
            )),
            Err(e) if missing(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `zfs list` rows of filesystem `ds` and its direct children (`None`: no `ds`).
    async fn with_children(
        &self,
        fields: &str,
        ds: &str,
    ) -> Result<Option<Vec<Vec<String>>>, StoreError> {
        self.list_rows(fields, &["-r", "-d", "1", "-t", "filesystem"], ds)
            .await
    }

    async fn exists(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.list_rows("name", &[], name).await?.is_some())
    }

    /// Runs a `zfs` command that can find a dataset busy (unmount, destroy), trying again a
    /// bounded number of times; a dataset still busy is reported with its mount point.
    async fn zfs_busy(&self, args: &[&str], mountpoint: &Path) -> Result<(), StoreError> {
        let mut delay = self.opts.busy_delay;
        let mut waited = Duration::ZERO;
        for attempt in 0..=self.opts.busy_retries {
            match self.zfs(args).await {
                Ok(_) => return Ok(()),
                Err(e) if busy(&e) && attempt < self.opts.busy_retries => {
                    tracing::info!(
                        "{} is busy; trying again in {} ms",
                        mountpoint.display(),
                        delay.as_millis()
                    );
                    tokio::time::sleep(delay).await;
                    waited += delay;
                    delay *= 2;
                }
                Err(e) if busy(&e) => {
                    tracing::warn!("{e}");
                    return Err(StoreError::Busy {
                        path: mountpoint.to_path_buf(),
                        secs: waited.as_secs(),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// `zfs destroy -r -f DATASET`, a missing one being fine.
    async fn destroy(&self, dataset: &str, mountpoint: &Path) -> Result<(), StoreError> {
        match self
            .zfs_busy(&["destroy", "-r", "-f", dataset], mountpoint)
            .await
        {
            Err(e) if missing(&e) => Ok(()),
            r => r,
        }
    }

    /// Mounts result `id` and its children if they are not, then keeps the mounted set
    /// within bounds.
    async fn mount_result(&self, id: &str, pin: bool) -> Result<(), StoreError> {
        let mut mounts = self.mounts.lock().await;
        if mounts.touch(id) {
            if pin {
                mounts.pin(id, 1);
            }
            return Ok(());
        }
        let ds = self.result_ds(id);
        let rows = self
            .with_children("name,mounted", &ds)
            .await?
            .unwrap_or_default();
        let mut datasets = Vec::new();
        for row in rows {
            let (name, mounted) = (row[0].clone(), row.get(1).map(String::as_str));
            if mounted != Some("yes") {
                match self.zfs(&["mount", &name]).await {
                    Err(e) if stderr_of(&e).is_some_and(|s| s.contains("already mounted")) => {}
                    r => {
                        r?;
                    }
                }
            }
            datasets.push(name);
        }
        mounts.list.push(Mounted {
            id: id.to_string(),
            datasets,
            pins: usize::from(pin),
        });
        self.evict(&mut mounts).await;
        Ok(())
    }

    /// Unmounts the least recently used results beyond `max_mounted` that nobody pins. A
    /// busy one stays mounted (someone still reads it) and is tried again later.
    async fn evict(&self, mounts: &mut Mounts) {
        let mut skipped = Vec::new();
        while mounts.list.len() > self.opts.max_mounted {
            let Some(i) = mounts.list.iter().position(|m| m.pins == 0) else {
                break;
            };
            let mut m = mounts.list.remove(i);
            if !self.unmount_all(&mut m, false).await {
                skipped.push(m);
            }
        }
        mounts.list.extend(skipped);
    }

    /// Unmounts a result's datasets, children first; false if one is busy. Children this
    /// process did not mount (a base image's, cloned by the fetcher) are found and
    /// unmounted first. `force` (`-f`, as `destroy -f`) for a build of this process's own
    /// whose step is over (its log may still be open for followers).
    async fn unmount_all(&self, m: &mut Mounted, force: bool) -> bool {
        let how: &[&str] = if force {
            &["unmount", "-f"]
        } else {
            &["unmount"]
        };
        for attempt in 0..2 {
            let mut busy_at = None;
            for ds in m.datasets.iter().rev() {
                if let Err(e) = self.zfs(&[how, &[ds.as_str()]].concat()).await {
                    if stderr_of(&e).is_some_and(|s| s.contains("not currently mounted")) {
                        continue;
                    }
                    tracing::debug!("keeping {ds} mounted: {e}");
                    busy_at = Some(ds.clone());
                    break;
                }
            }
            match busy_at {
                None => return true,
                // The parent is busy: perhaps with children it does not know of.
                Some(ds) if attempt == 0 && ds == m.datasets[0] => {
                    match self.with_children("name", &ds).await {
                        Ok(Some(rows)) if rows.len() > m.datasets.len() => {
                            m.datasets = rows.into_iter().map(|r| r[0].clone()).collect();
                        }
                        _ => return false,
                    }
                }
                Some(_) => return false,
            }
        }
        false
    }

    /// The direct child datasets of result `base`, by their last component.
    async fn children(&self, base: &str) -> Result<Vec<String>, StoreError> {
        let ds = self.result_ds(base);
        let rows = self.with_children("name", &ds).await?.unwrap_or_default();
        Ok(rows
            .into_iter()
            .filter_map(|r| r[0].strip_prefix(&format!("{ds}/")).map(str::to_string))
            .collect())
    }

    /// Where a child dataset of a build is mounted: `rootfs` is the tree, other children
    /// are directories of it.
    fn child_mountpoint(&self, id: &str, sub: &str) -> PathBuf {
        let rootfs = self.result_dir(id).join("rootfs");
        if sub == "rootfs" {
            rootfs
        } else {
            rootfs.join(sub)
        }
    }

    async fn make_build(&self, id: &str, base: Option<&str>) -> Result<Vec<String>, StoreError> {
        let ds = self.result_ds(id);
        let dir = self.result_dir(id);
        let mut datasets = vec![ds.clone()];
        match base {
            None => {
                self.zfs(&["create", "-o", "canmount=noauto", &ds]).await?;
                self.zfs(&["mount", &ds]).await?;
                let rootfs = dir.join("rootfs");
                std::fs::create_dir(&rootfs).map_err(StoreError::io("cannot create", &rootfs))?;
            }
            Some(b) => {
                let children = self.children(b).await?;
                let origin = format!("{}@snap", self.result_ds(b));
                self.zfs(&["clone", "-o", "canmount=noauto", &origin, &ds])
                    .await?;
                for sub in &children {
                    let mp = format!("mountpoint={}", self.child_mountpoint(id, sub).display());
                    let from = format!("{}/{sub}@snap", self.result_ds(b));
                    let to = format!("{ds}/{sub}");
                    self.zfs(&["clone", "-o", "canmount=noauto", "-o", &mp, &from, &to])
                        .await?;
                    datasets.push(to);
                }
                for d in &datasets {
                    self.zfs(&["mount", d]).await?;
                }
                // The clone holds the parent's log, env, …: the build starts with its tree only.
                for entry in crate::layout::entries(&dir)? {
                    let name = entry.file_name().unwrap_or_default();
                    if name != "rootfs" && name != ".zfs" {
                        if entry.is_dir() {
                            crate::layout::remove_tree(&entry)?;
                        } else {
                            std::fs::remove_file(&entry)
                                .map_err(StoreError::io("cannot remove", &entry))?;
                        }
                    }
                }
            }
        }
        Ok(datasets)
    }

    /// The lock serialising changes to one shared cache (checkouts, releases, delete).
    async fn cache_lock(&self, esc: &str) -> Result<GenLock, StoreError> {
        let dir = self.root.join("state").join("zfs-caches");
        std::fs::create_dir_all(&dir).map_err(StoreError::io("cannot create", &dir))?;
        GenLock::take(&dir.join(format!("{esc}.lock"))).await
    }

    /// The generation snapshots of cache master `master` (`…@gN`, with N), or `None` if
    /// the master does not exist.
    async fn cache_snapshots(
        &self,
        master: &str,
    ) -> Result<Option<Vec<(String, u64)>>, StoreError> {
        let rows = self
            .list_rows("name", &["-t", "snapshot", "-d", "1"], master)
            .await?;
        Ok(rows.map(|rows| {
            rows.into_iter()
                .filter_map(|r| generation_of(&r[0]).map(|g| (r[0].clone(), g)))
                .collect()
        }))
    }

    /// The latest generation of cache master `master` (its highest `@gN`): `None` if the
    /// master does not exist, `Some(None)` if it exists without a generation.
    async fn cache_generation(&self, master: &str) -> Result<Option<Option<u64>>, StoreError> {
        Ok(self
            .cache_snapshots(master)
            .await?
            .map(|snaps| snaps.iter().map(|(_, g)| *g).max()))
    }

    /// The checked-out copies of caches: `(dataset component, escaped cache name)`.
    async fn cache_copies(&self) -> Result<Vec<(String, String)>, StoreError> {
        let tmp = self.ds("cache-tmp");
        let rows = self.with_children("name", &tmp).await?.unwrap_or_default();
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                let c = r[0].strip_prefix(&format!("{tmp}/"))?.to_string();
                let esc = c.splitn(3, '-').nth(2)?.to_string();
                Some((c, esc))
            })
            .collect())
    }

    /// Start-up repairs of shared caches, for each prefix of a release that a crash can
    /// leave (see [`Store::cache_release`]'s steps 1–6):
    /// * a master that is a clone of a copy (crash after 3): promoted back, which returns
    ///   its snapshots to it; the copy is then an ordinary leftover;
    /// * a copy with a generation snapshot and no master (crash after 4): renamed to be the
    ///   master, finishing the release;
    /// * every other copy: destroyed (without `-R`: nothing outside `cache-tmp` can go);
    /// * older generations of a master (crash after 5): destroyed, deferred.
    async fn recover_caches(&self, rows: &[Vec<String>]) -> Result<(), StoreError> {
        let cache = format!("{}/", self.ds("cache"));
        let tmp = format!("{}/", self.ds("cache-tmp"));
        let direct = |name: &str, prefix: &str| {
            name.strip_prefix(prefix)
                .filter(|c| !c.contains('/') && !c.contains('@'))
                .map(str::to_string)
        };
        let mut masters: Vec<String> = Vec::new();
        for r in rows {
            if let Some(m) = direct(&r[0], &cache) {
                let origin = r.get(1).map(String::as_str).unwrap_or("-");
                if origin.starts_with(&tmp) {
                    tracing::info!("cache {m}: undoing an interrupted release");
                    self.zfs(&["promote", &r[0]]).await?;
                }
                masters.push(m);
            }
        }
        for r in rows {
            let Some(copy) = direct(&r[0], &tmp) else {
                continue;
            };
            let esc = copy.splitn(3, '-').nth(2).unwrap_or_default().to_string();
            let has_generation = rows
                .iter()
                .any(|s| s[0].starts_with(&format!("{}@g", r[0])));
            if has_generation && !esc.is_empty() && !masters.contains(&esc) {
                tracing::info!("cache {esc}: finishing an interrupted release");
                self.zfs(&["rename", &r[0], &format!("{cache}{esc}")])
                    .await?;
                masters.push(esc);
                continue;
            }
            tracing::info!("removing leftover cache copy {copy}");
            let mp = self.root.join("cache-tmp").join(&copy);
            self.destroy(&r[0], &mp).await?;
        }
        for m in &masters {
            let master = format!("{cache}{m}");
            let snaps = self.cache_snapshots(&master).await?.unwrap_or_default();
            let latest = snaps.iter().map(|(_, g)| *g).max();
            for (snap, g) in &snaps {
                if Some(*g) < latest {
                    self.zfs(&["destroy", "-d", snap]).await?;
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Store for ZfsStore {
    fn root(&self) -> &Path {
        &self.root
    }

    fn describe(&self) -> String {
        if self.root == Path::new("/").join(&self.pool) {
            format!("zfs:{}", self.pool)
        } else {
            format!("zfs:{}", self.root.display())
        }
    }

    /// Checks that the dataset exists and is mounted where the store says, then that
    /// `state` is a mounted dataset (made if missing: the original's layout), once per
    /// process.
    async fn ready_state(&self) -> Result<(), StoreError> {
        if self.ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(top) = self.list_rows("name,mountpoint", &[], &self.pool).await? else {
            return Err(StoreError::Mismatch {
                store: self.describe(),
                what: format!(
                    "there is no ZFS dataset {:?}: create the pool (`zpool create {} DEVICE`) or the dataset (`zfs create {}`) first",
                    self.pool, self.pool_name(), self.pool
                ),
            });
        };
        let mountpoint = top
            .first()
            .and_then(|r| r.get(1))
            .cloned()
            .unwrap_or_default();
        if Path::new(&mountpoint) != self.root {
            return Err(StoreError::Mismatch {
                store: self.describe(),
                what: format!(
                    "{} is mounted at {mountpoint}, not {}: use --store zfs:{mountpoint}, or `zfs set mountpoint={} {}`",
                    self.pool,
                    self.root.display(),
                    self.root.display(),
                    self.pool
                ),
            });
        }
        let state = self.ds("state");
        // Another process starting on the same new store may make or mount it first.
        let raced = |e: &StoreError| {
            stderr_of(e)
                .is_some_and(|s| s.contains("already exists") || s.contains("already mounted"))
        };
        match self.list_rows("name,mounted", &[], &state).await? {
            None => match self.zfs(&["create", &state]).await {
                Err(e) if raced(&e) => match self.zfs(&["mount", &state]).await {
                    Err(e) if !raced(&e) => return Err(e),
                    _ => {}
                },
                r => {
                    r?;
                }
            },
            Some(rows)
                if rows.first().and_then(|r| r.get(1)).map(String::as_str) != Some("yes") =>
            {
                match self.zfs(&["mount", &state]).await {
                    Err(e) if !raced(&e) => return Err(e),
                    _ => {}
                }
            }
            Some(_) => {}
        }
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Readies the pool and `state` (if not yet), makes the other three datasets, repairs
    /// caches (see `recover_caches`), destroys builds that have no snapshot (a crash
    /// mid-step or mid-delete) and unmounts every result, so the mounted set starts empty.
    async fn recover(&self) -> Result<(), StoreError> {
        self.ready_state().await?;
        let rows = self
            .list_rows(
                "name,origin,mounted",
                &["-r", "-t", "filesystem,snapshot"],
                &self.pool,
            )
            .await?
            .unwrap_or_default();
        let has = |name: &str| rows.iter().any(|r| r[0] == name);
        for sub in ["result", "cache", "cache-tmp"] {
            let ds = self.ds(sub);
            if !has(&ds) {
                match self.zfs(&["create", &ds]).await {
                    Err(e) if stderr_of(&e).is_some_and(|s| s.contains("already exists")) => {}
                    r => {
                        r?;
                    }
                }
            }
        }
        self.recover_caches(&rows).await?;
        let result = format!("{}/", self.ds("result"));
        for r in &rows {
            let Some(id) = r[0].strip_prefix(&result) else {
                continue;
            };
            if id.contains('/') || id.contains('@') {
                continue;
            }
            if !has(&format!("{}@snap", r[0])) {
                tracing::info!("removing leftover build {id}");
                self.destroy(&r[0], &self.result_dir(id)).await?;
            }
        }
        // Unmount results, children before parents.
        let mut mounted: Vec<&String> = rows
            .iter()
            .filter(|r| r[0].starts_with(&result) && r.get(2).map(String::as_str) == Some("yes"))
            .map(|r| &r[0])
            .collect();
        mounted.sort_by_key(|n| std::cmp::Reverse(n.matches('/').count()));
        for ds in mounted {
            let id = ds[result.len()..].split('/').next().unwrap_or_default();
            if !has(&format!("{}@snap", self.result_ds(id))) {
                continue; // destroyed above
            }
            if let Err(e) = self.zfs(&["unmount", ds]).await {
                tracing::warn!("cannot unmount {ds}: {e}");
            }
        }
        self.mounts.lock().await.list.clear();
        Ok(())
    }

    async fn result(&self, id: &str) -> Result<Option<PathBuf>, StoreError> {
        if self.mounts.lock().await.touch(id) {
            return Ok(Some(self.result_dir(id)));
        }
        if !self.exists(&format!("{}@snap", self.result_ds(id))).await? {
            return Ok(None);
        }
        self.mount_result(id, false).await?;
        Ok(Some(self.result_dir(id)))
    }

    async fn list(&self) -> Result<Vec<String>, StoreError> {
        let result = self.ds("result");
        let rows = self
            .list_rows("name", &["-t", "snapshot", "-r", "-d", "2"], &result)
            .await?
            .unwrap_or_default();
        let prefix = format!("{result}/");
        let mut ids: Vec<String> = rows
            .iter()
            .filter_map(|r| r[0].strip_prefix(&prefix)?.strip_suffix("@snap"))
            .filter(|id| !id.contains('/'))
            .map(str::to_string)
            .collect();
        ids.sort();
        Ok(ids)
    }

    async fn prepare(&self, id: &str, base: Option<&str>) -> Result<BuildDir, StoreError> {
        match self.make_build(id, base).await {
            Ok(datasets) => {
                let mut mounts = self.mounts.lock().await;
                mounts.forget(id);
                mounts.list.push(Mounted {
                    id: id.to_string(),
                    datasets,
                    pins: 1,
                });
                Ok(BuildDir::at(id, self.result_dir(id)))
            }
            Err(e) => {
                if let Err(e2) = self
                    .destroy(&self.result_ds(id), &self.result_dir(id))
                    .await
                {
                    tracing::warn!("cannot remove the failed build {id}: {e2}");
                }
                Err(e)
            }
        }
    }

    async fn stale_build(&self, id: &str) -> Result<Option<BuildDir>, StoreError> {
        if !self.exists(&self.result_ds(id)).await? {
            return Ok(None);
        }
        Ok(Some(BuildDir::at(id, self.result_dir(id))))
    }

    /// One recursive snapshot, atomic for the dataset and its children: the commit.
    async fn commit(&self, dir: &BuildDir) -> Result<PathBuf, StoreError> {
        let snap = format!("{}@snap", self.result_ds(&dir.id));
        self.zfs(&["snapshot", "-r", &snap]).await?;
        let mut mounts = self.mounts.lock().await;
        mounts.pin(&dir.id, -1);
        mounts.touch(&dir.id);
        self.evict(&mut mounts).await;
        Ok(self.result_dir(&dir.id))
    }

    /// A failed build kept as result `id` (`build --keep-failed`): its datasets are
    /// unmounted (children first, forced as `destroy -f` would), renamed (the children go with their parent), the
    /// children's mount points set under the new name, and the whole snapshotted as a
    /// commit is. The snapshot comes last: a crash before it leaves a dataset without one,
    /// which start-up removes. The kept result is mounted again on demand.
    async fn commit_as(&self, dir: &BuildDir, id: &str) -> Result<PathBuf, StoreError> {
        let from = self.result_ds(&dir.id);
        let to = self.result_ds(id);
        {
            let mut mounts = self.mounts.lock().await;
            let mut m = match mounts.position(&dir.id) {
                Some(i) => mounts.list.remove(i),
                None => Mounted {
                    id: dir.id.clone(),
                    datasets: vec![from.clone()],
                    pins: 0,
                },
            };
            if !self.unmount_all(&mut m, true).await {
                mounts.list.push(m);
                return Err(StoreError::Busy {
                    path: dir.dir.clone(),
                    secs: 0,
                });
            }
        }
        self.zfs(&["rename", &from, &to]).await?;
        for sub in self.children(id).await? {
            let mp = format!("mountpoint={}", self.child_mountpoint(id, &sub).display());
            self.zfs(&["set", &mp, &format!("{to}/{sub}")]).await?;
        }
        self.zfs(&["snapshot", "-r", &format!("{to}@snap")]).await?;
        Ok(self.result_dir(id))
    }

    async fn discard(&self, dir: &BuildDir) -> Result<(), StoreError> {
        self.mounts.lock().await.forget(&dir.id);
        self.destroy(&self.result_ds(&dir.id), &dir.dir).await
    }

    /// The snapshot goes first (so a crash leaves a build without one, which start-up
    /// removes), with `-R` for clones of it, which are junk by construction (the builder
    /// deletes dependants first and never deletes the parent of a running build).
    async fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.mounts.lock().await.forget(id);
        let ds = self.result_ds(id);
        let dir = self.result_dir(id);
        match self
            .zfs_busy(&["destroy", "-r", "-R", "-f", &format!("{ds}@snap")], &dir)
            .await
        {
            Err(e) if missing(&e) => {}
            r => r?,
        }
        self.destroy(&ds, &dir).await
    }

    async fn view(&self, id: &str) -> Result<PathBuf, StoreError> {
        self.mount_result(id, true).await?;
        Ok(self.result_dir(id).join("rootfs"))
    }

    async fn release_view(&self, view: &Path) -> Result<(), StoreError> {
        if let Some(id) = view
            .parent()
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
        {
            let mut mounts = self.mounts.lock().await;
            mounts.pin(id, -1);
            self.evict(&mut mounts).await;
        }
        Ok(())
    }

    /// The copy is a clone of the master's latest generation snapshot `@gN`, mounted; a
    /// new cache's master is created empty with its `@g0` first, so every copy is a clone.
    async fn cache_checkout(
        &self,
        name: &str,
        uid: u32,
        gid: u32,
    ) -> Result<CacheCopy, StoreError> {
        let esc = dataset_escape(name);
        let master = self.ds(&format!("cache/{esc}"));
        let _lock = self.cache_lock(&esc).await?;
        let generation = match self.cache_generation(&master).await? {
            Some(Some(g)) => g,
            found => {
                if found.is_none() {
                    self.zfs(&["create", "-o", "canmount=noauto", &master])
                        .await?;
                }
                self.zfs(&["snapshot", &format!("{master}@g0")]).await?;
                0
            }
        };
        let copy = format!(
            "{}-{}-{esc}",
            std::process::id(),
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let ds = self.ds(&format!("cache-tmp/{copy}"));
        let path = self.root.join("cache-tmp").join(&copy);
        let origin = format!("{master}@g{generation}");
        self.zfs(&["clone", "-o", "canmount=noauto", &origin, &ds])
            .await?;
        let r = async {
            self.zfs(&["mount", &ds]).await?;
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .map_err(StoreError::io("cannot chown", &path))
        }
        .await;
        if let Err(e) = r {
            let _ = self.destroy(&ds, &path).await;
            return Err(e);
        }
        Ok(CacheCopy {
            name: name.to_string(),
            path,
            generation,
        })
    }

    /// Publishing a copy (its master's generation unchanged since checkout), in steps
    /// whose every prefix start-up repairs (`recover_caches`):
    /// 1. unmount the copy; 2. snapshot it `@g(N+1)`; 3. promote it, which moves the
    ///    master's snapshots, and the other copies' origins, onto it (only if it is a
    ///    clone); 4. destroy the old master, now a clone without snapshots; 5. rename the
    ///    copy to the master; 6. destroy `@gN`, deferred until the last copy of it goes.
    ///
    /// A copy taken before another was published is destroyed (first release wins).
    async fn cache_release(&self, copy: CacheCopy, keep: bool) -> Result<(), StoreError> {
        let esc = dataset_escape(&copy.name);
        let master = self.ds(&format!("cache/{esc}"));
        let component = copy
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let ds = self.ds(&format!("cache-tmp/{component}"));
        if keep {
            let _lock = self.cache_lock(&esc).await?;
            let now = self.cache_generation(&master).await?.flatten();
            if now == Some(copy.generation) {
                let next = copy.generation + 1;
                self.zfs_busy(&["unmount", &ds], &copy.path).await?;
                self.zfs(&["snapshot", &format!("{ds}@g{next}")]).await?;
                let origin = self
                    .list_rows("origin", &[], &ds)
                    .await?
                    .and_then(|r| r.first().map(|r| r[0].clone()))
                    .unwrap_or_default();
                if origin == format!("{master}@g{}", copy.generation) {
                    self.zfs(&["promote", &ds]).await?;
                    self.zfs(&["destroy", &master]).await?;
                } else {
                    // Not a clone of the master (made by hand, or by another tool): the old
                    // master keeps its snapshots, and goes with its last copy.
                    tracing::warn!("cache copy {ds} is not a clone of {master}; replacing it");
                    let old = self.ds(&format!(
                        "cache-tmp/old-{}-{}-{esc}",
                        std::process::id(),
                        self.next.fetch_add(1, Ordering::Relaxed)
                    ));
                    self.zfs(&["rename", &master, &old]).await?;
                    if let Err(e) = self.zfs(&["destroy", "-r", &old]).await {
                        tracing::info!("{old} stays until its copies go: {e}");
                    }
                }
                self.zfs(&["rename", &ds, &master]).await?;
                let old_snap = format!("{master}@g{}", copy.generation);
                if let Err(e) = self.zfs(&["destroy", "-d", &old_snap]).await {
                    if !missing(&e) {
                        return Err(e);
                    }
                }
                return Ok(());
            }
            tracing::info!(
                "cache {:?}: a newer version was published first; discarding this copy",
                copy.name
            );
        }
        self.destroy(&ds, &copy.path).await
    }

    async fn cache_list(&self) -> Result<Vec<CacheInfo>, StoreError> {
        let cache = self.ds("cache");
        let rows = self
            .with_children("name", &cache)
            .await?
            .unwrap_or_default();
        let copies = self.cache_copies().await?;
        let mut out: Vec<CacheInfo> = rows
            .iter()
            .filter_map(|r| {
                let esc = r[0].strip_prefix(&format!("{cache}/"))?;
                Some(CacheInfo {
                    name: dataset_unescape(esc)?,
                    in_use: copies
                        .iter()
                        .filter(|(c, e)| e == esc && !c.starts_with("old-"))
                        .count(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn cache_delete(&self, name: &str) -> Result<(), StoreError> {
        let esc = dataset_escape(name);
        let master = self.ds(&format!("cache/{esc}"));
        let _lock = self.cache_lock(&esc).await?;
        if !self.exists(&master).await? {
            return Err(StoreError::NoCache {
                name: name.to_string(),
            });
        }
        let users = self
            .cache_copies()
            .await?
            .iter()
            .filter(|(c, e)| *e == esc && !c.starts_with("old-"))
            .count();
        if users > 0 {
            return Err(StoreError::CacheInUse {
                name: name.to_string(),
                users,
            });
        }
        self.zfs(&["destroy", "-r", "-f", &master]).await?;
        Ok(())
    }

    /// ZFS frees the blocks of destroyed datasets in the background: `zpool wait -t free`
    /// waits for that (the original slept 5 s).
    async fn complete_deletes(&self) -> Result<(), StoreError> {
        let cmd = Cmd::new(["zpool", "wait", "-t", "free", self.pool_name()]);
        if let Err(e) = self.exec.output(&cmd).await {
            tracing::warn!("zpool wait did not finish: {e}");
        }
        Ok(())
    }

    /// The pool's size and free bytes from `zpool list` (statvfs is wrong for ZFS on macOS,
    /// OCluster #229).
    async fn df(&self) -> Result<DiskUsage, StoreError> {
        let cmd = Cmd::new(["zpool", "list", "-Hp", "-o", "size,free", self.pool_name()]);
        let out = self.exec.output(&cmd).await?.stdout_str();
        let nums: Vec<u64> = out
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        match nums[..] {
            [total_bytes, free_bytes] => Ok(DiskUsage {
                total_bytes,
                free_bytes,
            }),
            _ => Err(StoreError::Mismatch {
                store: self.describe(),
                what: format!("cannot read `zpool list` output {:?}", out.trim()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_names_become_valid_dataset_names() {
        for name in ["opam-archives", "a/b", "..", "x y", "\n1", "\u{a1}", "c:d"] {
            let e = dataset_escape(name);
            assert!(
                e.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-:.".contains(c)),
                "{e}"
            );
            assert_eq!(dataset_unescape(&e).as_deref(), Some(name));
        }
        assert_eq!(dataset_escape("a/b"), "c-a:2Fb");
        assert_eq!(generation_of("tank/cache/c-x@g12"), Some(12));
        assert_eq!(generation_of("tank/cache/c-x@snap"), None);
    }
}
