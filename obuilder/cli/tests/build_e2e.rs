#![cfg(target_os = "linux")]
//! `obuilder build` end to end: the real binary, its default (native) sandbox and runc,
//! real stores on loopback
//! filesystems, a busybox image made from Debian's busybox-static package.

// Tests drive the real binary and tools directly.
#![allow(clippy::disallowed_methods)]

use std::path::Path;
use std::process::{Command, Stdio};

use testkit::e2e::{
    caps, eventually, make_busybox, native_cgroup_left, process_alive, redact, start_until,
    start_until_line, text, Env, SANDBOXES,
};
use testkit::{require, Cap};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_obuilder")
}

const QUICKSTART: &str = include_str!("../../../examples/quickstart.spec");

fn transcript(kind: &str) {
    let env = Env::new(bin(), kind);
    let spec = env.spec("q.spec", QUICKSTART);
    let first = env.build(&spec);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let expected_first = "\
(from busybox)
Extracting layer 1/1 sha256:[ID]
---> saved as \"[ID]\"
/: (shell /bin/sh -c)
/: (run (shell \"mkdir -p /data && echo step1 > /data/1\"))
---> saved as \"[ID]\"
/: (run (shell \"seq 1 10000 > /data/2\"))
---> saved as \"[ID]\"
/: (run (shell \"wc -l /data/2 > /data/3\"))
---> saved as \"[ID]\"
/: (run (shell \"dd if=/dev/zero of=/data/4 bs=1024 count=1024 2>/dev/null\"))
---> saved as \"[ID]\"
/: (run (shell \"ls -l /data > /data/5 && echo last-step-v0\"))
last-step-v0
---> saved as \"[ID]\"
Got: \"[ID]\"
";
    assert_eq!(
        redact(&text(&first.stdout)),
        expected_first,
        "{kind}: first run"
    );

    let second = env.build(&spec);
    assert!(second.status.success());
    // A cached base shows no fetch notes: they were the fetch's, not the base's output.
    let expected_second = expected_first
        .replace("Extracting layer 1/1 sha256:[ID]\n", "")
        .replace("---> saved as", "---> using")
        .replace("\"[ID]\"\n/", "\"[ID]\" from cache\n/")
        .replace(
            "last-step-v0\n---> using \"[ID]\"\n",
            "last-step-v0\n---> using \"[ID]\" from cache\n",
        );
    assert_eq!(
        redact(&text(&second.stdout)),
        expected_second,
        "{kind}: second run is all from cache"
    );
    assert_eq!(
        text(&first.stdout).lines().last(),
        text(&second.stdout).lines().last(),
        "same final id"
    );

    let changed = env.spec(
        "q2.spec",
        &QUICKSTART.replace("last-step-v0", "last-step-v1"),
    );
    let third = env.build(&changed);
    let out = redact(&text(&third.stdout));
    assert_eq!(
        out.matches("from cache").count(),
        5,
        "{kind}: all but the last step cached:\n{out}"
    );
    assert!(
        out.ends_with("last-step-v1\n---> saved as \"[ID]\"\nGot: \"[ID]\"\n"),
        "{out}"
    );
    env.assert_clean();
}

#[test]
fn transcript_btrfs() {
    require!(
        Cap::Root,
        Cap::Tool("runc"),
        Cap::File("/bin/busybox"),
        Cap::Tool("mkfs.btrfs")
    );
    transcript("btrfs");
}

#[test]
fn transcript_overlayfs() {
    require!(
        Cap::Root,
        Cap::Tool("runc"),
        Cap::File("/bin/busybox"),
        Cap::Tool("mkfs.ext4"),
        Cap::OverlayLowerdirPlus
    );
    transcript("overlayfs");
}

#[test]
fn transcript_xfs() {
    require!(
        Cap::Root,
        Cap::Tool("runc"),
        Cap::File("/bin/busybox"),
        Cap::Tool("mkfs.xfs")
    );
    transcript("xfs");
}

#[test]
fn transcript_rsync_copy() {
    require!(
        Cap::Root,
        Cap::Tool("runc"),
        Cap::File("/bin/busybox"),
        Cap::Tool("rsync")
    );
    transcript("rsync-copy");
}

#[test]
fn transcript_rsync_hardlink() {
    require!(
        Cap::Root,
        Cap::Tool("runc"),
        Cap::File("/bin/busybox"),
        Cap::Tool("rsync")
    );
    transcript("rsync-hardlink");
}

#[test]
fn copy_stages_users_and_env() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    let env = Env::new(bin(), "btrfs");
    let spec = env.spec(
        "t.spec",
        r#"((build tool
  ((from busybox)
   (shell /bin/sh -c)
   (run (shell "mkdir -p /opt && echo built-by-stage > /opt/tool"))))
 (from busybox)
 (shell /bin/sh -c)
 (workdir /src)
 (user (uid 1000) (gid 1000))
 (copy (src .) (dst ./) (exclude sub))
 (copy (src sub/run.sh) (dst /usr/local/bin/run-me))
 (copy (from (build tool)) (src /opt/tool) (dst tool))
 (env GREETING "hello world")
 (run (shell "id -u; pwd; stat -c '%u:%g %a %n' a.txt tool /usr/local/bin/run-me; ls; cat tool; echo $GREETING")))"#,
    );
    let out = env.build(&spec);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let o = text(&out.stdout);
    for want in [
        "1000\n/src\n",
        "1000:1000 644 a.txt\n",
        "1000:1000 644 tool\n",
        "1000:1000 644 /usr/local/bin/run-me\n",
        "a.txt\ntool\n",
        "built-by-stage\nhello world\n",
        "--> finished \"tool\"",
    ] {
        assert!(o.contains(want), "missing {want:?} in:\n{o}");
    }
    env.assert_clean();
}

#[test]
fn a_failed_step_is_named_and_not_cached() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    let env = Env::new(bin(), "btrfs");
    let spec = env.spec(
        "f.spec",
        "((from busybox) (shell /bin/sh -c) (run (shell \"echo about-to-fail; exit 3\")))",
    );
    let out = env.build(&spec);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("about-to-fail"),
        "the failed step's log is shown"
    );
    let err = text(&out.stderr);
    assert!(
        err.contains(
            "Build step failed: `/bin/sh -c \"echo about-to-fail; exit 3\"` exited with status 3"
        ),
        "{err}"
    );
    assert!(
        err.contains("in step 2/2: /: (run (shell \"echo about-to-fail; exit 3\"))"),
        "{err}"
    );
    // Not cached: the next attempt runs it again.
    let again = env.build(&spec);
    assert!(text(&again.stdout).contains("about-to-fail"));
    assert!(
        !text(&again.stdout).contains("from cache\nabout"),
        "failures are never cached"
    );
    env.assert_clean();
}

#[test]
fn unknown_image_and_bad_spec_fail_clearly() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    let env = Env::new(bin(), "btrfs");
    let spec = env.spec("u.spec", "((from nosuchimage) (run (shell \"true\")))");
    // Offline (--pull never): tests never reach past loopback.
    let mut args = env.args(&[
        "build",
        "-f",
        spec.to_str().unwrap(),
        env.ctx.to_str().unwrap(),
    ]);
    args.extend(["--pull".to_string(), "never".to_string()]);
    let out = Command::new(bin()).args(&args).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("unknown image \"nosuchimage\""),
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("obuilder image import nosuchimage"),
        "{}",
        text(&out.stderr)
    );
    // A registry that is not there (loopback port 1).
    let gone = env.spec(
        "g.spec",
        "((from 127.0.0.1:1/nothing:v1) (run (shell \"true\")))",
    );
    let out = env.build(&gone);
    assert_eq!(out.status.code(), Some(3), "obuilder could not do its part");
    assert!(
        text(&out.stderr).contains("cannot reach registry 127.0.0.1:1"),
        "{}",
        text(&out.stderr)
    );
    let bad = env.spec("b.spec", "((from busybox) (rn (shell \"true\")))");
    let out = env.build(&bad);
    assert_eq!(out.status.code(), Some(2), "a spec that does not parse");
    assert!(
        text(&out.stderr).contains("b.spec:1:18: error: unknown operation `rn`"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn ctrl_c_kills_the_container_and_records_nothing() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    for sandbox in SANDBOXES {
        let env = Env::new(bin(), "btrfs").sandboxed(sandbox);
        let spec = env.spec(
            "s.spec",
            "((from busybox) (shell /bin/sh -c) (run (shell \"echo started; sleep 300\")))",
        );
        let (child, _rest) = start_until_line(
            &env,
            &spec,
            &[],
            Stdio::piped(),
            |l| l == "started",
            "started",
        );
        let pid = child.id();
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&child),
            rustix::process::Signal::INT,
        )
        .unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(130),
            "{sandbox}: {}",
            text(&out.stderr)
        );
        assert!(text(&out.stderr).contains("Cancelled at user's request"));
        env.assert_clean();
        assert!(
            !native_cgroup_left(pid),
            "{sandbox}: a step's cgroup is left"
        );
        let results = std::fs::read_dir(env.root().join("result"))
            .unwrap()
            .count();
        assert_eq!(results, 1, "{sandbox}: only the base image was recorded");
    }
}

#[test]
fn crash_mid_step_then_restart_leaves_nothing_and_builds() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    // (sleeps no other test uses: the check below looks at every process)
    for (sandbox, secs) in SANDBOXES.iter().zip([297, 296]) {
        let env = Env::new(bin(), "btrfs").sandboxed(sandbox);
        let spec = env.spec(
            "s.spec",
            &format!(
                "((from busybox) (shell /bin/sh -c) (run (shell \"echo started; sleep {secs}\")))"
            ),
        );
        let mut child = start_until(&env, &spec, &[], "started");
        child.kill().unwrap(); // SIGKILL: no chance to clean up
        child.wait().unwrap();
        assert!(
            std::fs::read_dir(env.root().join("result-tmp"))
                .unwrap()
                .count()
                > 0,
            "{sandbox}: the crash left a build dir"
        );
        let ok = env.spec(
            "ok.spec",
            "((from busybox) (shell /bin/sh -c) (run (shell \"echo after-crash\")))",
        );
        let out = env.build(&ok);
        assert!(out.status.success(), "{sandbox}: {}", text(&out.stderr));
        assert!(text(&out.stdout).contains("after-crash"));
        env.assert_clean();
        // The killed step's `sleep` is gone too.
        eventually(
            &format!("{sandbox}: the crashed build's process ends"),
            10,
            || !process_alive(&format!("sleep {secs}")),
        );
    }
}

#[test]
fn maintenance_commands() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    let env = Env::new(bin(), "btrfs");
    let spec = env.spec("q.spec", QUICKSTART);
    let out = env.build(&spec);
    let last = text(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .trim_start_matches("Got: ")
        .trim_matches('"')
        .to_string();
    let df = env.run(&["df"]);
    assert!(
        text(&df.stdout).contains("results: 6"),
        "{}",
        text(&df.stdout)
    );
    let del = env.run(&["delete", &last]);
    assert!(
        text(&del.stdout).contains(&format!("Removing {last}")),
        "{}",
        text(&del.stdout)
    );
    let prune = env.run(&["prune", "--before", "1d"]);
    assert!(
        text(&prune.stdout).contains("Removed 0 items"),
        "nothing is a day old: {}",
        text(&prune.stdout)
    );
    let prune = env.run(&["prune", "--before", "2999-01-01", "--limit", "2"]);
    assert!(
        text(&prune.stdout).contains("Removed 2 items"),
        "{}",
        text(&prune.stdout)
    );
    let clean = env.run(&["clean"]);
    assert!(
        text(&clean.stdout).contains("Removed 3 items"),
        "{}",
        text(&clean.stdout)
    );
    assert_eq!(
        std::fs::read_dir(env.root().join("result"))
            .unwrap()
            .count(),
        0
    );
    let hc = env.run(&["healthcheck"]);
    assert!(
        hc.status.success(),
        "{}{}",
        text(&hc.stdout),
        text(&hc.stderr)
    );
    assert!(text(&hc.stdout).contains("Healthcheck passed"));
    let unknown = env.run(&["delete", "0000"]);
    assert_eq!(unknown.status.code(), Some(2));
}

#[test]
fn store_flag_errors_list_every_form() {
    let out = Command::new(bin())
        .args(["df", "--store", "nfs:/x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let e = text(&out.stderr);
    assert!(
        e.contains("unknown store kind \"nfs\"")
            && e.contains("btrfs:/ABS/PATH, overlayfs:/ABS/PATH, rsync:/ABS/PATH"),
        "{e}"
    );
}

#[test]
fn sandbox_network_hostname_hosts_and_fast_sync() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    for sandbox in SANDBOXES {
        let env = Env::new(bin(), "btrfs").sandboxed(sandbox);
        let spec = env.spec(
        "n.spec",
        r#"((from busybox)
 (shell /bin/sh -c)
 (run (shell "echo isolated=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ,); hostname; cat /etc/hosts"))
 (run (network host) (shell "echo host-ifaces=$(tail -n +3 /proc/net/dev | wc -l); test -s /etc/resolv.conf && echo resolv-ok; echo x > /etc/resolv.conf || echo resolv-ro"))
 (run (shell "sync; echo synced"))
 (run (shell "echo over-loopback > /tmp/msg; (sleep 60 | nc -l -p 7777 > /tmp/got &); ok=0; for i in $(seq 200); do nc 127.0.0.1 7777 < /tmp/msg && { ok=1; break; }; sleep 0.1; done; echo connected=$ok; for i in $(seq 200); do test -s /tmp/got && break; sleep 0.1; done; cat /tmp/got")))"#,
    );
        let out = env.build_with(&spec, &["--fast-sync"]);
        let o = text(&out.stdout);
        assert!(out.status.success(), "{o}{}", text(&out.stderr));
        assert!(
            o.contains("isolated=lo,\n"),
            "only loopback without (network host):\n{o}"
        );
        assert!(o.contains("builder\n127.0.0.1 localhost builder\n"), "{o}");
        let host_ifaces: usize = o
            .rsplit("host-ifaces=")
            .next()
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(host_ifaces >= 1, "{o}");
        assert!(
            o.contains("resolv-ok\n") && o.contains("resolv-ro\n"),
            "the host's resolv.conf, read-only:\n{o}"
        );
        assert!(o.contains("synced\n"));
        assert!(
            o.contains("\nover-loopback\n"),
            "{sandbox}: loopback works in the isolated network:\n{o}"
        );
    }
}

#[test]
fn build_from_a_registry_image_then_offline() {
    if !testkit::require(module_path!(), &caps())
        || !testkit::require(
            module_path!(),
            &[Cap::Tool("docker-registry"), Cap::Tool("skopeo")],
        )
    {
        return;
    }
    use testkit::registry::oci::{layer_of_dir, write_layout, Image};
    let reg = testkit::registry::TestRegistry::start();
    let env = Env::new(bin(), "btrfs");
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("busybox");
    make_busybox(&rootfs);
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    let layout = tmp.path().join("layout");
    write_layout(
        &layout,
        &[Image {
            os: "linux",
            arch,
            layers: vec![layer_of_dir(&rootfs)],
            env: vec!["PATH=/bin", "FROM_REGISTRY=yes"],
        }],
    );
    reg.push(&layout, "library/busybox", "latest");
    let image = format!("{}/library/busybox:latest", reg.addr);
    let spec = env.spec("r.spec", &format!("((from {image}) (shell /bin/sh -c) (run (shell \"echo FROM_REGISTRY=$FROM_REGISTRY\")))"));
    let out = env.build(&spec);
    let o = text(&out.stdout);
    assert!(out.status.success(), "{o}{}", text(&out.stderr));
    assert!(
        o.contains(&format!("Resolving {image}"))
            && o.contains("Downloading sha256:")
            && o.contains("FROM_REGISTRY=yes"),
        "{o}"
    );
    // The registry goes away: a tag seen before still builds (--pull=missing).
    drop(reg);
    let again = env.build(&spec);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(text(&again.stdout).contains("from cache"));
    // --pull=always needs the registry, and says which one it could not reach.
    let mut args = env.args(&[
        "build",
        "-f",
        spec.to_str().unwrap(),
        env.ctx.to_str().unwrap(),
    ]);
    args.extend(["--pull".to_string(), "always".to_string()]);
    let out = Command::new(bin()).args(&args).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stderr).contains("cannot reach registry 127.0.0.1:"),
        "{}",
        text(&out.stderr)
    );
    let ls = env.run(&["image", "ls"]);
    assert!(
        text(&ls.stdout).contains(&format!("pulled from {image}")),
        "{}",
        text(&ls.stdout)
    );
}

