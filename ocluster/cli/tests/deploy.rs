//! Deployment as code, checked: the Debian package and the macOS tarball that
//! `packaging/build.sh` makes, the systemd units (`systemd-analyze verify`), the launchd
//! plist (parsed), the Ansible roles (`ansible-lint`, and the macOS role in `--check`
//! mode against a mocked Mac whose commands are recorded), and the whole deployment in
//! a Debian container booted with systemd (`scripts/deploy-test.sh`).

// Tests run the real tools as processes.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use testkit::{require, Cap};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Where cargo put this workspace's binaries (all six are built by `cargo test`).
fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_ocluster-worker"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const PROGRAMS: [&str; 6] = [
    "obuilder",
    "obuilderfs",
    "ocluster-scheduler",
    "ocluster-worker",
    "ocluster-admin",
    "ocluster-client",
];

const PACKAGE_TOOLS: [Cap; 5] = [
    Cap::Tool("dpkg-deb"),
    Cap::Tool("dpkg-shlibdeps"),
    Cap::Tool("fakeroot"),
    Cap::Tool("objcopy"),
    Cap::File("/usr/lib/python3/dist-packages/jinja2/__init__.py"),
];

/// Runs `packaging/build.sh` on the binaries cargo built; returns (the .deb, the tarball).
fn build_packages(out: &Path) -> (PathBuf, PathBuf) {
    let built = run(Command::new(root().join("packaging/build.sh"))
        .args(["--profile", "dev", "--no-build", "--bin-dir"])
        .arg(bin_dir())
        .arg("--out")
        .arg(out));
    let paths: Vec<PathBuf> = stdout(&built).lines().map(PathBuf::from).collect();
    assert_eq!(paths.len(), 2, "{paths:?}");
    (paths[0].clone(), paths[1].clone())
}

