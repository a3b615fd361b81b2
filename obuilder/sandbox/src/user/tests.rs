// Test code runs the script it checks with a real shell.
#![allow(clippy::disallowed_methods)]

use super::*;

fn opts(platform: Platform) -> UserOptions {
    UserOptions {
        first_uid: 1000,
        last_uid: 1002,
        gid: None,
        home: None,
        prefix: Some("/usr/local".into()),
        fuse: true,
        obuilderfs: "obuilderfs".into(),
        platform,
    }
}

fn sandbox(o: UserOptions, exec: &testkit::RecordingExec) -> UserSandbox {
    let dir = tempfile::tempdir().unwrap();
    UserSandbox::new(dir.path(), o, std::sync::Arc::new(exec.clone())).unwrap()
}

/// A runtime for the seam tests (with time: some retry after a pause).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

#[test]
fn paths_under_the_home_and_the_prefix_are_redirected_and_nothing_else() {
    let s = sandbox(opts(Platform::MacOs), &testkit::RecordingExec::new());
    assert_eq!(s.opts.home(), "/Users/mac1000");
    let cases = [
        ("/", Some((Tree::Home, ""))),
        ("/Users/mac1000", Some((Tree::Home, ""))),
        ("/Users/mac1000/", Some((Tree::Home, ""))),
        ("/Users/mac1000/src/a", Some((Tree::Home, "src/a"))),
        ("/usr/local/bin", Some((Tree::Brew, "bin"))),
        ("/usr/local", Some((Tree::Brew, ""))),
        ("/Users/mac10000", None),
        ("/usr/localx", None),
        ("/etc", None),
        ("/tmp/x", None),
    ];
    for (path, want) in cases {
        let got = s.place(path);
        let want = want.map(|(t, r)| (t, r.to_string()));
        assert_eq!(got, want, "{path}");
    }
    let (dir, rel) = s
        .copy_target(Path::new("/r"), "/Users/mac1000/src/")
        .unwrap();
    assert_eq!((dir, rel.as_str()), (PathBuf::from("/r/home"), "/src/"));
    let (dir, rel) = s.copy_target(Path::new("/r"), "/usr/local/bin/x").unwrap();
    assert_eq!((dir, rel.as_str()), (PathBuf::from("/r/brew"), "/bin/x"));
    let e = s
        .copy_target(Path::new("/r"), "/etc/passwd")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("outside the build user's home") && e.contains("/usr/local"),
        "{e}"
    );
}

#[test]
fn user_op_other_than_the_build_user_is_refused_with_why() {
    let s = sandbox(opts(Platform::Linux), &testkit::RecordingExec::new());
    let build = UserIds {
        uid: 1000,
        gid: 1000,
    };
    assert_eq!(s.user(&User::Unix { uid: 0, gid: 0 }).unwrap(), build);
    assert_eq!(
        s.user(&User::Unix {
            uid: 1000,
            gid: 1000
        })
        .unwrap(),
        build
    );
    assert_eq!(s.user(&User::Name("obuilder1000".into())).unwrap(), build);
    let e = s
        .user(&User::Unix {
            uid: 1001,
            gid: 1001,
        })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("build user") && e.contains("(user (uid 1000) (gid 1000))"),
        "{e}"
    );
}

#[test]
fn options_are_checked_together() {
    let mut o = opts(Platform::Linux);
    assert!(o.validate().is_ok());
    o.home = Some("/usr/local/home".into());
    assert!(o.validate().unwrap_err().contains("contain one another"));
    o.home = Some("relative".into());
    assert!(o.validate().unwrap_err().contains("absolute"));
    o.home = None;
    o.first_uid = 0;
    assert!(o.validate().unwrap_err().contains("0 < FROM"));
    let o = UserOptions {
        prefix: None,
        ..opts(Platform::Linux)
    };
    assert_eq!(o.prefix(), None);
    assert_eq!(o.home(), "/home/obuilder1000");
}

fn invocation(isolate_network: bool) -> Invocation {
    Invocation {
        uid: 1001,
        gid: 1000,
        cwd: "/Users/mac1000/src".into(),
        env: vec![
            ("A".into(), "new 'one'".into()),
            ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
            ("A".into(), "old".into()),
        ],
        argv: vec!["/bin/bash".into(), "-c".into(), "echo $A".into()],
        isolate_network,
    }
}

#[test]
fn macos_command_seam_runs_the_step_through_sudo_su_login_as_the_original() {
    let argv = command_argv(Platform::MacOs, &invocation(true));
    let script = "cd -- '/Users/mac1000/src' || exit 1\n\
                  if [ -e \"$HOME/.obuilder_profile.sh\" ]; then . \"$HOME/.obuilder_profile.sh\" || exit 1; fi\n\
                  exec env 'A=old' 'PATH=/usr/local/bin:/usr/bin:/bin' 'A=new '\\''one'\\''' \"$0\" \"$@\"";
    assert_eq!(
        argv,
        [
            "sudo",
            "su",
            "-l",
            "mac1001",
            "-c",
            "--",
            script,
            "/bin/bash",
            "-c",
            "echo $A"
        ]
    );
}