#[test]
fn pull_and_a_malicious_image_records_nothing() {
    if !testkit::require(module_path!(), &caps())
        || !testkit::require(
            module_path!(),
            &[Cap::Tool("docker-registry"), Cap::Tool("skopeo")],
        )
    {
        return;
    }
    use testkit::registry::oci::{write_layout, Image};
    let reg = testkit::registry::TestRegistry::start();
    let env = Env::new(bin(), "btrfs");
    let tmp = tempfile::tempdir().unwrap();
    // A layer that tries `../` (refused by the extractor).
    let mut evil = Vec::new();
    {
        let mut h = tar::Header::new_old();
        let path = b"../../escape";
        h.as_old_mut().name[..path.len()].copy_from_slice(path);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(1);
        h.set_cksum();
        evil.extend_from_slice(h.as_bytes());
        evil.extend_from_slice(&[b'x'; 512]);
        evil.extend_from_slice(&[0; 1024]);
    }
    let layout = tmp.path().join("evil");
    let arch = if std::env::consts::ARCH == "x86_64" {
        "amd64"
    } else {
        "arm64"
    };
    write_layout(
        &layout,
        &[Image {
            os: "linux",
            arch,
            layers: vec![evil],
            env: vec![],
        }],
    );
    reg.push(&layout, "evil", "v1");
    let image = format!("{}/evil:v1", reg.addr);
    let pull = env.run(&["pull", &image]);
    assert!(pull.status.success(), "{}", text(&pull.stderr));
    assert!(
        text(&pull.stdout).contains(&format!("Pulled {image}: sha256:")),
        "{}",
        text(&pull.stdout)
    );
    let spec = env.spec(
        "e.spec",
        &format!("((from {image}) (run (shell \"true\")))"),
    );
    let out = env.build(&spec);
    assert_eq!(out.status.code(), Some(3));
    let e = text(&out.stderr);
    assert!(
        e.contains(&image) && e.contains("layer sha256:") && e.contains("`..`"),
        "{e}"
    );
    let df = env.run(&["df"]);
    assert!(
        text(&df.stdout).contains("results: 0"),
        "nothing recorded: {}",
        text(&df.stdout)
    );
    env.assert_clean();
}

