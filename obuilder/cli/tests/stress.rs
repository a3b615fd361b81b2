#![cfg(target_os = "linux")]
//! The original's stress test, on every real store: 100 random multi-step builds, 10 at a
//! time, sharing a cache, through the engine as a library with real runc; then prune
//! everything and check that the store and the database agree and nothing leaked.

// Tests drive the real binary and tools directly.
#![allow(clippy::disallowed_methods)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use obuilder_config::{BuilderConfig, SandboxSpec};
use obuilder_engine::log::buffer_sink;
use obuilder_engine::store::Store;
use obuilder_engine::BuildOptions;
use obuilder_fetch::import::{import, ImportRequest};
use obuilder_fetch::FetchConfig;
use obuilder_sandbox::RuncOptions;
use obuilder_spec::Spec;
use obuilder_stores::rsync::RsyncMode;
use obuilder_stores::StoreSpec;
use testkit::{Cap, LoopFs};

/// A small deterministic generator (the same builds every run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn random_spec(rng: &mut Lcg) -> String {
    let mut ops = String::new();
    for _ in 0..1 + rng.next(4) {
        // Few choices per step, so builds share prefixes (in-flight sharing and cache hits).
        let op = match rng.next(4) {
            0 => format!("(run (shell \"echo {} > /f{}\"))", rng.next(3), rng.next(3)),
            1 => format!(
                "(run (cache (shared (target /cache))) (shell \"echo x >> /cache/log; echo {}\"))",
                rng.next(2)
            ),
            2 => format!(
                "(run (shell \"sleep 0.0{}; ls / > /dev/null\"))",
                rng.next(3)
            ),
            _ => format!("(env V{} {})", rng.next(2), rng.next(2)),
        };
        ops.push_str(&op);
        ops.push('\n');
    }
    format!("((from busybox) (shell /bin/sh -c)\n{ops})")
}

fn leftovers(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for d in ["result-tmp", "cache-tmp", "state/runc-tmp"] {
        if let Ok(rd) = std::fs::read_dir(root.join(d)) {
            out.extend(
                rd.flatten()
                    .map(|e| format!("{d}/{}", e.file_name().to_string_lossy())),
            );
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    out.extend(
        mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&format!("{}/", root.display())))
            .map(str::to_string),
    );
    let runc = Command::new("runc")
        .args([
            "--root",
            root.join("state/runc").to_str().unwrap(),
            "list",
            "-q",
        ])
        .output()
        .unwrap();
    out.extend(
        String::from_utf8_lossy(&runc.stdout)
            .lines()
            .map(|l| format!("container {l}")),
    );
    out
}

async fn stress(fs_kind: &str, store_for: impl Fn(&Path) -> StoreSpec) {
    let fs = LoopFs::new(fs_kind, 1024);
    let root = fs.mnt.join("store");
    // The engine as a library, put together as a worker would.
    let mut config = BuilderConfig::new(store_for(&root));
    config.sandbox = Some(SandboxSpec::Runc(RuncOptions {
        fast_sync: true,
        ..RuncOptions::default()
    }));
    config.fetch = FetchConfig::local();
    let builder = Arc::new(config.open().await.unwrap());
    let store: Arc<dyn Store> = builder.store().clone();
    let images = config.images();
    let exec = config.exec.clone();
    let rootfs = fs.mnt.join("busybox");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/make-busybox-rootfs.sh"
    );
    assert!(Command::new("bash")
        .args([script, rootfs.to_str().unwrap()])
        .status()
        .unwrap()
        .success());
    import(
        &images,
        &exec,
        ImportRequest {
            name: "busybox",
            path: &rootfs,
            env: None,
            platform: None,
        },
    )
    .await
    .unwrap();
    let mut rng = Lcg(42);
    let specs: Vec<Spec> = (0..100)
        .map(|_| Spec::parse(&random_spec(&mut rng)).unwrap())
        .collect();
    // Each build asks for its base and each `run`.
    let requested_steps: usize = specs
        .iter()
        .map(|s| {
            1 + s
                .ops
                .iter()
                .filter(|o| matches!(o, obuilder_spec::Op::Run(_)))
                .count()
        })
        .sum();
    let sem = Arc::new(tokio::sync::Semaphore::new(10));
    let mut tasks = Vec::new();
    for (i, spec) in specs.into_iter().enumerate() {
        let (b, sem) = (builder.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            let (sink, log) = buffer_sink();
            let r = b.build(&spec, &BuildOptions::new("/tmp", sink)).await;
            let text = log.lock().unwrap().clone();
            (i, r, text)
        }));
    }
    for t in tasks {
        let (i, r, log) = t.await.unwrap();
        assert!(r.is_ok(), "build {i} failed: {r:?}\n{log}");
    }
    let built = builder.count().unwrap() as i64;
    assert!(built > 10, "{built} results");
    assert_eq!(
        store.list().await.unwrap().len() as i64,
        built,
        "store and db agree after building"
    );
    // Sharing happened: far fewer steps ran than were asked for (whether a shared step was a
    // cache hit or joined while in flight depends on timing; the count of distinct steps
    // does not).
    let requested: usize = requested_steps;
    assert!(
        (built as usize) * 2 < requested,
        "{built} distinct steps ran for {requested} requested"
    );

    // Prune everything.
    let removed = builder
        .prune(None, usize::MAX, &buffer_sink().0)
        .await
        .unwrap();
    assert_eq!(removed as i64, built);
    assert_eq!(builder.count().unwrap(), 0);
    assert!(
        store.list().await.unwrap().is_empty(),
        "store and db agree after pruning"
    );
    builder.wait_idle().await;
    assert_eq!(leftovers(&root), Vec::<String>::new(), "nothing leaked");
    // The shared cache survived all of it and counted every run that used it.
    let c = store.cache_checkout("shared", 0, 0).await.unwrap();
    let runs = std::fs::read_to_string(c.path.join("log"))
        .unwrap_or_default()
        .lines()
        .count();
    assert!(runs >= 1, "the shared cache kept its contents");
    store.cache_release(c, false).await.unwrap();
}

fn gate(extra: Cap) -> bool {
    testkit::require(
        module_path!(),
        &[
            Cap::Root,
            Cap::Tool("runc"),
            Cap::File("/bin/busybox"),
            Cap::Tool("tar"),
            extra,
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stress_btrfs() {
    if gate(Cap::Tool("mkfs.btrfs")) {
        stress("btrfs", |r| StoreSpec::Btrfs(r.to_path_buf())).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stress_overlayfs() {
    if gate(Cap::OverlayLowerdirPlus) {
        stress("ext4", |r| StoreSpec::Overlayfs(r.to_path_buf())).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stress_xfs() {
    if gate(Cap::Tool("mkfs.xfs")) {
        stress("xfs", |r| StoreSpec::Xfs(r.to_path_buf())).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stress_rsync_copy() {
    if gate(Cap::Tool("rsync")) {
        stress("ext4", |r| {
            StoreSpec::Rsync(r.to_path_buf(), Some(RsyncMode::Copy))
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stress_rsync_hardlink() {
    if gate(Cap::Tool("rsync")) {
        stress("ext4", |r| {
            StoreSpec::Rsync(r.to_path_buf(), Some(RsyncMode::Hardlink))
        })
        .await;
    }
}
