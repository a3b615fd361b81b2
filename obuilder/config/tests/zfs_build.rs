#![cfg(target_os = "linux")]
//! A whole builder on the ZFS store: the real engine, database and runc sandbox, with the
//! `zfs` commands answered by `testkit::fakezfs` (a fake: no ZFS module for this kernel).
//! Steps really run in runc on the trees the fake keeps at the datasets' mount points.

use std::sync::Arc;

use obuilder_config::{healthcheck, BuilderConfig, HealthcheckOptions, StoreSpec};
use obuilder_engine::exec::RealExec;
use obuilder_engine::log::buffer_sink;
use obuilder_engine::BuildOptions;
use obuilder_spec::Spec;
use testkit::fakezfs::FakeZfs;
use testkit::{require, Cap, LoopFs};

#[tokio::test]
async fn fake_zfs_store_runs_real_runc_builds_cached_and_with_caches() {
    require!(
        Cap::Root,
        Cap::Tool("runc"),
        Cap::Tool("mkfs.ext4"),
        Cap::File("/bin/busybox")
    );
    let fs = LoopFs::new("ext4", 256);
    let root = fs.mnt.join("tank");
    let zfs = Arc::new(
        FakeZfs::new("tank", &root, &fs.mnt.join("fake-zfs")).with_passthrough(RealExec::shared()),
    );
    let mut config = BuilderConfig::new(StoreSpec::Zfs {
        pool: "tank".into(),
        root: root.clone(),
    });
    config.sandbox = Some("runc".parse().unwrap());
    config.exec = zfs.clone();
    let builder = config.open().await.expect("open on the fake pool");
    assert!(
        root.join("state/db/db.sqlite").exists(),
        "the database is on tank/state"
    );

    // The healthcheck imports an image and runs a step in runc.
    let opts = HealthcheckOptions {
        busybox: "/bin/busybox".into(),
        ..Default::default()
    };
    healthcheck(&builder, &config.images(), &config.exec, &opts)
        .await
        .expect("healthcheck");

    // Results the healthcheck made are gone with it.
    assert!(
        !zfs.names().iter().any(|n| n.starts_with("tank/result/")),
        "{:?}",
        zfs.names()
    );

    let ctx = tempfile::tempdir().unwrap();
    let rootfs = ctx.path().join("busybox");
    testkit::e2e::make_busybox(&rootfs);
    obuilder_fetch::import::import(
        &config.images(),
        &config.exec,
        obuilder_fetch::import::ImportRequest {
            name: "busybox",
            path: &rootfs,
            env: Some(vec![("PATH".into(), "/bin:/usr/bin".into())]),
            platform: None,
        },
    )
    .await
    .unwrap();
    let spec = |last: &str| {
        Spec::parse(&format!(
            r#"((from busybox)
                (shell /bin/sh -c)
                (run (cache (dl (target /var/cache/dl)))
                     (shell "echo cached >> /var/cache/dl/f; echo one > /one"))
                (run (cache (dl (target /var/cache/dl)))
                     (shell "cat /var/cache/dl/f /one; echo {last}")))"#
        ))
        .unwrap()
    };
    let build = |s: Spec| {
        let builder = &builder;
        let ctx = ctx.path().to_path_buf();
        async move {
            let (sink, text) = buffer_sink();
            let id = builder
                .build(&s, &BuildOptions::new(ctx, sink))
                .await
                .unwrap_or_else(|e| panic!("build: {e}\n{}", text.lock().unwrap()));
            let log = text.lock().unwrap().clone();
            (id, log)
        }
    };
    let (first, log) = build(spec("two")).await;
    assert!(log.contains("cached\none\ntwo"), "{log}");
    let (again, log) = build(spec("two")).await;
    assert_eq!(first, again);
    assert!(!log.contains("saved as"), "fully cached: {log}");
    let (third, log) = build(spec("three")).await;
    assert_ne!(first, third);
    assert!(
        log.contains("cached\none\nthree"),
        "only the last step ran: {log}"
    );

    // Each result is a dataset with its snapshot; the cache has one generation.
    let names = zfs.names();
    assert!(
        names.contains(&format!("tank/result/{first}@snap")),
        "{names:?}"
    );
    assert_eq!(
        names
            .iter()
            .filter(|n| n.starts_with("tank/cache/c-dl@g"))
            .count(),
        1,
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n.starts_with("tank/cache-tmp/")),
        "{names:?}"
    );

    // Delete and a restart (recovery) keep the store whole.
    let (sink, _) = buffer_sink();
    builder.delete(&third, &sink).await.unwrap();
    assert!(!zfs.names().contains(&format!("tank/result/{third}@snap")));
    drop(builder);
    let builder = config.open().await.expect("reopen");
    let (sink, text) = buffer_sink();
    let id = builder
        .build(&spec("two"), &BuildOptions::new(ctx.path(), sink))
        .await
        .unwrap();
    assert_eq!(id, first);
    assert!(!text.lock().unwrap().contains("saved as"));
    assert!(
        zfs.mounted()
            .iter()
            .filter(|d| d.starts_with("tank/result/"))
            .count()
            <= 32
    );

    // `--keep-failed`: the failed step's datasets become a result of their own, which a
    // second failure of the same step replaces.
    let failing = Spec::parse(
        r#"((from busybox) (shell /bin/sh -c)
            (run (shell "echo one > /a"))
            (run (shell "echo partial > /half; exit 3")))"#,
    )
    .unwrap();
    for round in 0..2 {
        let (sink, text) = buffer_sink();
        let mut opts = BuildOptions::new(ctx.path(), sink);
        opts.keep_failed = true;
        builder
            .build(&failing, &opts)
            .await
            .expect_err("the step fails");
        let log = text.lock().unwrap().clone();
        let short = log
            .split("`obuilder shell ")
            .nth(1)
            .and_then(|s| s.split('`').next())
            .unwrap_or_else(|| panic!("round {round}: no kept id in:\n{log}"))
            .to_string();
        let kept: Vec<String> = zfs
            .names()
            .into_iter()
            .filter_map(|n| {
                let id = n.strip_prefix("tank/result/")?.strip_suffix("@snap")?;
                id.starts_with(&short).then(|| id.to_string())
            })
            .collect();
        assert_eq!(kept.len(), 1, "round {round}: {:?}", zfs.names());
        let snap = zfs
            .snapshot_dir(&format!("tank/result/{}@snap", kept[0]))
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(snap.join("rootfs/a")).unwrap()
                + &std::fs::read_to_string(snap.join("rootfs/half")).unwrap(),
            "one\npartial\n",
            "round {round}"
        );
    }
}