#[test]
fn shared_caches_persist_between_steps_and_builds() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    for sandbox in SANDBOXES {
        let env = Env::new(bin(), "btrfs").sandboxed(sandbox);
        let spec = |n: u32| {
            format!(
            "((from busybox) (shell /bin/sh -c) (user (uid 1000) (gid 1000))\n \
             (run (cache (dl (target /var/cache/dl))) (shell \"echo run{n} >> /var/cache/dl/log; cat /var/cache/dl/log; \
             id -u; stat -c %u /var/cache/dl; printf '#!/bin/sh\\necho exec-ok\\n' > /var/cache/dl/tool && chmod +x /var/cache/dl/tool && /var/cache/dl/tool\")))"
        )
        };
        let out1 = env.build(&env.spec("c1.spec", &spec(1)));
        assert!(
            out1.status.success(),
            "{}{}",
            text(&out1.stdout),
            text(&out1.stderr)
        );
        let out2 = env.build(&env.spec("c2.spec", &spec(2)));
        let o = text(&out2.stdout);
        assert!(
            o.contains("run1\nrun2\n1000\n1000\nexec-ok\n"),
            "the cache keeps the first build's file, owned by the user, exec allowed:\n{o}"
        );
        let ls = env.run(&["cache", "ls"]);
        assert!(text(&ls.stdout).contains("dl "), "{}", text(&ls.stdout));
        let rm = env.run(&["cache", "rm", "dl"]);
        assert!(rm.status.success(), "{}", text(&rm.stderr));
        let out3 = env.build(&env.spec("c3.spec", &spec(3)));
        assert!(
            text(&out3.stdout).contains("\nrun3\n1000"),
            "a removed cache starts empty: {}",
            text(&out3.stdout)
        );
        assert!(!text(&out3.stdout).contains("run1\nrun2\nrun3"));
        env.assert_clean();
    }
}