#[test]
fn linux_command_drops_to_the_build_user_in_a_login_shell_and_its_own_network() {
    let argv = command_argv(Platform::Linux, &invocation(true));
    assert_eq!(
        argv[..7],
        [
            "unshare",
            "--net",
            "--",
            "/bin/sh",
            "-c",
            "ip link set lo up 2>/dev/null; exec \"$@\"",
            "obuilder-net"
        ]
    );
    assert_eq!(
        argv[7..16],
        [
            "setpriv",
            "--reuid=1001",
            "--regid=1000",
            "--init-groups",
            "--reset-env",
            "--",
            "/bin/bash",
            "--login",
            "-c"
        ]
    );
    assert_eq!(argv[17..], ["/bin/bash", "-c", "echo $A"]);
    let host = command_argv(Platform::Linux, &invocation(false));
    assert_eq!(host[0], "setpriv");
    // The script really runs the command with the newest binding of each name.
    let out = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(script(&Invocation {
            cwd: "/".into(),
            argv: vec![],
            ..invocation(false)
        }))
        .args(["/bin/sh", "-c", "printf '%s' \"$A\""])
        .env("HOME", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "new 'one'");
}

#[test]
fn macos_command_seam_creates_a_missing_build_user_with_dscl() {
    let exec = testkit::RecordingExec::new();
    // `dscl -search` prints nothing for a uid nobody has.
    let s = sandbox(opts(Platform::MacOs), &exec);
    let rt = runtime();
    rt.block_on(s.ensure_user(1001)).unwrap();
    rt.block_on(s.ensure_user(1001)).unwrap();
    assert_eq!(
        exec.argvs(),
        [
            "dscl . -search /Users UniqueID 1001",
            "dscl . -create /Users/mac1001",
            "dscl . -create /Users/mac1001 UserShell /bin/bash",
            "dscl . -create /Users/mac1001 RealName mac1001",
            "dscl . -create /Users/mac1001 UniqueID 1001",
            "dscl . -create /Users/mac1001 PrimaryGroupID 1000",
            "dscl . -create /Users/mac1001 NFSHomeDirectory /Users/mac1000",
        ]
    );
}

#[test]
fn macos_command_seam_refuses_a_uid_of_someone_else() {
    let exec = testkit::RecordingExec::new();
    exec.answer(
        &["dscl", ".", "-search"],
        "alice\t\tUniqueID = (\n    1001\n)\n",
    );
    let s = sandbox(opts(Platform::MacOs), &exec);
    let rt = runtime();
    let e = rt.block_on(s.ensure_user(1001)).unwrap_err().to_string();
    assert!(e.contains("belongs to \"alice\""), "{e}");
    assert_eq!(exec.argvs().len(), 1, "nothing created");
}

#[test]
fn linux_command_seam_creates_the_group_then_the_user() {
    let exec = testkit::RecordingExec::new();
    exec.fail(&["getent"], "");
    let s = sandbox(opts(Platform::Linux), &exec);
    let rt = runtime();
    rt.block_on(s.ensure_user(1002)).unwrap();
    assert_eq!(
        exec.argvs(),
        [
            "getent passwd 1002",
            "getent group 1000",
            "groupadd --gid 1000 obuilder1000",
            "useradd --uid 1002 --gid 1000 --no-user-group --no-create-home --home-dir /home/obuilder1000 --shell /bin/bash obuilder1002",
        ]
    );
}

/// Two builders starting at once on a new host: the other one created the group and
/// the user between this one's look and its `groupadd` (which then fails as groupadd
/// does, "already exists"). This one looks again and takes the user.
#[test]
fn linux_command_seam_takes_a_user_another_builder_made_meanwhile() {
    let exec = testkit::RecordingExec::new();
    exec.fail_times(&["getent", "passwd"], "", 1);
    exec.fail_times(&["getent", "group"], "", 1);
    exec.fail(
        &["groupadd"],
        "groupadd: group 'obuilder1000' already exists",
    );
    exec.answer(
        &["getent", "passwd"],
        "obuilder1002:x:1002:1000::/home/obuilder1000:/bin/bash\n",
    );
    let s = sandbox(opts(Platform::Linux), &exec);
    let rt = runtime();
    rt.block_on(s.ensure_user(1002)).unwrap();
    assert_eq!(
        exec.argvs(),
        [
            "getent passwd 1002",
            "getent group 1000",
            "groupadd --gid 1000 obuilder1000",
            "getent passwd 1002",
        ]
    );
    // A user that cannot be made at all is an error, after a few looks.
    let exec = testkit::RecordingExec::new();
    exec.fail(&["getent"], "");
    exec.fail(
        &["useradd"],
        "useradd: cannot lock /etc/passwd; try again later.",
    );
    let s = sandbox(opts(Platform::Linux), &exec);
    let e = rt.block_on(s.ensure_user(1002)).unwrap_err().to_string();
    assert!(e.contains("cannot lock /etc/passwd"), "{e}");
    let tries = exec
        .argvs()
        .iter()
        .filter(|a| a.starts_with("useradd"))
        .count();
    assert_eq!(tries, 5);
}

#[test]
fn kill_repeats_until_no_process_of_the_user_is_left() {
    let exec = testkit::RecordingExec::new();
    let s = sandbox(opts(Platform::MacOs), &exec);
    let rt = runtime();
    // pkill succeeds (something was killed) until the rule says none matched.
    let e2 = exec.clone();
    rt.block_on(async {
        let killing = s.kill_all(1001, None);
        tokio::pin!(killing);
        tokio::select! {
            _ = &mut killing => panic!("stopped while processes were left"),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        e2.fail(&["pkill"], "");
        killing.await;
    });
    let argvs = exec.argvs();
    assert!(argvs.len() >= 3, "{argvs:?}");
    assert!(argvs.iter().all(|a| a == "pkill -9 -U 1001"), "{argvs:?}");
}