/// The `--long` flags a program's `--help` lists.
fn flags_of(program: &str) -> BTreeSet<String> {
    let help = stdout(&run(Command::new(bin_dir().join(program)).arg("--help")));
    help.split_whitespace()
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| {
            w.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// Every `--flag` in `args` is one `program` takes.
fn assert_flags_known(program: &str, args: &[String], source: &str) {
    let known = flags_of(program);
    for a in args {
        if let Some(flag) = a.strip_prefix("--") {
            let name = flag.split('=').next().unwrap();
            assert!(
                known.contains(name),
                "{source}: {program} has no --{name} (it has {known:?})"
            );
        }
    }
}

/// The ExecStart of a unit as words, continuation lines joined.
fn exec_start(unit: &str) -> Vec<String> {
    let joined = unit.replace("\\\n", " ");
    let line = joined
        .lines()
        .find(|l| l.starts_with("ExecStart="))
        .expect("an ExecStart line");
    line["ExecStart=".len()..]
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn the_debian_package_and_the_macos_tarball() {
    require!(
        PACKAGE_TOOLS[0],
        PACKAGE_TOOLS[1],
        PACKAGE_TOOLS[2],
        PACKAGE_TOOLS[3],
        PACKAGE_TOOLS[4]
    );
    let tmp = tempfile::tempdir().unwrap();
    let (deb, tarball) = build_packages(tmp.path());
    assert!(deb.ends_with(format!(
        "ocluster_{}_{}.deb",
        env!("CARGO_PKG_VERSION"),
        stdout(&run(Command::new("dpkg").arg("--print-architecture"))).trim()
    )));

    let field = |f: &str| stdout(&run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(f)));
    let depends = field("Depends");
    for dep in [
        "libc6",
        "libseccomp2",
        "btrfs-progs",
        "rsync",
        "fuse3",
        "git",
        "adduser",
    ] {
        assert!(depends.contains(dep), "Depends lacks {dep}: {depends}");
    }
    // The default sandbox is obuilder's own; runc is there for --sandbox runc.
    assert!(field("Recommends").contains("runc"));
    assert_eq!(field("Package").trim(), "ocluster");

    let listing = stdout(&run(Command::new("dpkg-deb").arg("-c").arg(&deb)));
    let files: BTreeSet<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.'))
        .collect();
    let mut want = vec![
        "/lib/systemd/system/ocluster-scheduler.service".to_string(),
        "/lib/systemd/system/ocluster-worker.service".to_string(),
        "/etc/default/ocluster-scheduler".to_string(),
        "/etc/default/ocluster-worker".to_string(),
        "/usr/share/doc/ocluster/deploy.md".to_string(),
        "/usr/share/doc/ocluster/copyright".to_string(),
        // A page per subcommand too.
        "/usr/share/man/man1/ocluster-admin-update.1.gz".to_string(),
        "/usr/share/man/man1/obuilder-build.1.gz".to_string(),
    ];
    for p in PROGRAMS {
        want.push(format!("/usr/bin/{p}"));
        want.push(format!("/usr/share/man/man1/{p}.1.gz"));
        want.push(format!("/usr/share/bash-completion/completions/{p}"));
        want.push(format!("/usr/share/zsh/vendor-completions/_{p}"));
        want.push(format!("/usr/share/fish/vendor_completions.d/{p}.fish"));
    }
    for w in &want {
        assert!(
            files.contains(w.as_str()),
            "the package has no {w}:\n{listing}"
        );
    }
    let control = tmp.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert_eq!(
        conffiles,
        "/etc/default/ocluster-scheduler\n/etc/default/ocluster-worker\n"
    );
    for script in ["postinst", "prerm", "postrm"] {
        assert!(control.join(script).exists(), "no {script}");
    }

    // The units' flags are the programs' flags.
    for (unit, program) in [
        ("ocluster-scheduler.service", "ocluster-scheduler"),
        ("ocluster-worker.service", "ocluster-worker"),
    ] {
        let text = std::fs::read_to_string(root().join("packaging/systemd").join(unit)).unwrap();
        let argv = exec_start(&text);
        assert_eq!(argv[0], format!("/usr/bin/{program}"));
        assert_flags_known(program, &argv, unit);
    }

    // The macOS tarball: the same man pages and completions, the LaunchDaemon, and an
    // empty bin/ for binaries built on a Mac.
    let listing = stdout(&run(Command::new("tar").arg("tzf").arg(&tarball)));
    let top = format!("ocluster-{}-macos/", env!("CARGO_PKG_VERSION"));
    for f in [
        "bin/",
        "README.macos.md",
        "share/man/man1/ocluster-worker.1",
        "share/completions/_ocluster-worker",
        "launchd/com.tarides.ocluster.worker.plist",
    ] {
        assert!(
            listing.lines().any(|l| l == format!("{top}{f}")),
            "the tarball has no {f}:\n{listing}"
        );
    }
    run(Command::new("tar")
        .arg("xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(tmp.path()));
    let plist = tmp
        .path()
        .join(&top)
        .join("launchd/com.tarides.ocluster.worker.plist");
    let args = check_plist(
        &plist,
        "REPLACE-WITH-THE-WORKER-NAME",
        "/opt/ocluster",
        "/var/lib/ocluster-worker",
    );
    assert!(
        args.iter().any(|a| a == "--user-pool=1000-1000"),
        "{args:?}"
    );
    assert_flags_known("ocluster-worker", &args[1..], "the launchd plist");
}

/// Parses the worker's plist with Python's plistlib (launchd's format) and checks what
/// launchd needs; returns its ProgramArguments.
fn check_plist(plist: &Path, name: &str, prefix: &str, state: &str) -> Vec<String> {
    let script = r#"
import json, plistlib, sys
with open(sys.argv[1], "rb") as f:
    p = plistlib.load(f)
print(json.dumps(p))
"#;
    let out = run(Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .arg(plist));
    let p: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(p["Label"], "com.tarides.ocluster.worker", "{p}");
    assert_eq!(p["RunAtLoad"], true, "{p}");
    assert_eq!(
        p["KeepAlive"],
        serde_json::json!({"SuccessfulExit": false}),
        "{p}"
    );
    assert_eq!(p["ExitTimeOut"], 3600, "{p}");
    for key in ["StandardOutPath", "StandardErrorPath"] {
        let path = p[key].as_str().unwrap_or_default();
        assert!(path.contains("ocluster-worker.log"), "{key}: {p}");
    }
    let args: Vec<String> = p["ProgramArguments"]
        .as_array()
        .unwrap_or_else(|| panic!("no ProgramArguments: {p}"))
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert_eq!(args[0], format!("{prefix}/bin/ocluster-worker"));
    for a in [
        &format!("--connect={state}/pool.cap"),
        &format!("--name={name}"),
        "--sandbox=user",
        "--home-path=/Users/mac1000",
        "--drain-timeout=3000",
    ] {
        assert!(args.iter().any(|x| x == a), "no {a} in {args:?}");
    }
    args
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    require!(Cap::Tool("systemd-analyze"));
    let tmp = tempfile::tempdir().unwrap();
    // The units as installed, with the binaries where cargo put them, and the man pages
    // they name (Documentation=) where `man` finds them.
    let docs = tmp.path().join("docs");
    for p in ["ocluster-scheduler", "ocluster-worker"] {
        run(Command::new(bin_dir().join(p)).env("CLI_DOCS_OUT", &docs));
    }
    let mut units = Vec::new();
    for unit in ["ocluster-scheduler.service", "ocluster-worker.service"] {
        let text = std::fs::read_to_string(root().join("packaging/systemd").join(unit)).unwrap();
        let text = text.replace("/usr/bin/", &format!("{}/", bin_dir().display()));
        let path = tmp.path().join(unit);
        std::fs::write(&path, text).unwrap();
        units.push(path);
    }
    let out = run(Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .env("MANPATH", docs.join("man")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");

    // And it does catch a mistake.
    let broken = tmp.path().join("broken.service");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&units[1])
            .unwrap()
            .replace("KillMode=mixed", "KillMode=sometimes"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&broken)
        .env("MANPATH", docs.join("man"))
        .output()
        .unwrap();
    // (A warning, with status 0: hence the check for an empty stderr above.)
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("broken.service:") && stderr.contains("kill mode"),
        "{out:?}"
    );
}

#[test]
fn the_ansible_roles_are_lint_clean() {
    require!(Cap::Tool("ansible-lint"));
    let out = Command::new("ansible-lint")
        .args(["--profile", "production", "--nocolor"])
        .current_dir(root().join("deploy/ansible"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ansible-lint:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One recorded task result (test/callback_plugins/record_tasks.py).
#[derive(Debug)]
struct Task {
    name: String,
    status: String,
    argv: Vec<String>,
    args: String,
}

/// Runs the macOS play against the mocked Mac in `mock` (`--check` unless `apply`);
/// returns its output, the recorded tasks and the fake tools' log of this run.
fn run_macos_role(mock: &Path, apply: bool, extra: &[&str]) -> (Output, Vec<Task>, String) {
    run_macos_play(mock, "playbook.yml", apply, extra)
}

fn run_macos_play(
    mock: &Path,
    playbook: &str,
    apply: bool,
    extra: &[&str],
) -> (Output, Vec<Task>, String) {
    let ansible = root().join("deploy/ansible");
    let record = mock.join("tasks.jsonl");
    let fake_log = mock.join("fake-macos.log");
    let _ = std::fs::remove_file(&record);
    let _ = std::fs::remove_file(&fake_log);
    let path = format!(
        "{}:{}",
        ansible.join("test/fake-macos-bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("ansible-playbook")
        .args((!apply).then_some("--check"))
        .args(["-i", "test/mock-macos-inventory.yml", playbook])
        .args(extra)
        .current_dir(&ansible)
        .env("PATH", path)
        .env("MOCK_ROOT", mock)
        .env("MOCK_TARBALL", mock.join("ocluster-macos.tar.gz"))
        .env("FAKE_MACOS_LOG", &fake_log)
        .env("FAKE_MACOS_STATE", mock.join("state"))
        .env("RECORD_TASKS_FILE", &record)
        .env(
            "ANSIBLE_CALLBACK_PLUGINS",
            ansible.join("test/callback_plugins"),
        )
        .env("ANSIBLE_CALLBACKS_ENABLED", "record_tasks")
        .env("ANSIBLE_NOCOLOR", "1")
        .output()
        .unwrap();
    let tasks = std::fs::read_to_string(&record)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let argv = v["args"]["argv"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| match x {
                            serde_json::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            Task {
                name: v["task"].as_str().unwrap().to_string(),
                status: v["status"].as_str().unwrap().to_string(),
                argv,
                args: v["args"].to_string(),
            }
        })
        .collect();
    let fake = std::fs::read_to_string(&fake_log).unwrap_or_default();
    (out, tasks, fake)
}

/// `changed=N` of a PLAY RECAP.
fn changed(recap: &str) -> usize {
    recap
        .split("changed=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no PLAY RECAP in:\n{recap}"))
}

#[test]
fn the_macos_role_in_check_mode_applied_twice_and_torn_down_on_a_mocked_mac() {
    require!(Cap::Tool("ansible-playbook"), Cap::File("/usr/bin/python3"));
    let mock = tempfile::tempdir().unwrap();
    let m = mock.path();
    std::fs::create_dir_all(m.join("secrets")).unwrap();
    std::fs::write(m.join("secrets/pool-macos-arm64.cap"), "capnp://…\n").unwrap();
    std::fs::create_dir_all(m.join("t/ocluster-macos/bin")).unwrap();
    // (The binaries are built on a Mac; a stand-in for the role to install.)
    std::fs::write(
        m.join("t/ocluster-macos/bin/ocluster-worker"),
        "#!/bin/sh\n",
    )
    .unwrap();
    run(Command::new("tar")
        .arg("czf")
        .arg(m.join("ocluster-macos.tar.gz"))
        .arg("-C")
        .arg(m.join("t"))
        .arg("ocluster-macos"));

    // No macFUSE: the role stops and says what a person must do.
    let (out, _, _) = run_macos_role(m, false, &[]);
    let text = stdout(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("macFUSE is not installed"), "{text}");
    assert!(text.contains("approve its system extension"), "{text}");

    std::fs::create_dir_all(m.join("macfuse.fs")).unwrap();
    let (out, tasks, fake) = run_macos_role(m, false, &[]);
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let named = |name: &str| -> Vec<&Task> {
        tasks
            .iter()
            .filter(|t| t.name.ends_with(name) && !t.args.contains("{{"))
            .collect()
    };

    // The probes ran (read-only, so even in --check mode), against the fake tools.
    assert_eq!(
        fake.lines().collect::<Vec<_>>(),
        [
            "dscl . -search /Users UniqueID 1000",
            "dscl . -search /Users UniqueID 1001",
            "zpool list -H -o name obuilder",
            "launchctl print system/com.tarides.ocluster.worker",
        ],
        "{text}"
    );
    // Both build users are missing: the role would create them with exactly the
    // commands the worker's user sandbox runs.
    let planned: Vec<Vec<String>> = named("Create the missing build users")
        .iter()
        .map(|t| {
            assert_eq!(t.status, "skipped", "{t:?}");
            t.argv.clone()
        })
        .collect();
    let mut want = Vec::new();
    for uid in [1000, 1001] {
        want.extend(obuilder_sandbox::user::create_user_argvs(
            obuilder_sandbox::user::Platform::MacOs,
            uid,
            1000,
            "/Users/mac1000",
        ));
    }
    assert_eq!(planned, want);
    // Nothing is loaded yet: the LaunchDaemon would be bootstrapped.
    let load = named("Load the LaunchDaemon");
    assert_eq!(load.len(), 1, "{tasks:?}");
    assert_eq!(
        load[0].argv,
        [
            "launchctl".to_string(),
            "bootstrap".into(),
            "system".into(),
            m.join("com.tarides.ocluster.worker.plist")
                .display()
                .to_string(),
        ]
    );
    let cap = named("Install the pool's cap file");
    assert!(cap[0].args.contains("\"mode\":\"0600\""), "{:?}", cap[0]);
    assert!(
        cap[0].args.contains("/var/lib/ocluster-worker/pool.cap"),
        "{:?}",
        cap[0]
    );
    // The plist the role would write is the one the tarball carries, for this worker.
    let plist = named("Install the LaunchDaemon");
    assert!(
        plist[0]
            .args
            .contains("com.tarides.ocluster.worker.plist.j2"),
        "{:?}",
        plist[0]
    );

    // Applied for real to the mocked Mac: the users are created with those commands,
    // the LaunchDaemon is written (a plist launchd can read, for this worker) and loaded.
    let (out, _, fake) = run_macos_role(m, true, &[]);
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(changed(&text) > 0, "{text}");
    let created: Vec<&str> = fake.lines().filter(|l| l.contains("-create")).collect();
    let want_lines: Vec<String> = want.iter().map(|a| a.join(" ")).collect();
    assert_eq!(created, want_lines, "{fake}");
    let plist = m.join("com.tarides.ocluster.worker.plist");
    assert!(
        fake.contains(&format!("launchctl bootstrap system {}", plist.display())),
        "{fake}"
    );
    let args = check_plist(
        &plist,
        "m1-worker-01",
        &m.join("opt/ocluster").display().to_string(),
        &m.join("var/lib/ocluster-worker").display().to_string(),
    );
    assert!(
        args.iter().any(|a| a == "--user-pool=1000-1001"),
        "{args:?}"
    );
    assert_flags_known("ocluster-worker", &args[1..], "the plist the role wrote");
    // Applied again: it only looks (the users exist, the daemon is loaded).
    let (out, _, fake) = run_macos_role(m, true, &[]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert_eq!(
        changed(&text),
        0,
        "the second run changed something:\n{text}"
    );
    assert!(
        !fake.contains("-create") && !fake.contains("bootstrap"),
        "{fake}"
    );

    // teardown.yml: the daemon stopped (it drains) and gone, the programs, the state and
    // the build users too; a second teardown finds nothing to do.
    let (out, _, fake) = run_macos_play(m, "teardown.yml", true, &[]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    for line in [
        "launchctl bootout system/com.tarides.ocluster.worker",
        "dscl . -delete /Users/mac1000",
        "dscl . -delete /Users/mac1001",
    ] {
        assert!(fake.lines().any(|l| l == line), "no {line:?} in\n{fake}");
    }
    for gone in [
        "com.tarides.ocluster.worker.plist",
        "opt/ocluster",
        "var/lib/ocluster-worker",
    ] {
        assert!(!m.join(gone).exists(), "{gone} is left after the teardown");
    }
    let (out, _, _) = run_macos_play(m, "teardown.yml", true, &[]);
    assert_eq!(changed(&stdout(&out)), 0, "{}", stdout(&out));

    // A ZFS pool that does not exist stops the role with what to do.
    let (out, _, _) = run_macos_role(
        m,
        false,
        &["-e", "ocluster_worker_store=zfs:/Volumes/missing"],
    );
    let text = stdout(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("The ZFS pool of zfs:/Volumes/missing does not exist"),
        "{text}"
    );
}

/// The whole deployment in a Debian container booted with systemd: see
/// scripts/deploy-test.sh (1–2 minutes once its Debian tree is cached, a few more the
/// first time).
#[test]
fn deploy_in_a_debian_container_booted_with_systemd() {
    let mut caps = vec![
        Cap::Root,
        Cap::Tool("systemd-nspawn"),
        Cap::Tool("debootstrap"),
        Cap::Tool("ansible-playbook"),
        Cap::Tool("nsenter"),
    ];
    caps.extend(PACKAGE_TOOLS);
    if !testkit::require("deploy_in_a_debian_container_booted_with_systemd", &caps) {
        return;
    }
    let out = Command::new(root().join("scripts/deploy-test.sh"))
        .args(["--profile", "dev", "--no-build", "--bin-dir"])
        .arg(bin_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "scripts/deploy-test.sh failed:\n{}\n{stderr}",
        stdout(&out)
    );
    assert!(stderr.contains("deploy test passed"), "{stderr}");
}