#[test]
fn secrets_are_mounted_for_their_step_only_and_stored_nowhere() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    for sandbox in SANDBOXES {
        let env = Env::new(bin(), "btrfs").sandboxed(sandbox);
        let value = "S3CRET-VALUE-7f3a9";
        let secret_file = env.tmp.path().join("token.txt");
        std::fs::write(&secret_file, value).unwrap();
        let spec = env.spec(
        "s.spec",
        "((from busybox) (shell /bin/sh -c)\n \
         (run (secrets (tok (target /run/secrets/tok))) (shell \"test \\\"$(cat /run/secrets/tok)\\\" = S3CRET-VALUE-7f3a9 && echo has-secret; echo x > /run/secrets/tok || echo read-only\"))\n \
         (run (shell \"test -e /run/secrets/tok && echo leaked || echo gone\")))",
    );
        // Not given: fails before anything runs, naming it.
        let out = env.build(&spec);
        assert_eq!(out.status.code(), Some(2));
        assert!(
            text(&out.stderr).contains("needs secret(s) \"tok\""),
            "{}",
            text(&out.stderr)
        );
        assert!(!text(&out.stdout).contains("(from busybox)"), "nothing ran");
        let out = env.build_with(
            &spec,
            &["--secret", &format!("tok:{}", secret_file.display())],
        );
        let o = text(&out.stdout);
        assert!(out.status.success(), "{o}{}", text(&out.stderr));
        assert!(
            o.contains("has-secret\n") && o.contains("read-only\n") && o.contains("gone\n"),
            "{o}"
        );
        // The value is nowhere in the store: results, logs, database, temp dirs.
        let grep = Command::new("grep")
            .args(["-r", "-l", "-a", value])
            .arg(env.root())
            .output()
            .unwrap();
        assert_eq!(text(&grep.stdout), "", "secret found in the store");
        env.assert_clean();
    }
}

#[test]
fn two_processes_share_a_store_safely() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    let env = Env::new(bin(), "btrfs");
    // The shared step counts its runs in a cache; it takes a while, so both processes meet.
    let shared = "(run (cache (count (target /c))) (shell \"echo ran >> /c/runs; sleep 1.5\"))";
    let a = env.spec(
        "a.spec",
        &format!("((from busybox) (shell /bin/sh -c) {shared} (run (shell \"echo done-a\")))"),
    );
    let b = env.spec(
        "b.spec",
        &format!("((from busybox) (shell /bin/sh -c) {shared} (run (shell \"echo done-b\")))"),
    );
    // Make the base first, so both start at the shared step.
    let base = env.spec("base.spec", "((from busybox))");
    assert!(env.build(&base).status.success());
    let spawn = |spec: &Path| {
        Command::new(bin())
            .args(env.args(&[
                "build",
                "-f",
                spec.to_str().unwrap(),
                env.ctx.to_str().unwrap(),
            ]))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let pa = spawn(&a);
    std::thread::sleep(std::time::Duration::from_millis(400));
    // A third process that wants the store to itself is refused while they build.
    let clean = env.run(&["clean"]);
    assert_eq!(clean.status.code(), Some(3));
    assert!(
        text(&clean.stderr).contains("another obuilder process is using"),
        "{}",
        text(&clean.stderr)
    );
    let pb = spawn(&b);
    let (oa, ob) = (
        pa.wait_with_output().unwrap(),
        pb.wait_with_output().unwrap(),
    );
    assert!(
        oa.status.success(),
        "a: {}{}",
        text(&oa.stdout),
        text(&oa.stderr)
    );
    assert!(
        ob.status.success(),
        "b: {}{}",
        text(&ob.stdout),
        text(&ob.stderr)
    );
    assert!(text(&oa.stdout).contains("done-a") && text(&ob.stdout).contains("done-b"));
    // The shared step ran once: the second process waited and took the first's result.
    let count = env.spec("count.spec", "((from busybox) (shell /bin/sh -c) (run (cache (count (target /c))) (shell \"wc -l < /c/runs\")))");
    let out = env.build(&count);
    assert!(
        text(&out.stdout).contains("\n1\n"),
        "the shared step ran more than once:\n{}",
        text(&out.stdout)
    );
    env.assert_clean();
    // Alone again: clean works.
    assert!(env.run(&["clean"]).status.success());
}

#[test]
fn prune_keep_free_and_hit_counters() {
    if !testkit::require(module_path!(), &caps())
        || !testkit::require(module_path!(), &[Cap::OverlayLowerdirPlus])
    {
        return;
    }
    // ext4 frees space at once, so the threshold is seen immediately.
    let env = Env::new(bin(), "overlayfs");
    let big = env.spec("big.spec", "((from busybox) (shell /bin/sh -c) (run (shell \"dd if=/dev/zero of=/big bs=1M count=200 2>/dev/null\")))");
    assert!(env.build(&big).status.success());
    assert!(env.build(&big).status.success(), "second time from cache");
    let df = text(&env.run(&["df"]).stdout);
    assert!(
        df.contains("cache:   2 hits, 2 misses (50% of steps from cache)"),
        "{df}"
    );
    let free = |df: &str| -> f64 {
        df.split("free:")
            .nth(1)
            .unwrap()
            .trim()
            .split('%')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let before = free(&df);
    assert!(
        before < 70.0,
        "the 200 MB result fills the 512 MB filesystem: {df}"
    );
    let out = env.run(&["prune", "--keep-free", "80"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let after = free(&text(&env.run(&["df"]).stdout));
    assert!(after >= 80.0, "{after}% free after pruning to 80%");
    assert!(
        text(&out.stdout).contains("Removed "),
        "{}",
        text(&out.stdout)
    );
    let both = env.run(&["prune", "--keep-free", "80", "--before", "1d"]);
    assert_eq!(
        both.status.code(),
        Some(2),
        "--keep-free and --before exclude each other"
    );
}

#[test]
fn copy_from_a_stage_sees_all_its_layers_on_overlayfs() {
    if !testkit::require(module_path!(), &caps())
        || !testkit::require(module_path!(), &[Cap::OverlayLowerdirPlus])
    {
        return;
    }
    let env = Env::new(bin(), "overlayfs");
    let spec = env.spec(
        "stage.spec",
        r#"((build tool
  ((from busybox)
   (shell /bin/sh -c)
   (run (shell "mkdir -p /opt && echo made-early > /opt/early"))
   (run (shell "echo made-late > /opt/late"))))
 (from busybox)
 (shell /bin/sh -c)
 (copy (from (build tool)) (src /opt/early /opt/late /bin/busybox) (dst /got/))
 (run (shell "cat /got/early /got/late; test -x /got/busybox && echo exec-kept")))"#,
    );
    let out = env.build(&spec);
    let o = text(&out.stdout);
    assert!(out.status.success(), "{o}{}", text(&out.stderr));
    assert!(o.contains("made-early\nmade-late\nexec-kept\n"), "{o}");
    env.assert_clean();
}
