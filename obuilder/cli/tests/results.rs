#![cfg(target_os = "linux")]
//! After `Got:`: `build --tag/--iidfile/--quiet`, `run`, `log`, `inspect`, `export` and
//! `push` end to end, with the real binary, real runc, real stores on loopback
//! filesystems, a real registry (Debian's docker-registry on 127.0.0.1), skopeo and buildah.

// Tests drive the real binary and tools directly.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Output};

use testkit::e2e::{output_with_stdin, store_caps, text, Env};
use testkit::registry::TestRegistry;
use testkit::Cap;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_obuilder")
}

/// Files with every kind of metadata a step can leave: modes (setuid, sticky), owners,
/// symlinks, hard links, a fifo, a deleted file and directory of the base, a directory
/// replaced by a file, and a second step that changes and deletes what the first made.
const SPEC: &str = r#"((from busybox)
 (shell /bin/sh -c)
 (workdir /srv)
 (copy (src a.txt) (dst ./))
 (run (shell "mkdir -p d/e && echo one > d/e/f && echo two > g && chown 1000:2000 g && chmod 4751 g &&
              echo h > h && ln h h-link && ln -s d/e/f sym && mkfifo fifo && chmod 1777 d &&
              rm -f /bin/true && rm -rf /usr/sbin && mkdir -p /x && echo x > /x/y"))
 (run (shell "echo three >> g && rm d/e/f && rm -rf /x && echo x > /x"))
 (env BUILT yes)
 (user (uid 1000) (gid 2000)))
"#;

/// A tar of a whole tree (as `export tar:` writes it) as path → (kind, mode, uid, gid,
/// mtime in seconds, link target, contents).
type Listing = BTreeMap<String, (String, u32, u64, u64, u64, String, Vec<u8>)>;

fn listing(tar: &Path) -> Listing {
    let mut a = tar::Archive::new(std::fs::File::open(tar).unwrap());
    let mut out = Listing::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let link = e
            .link_name()
            .unwrap()
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.insert(
            path,
            (
                format!("{:?}", h.entry_type()),
                h.mode().unwrap(),
                h.uid().unwrap(),
                h.gid().unwrap(),
                h.mtime().unwrap(),
                link,
                data,
            ),
        );
    }
    out
}

/// Whether this machine can run the test on a `kind` store with `extra` tools (else it
/// skips, or fails under OBUILDER_TEST_STRICT).
fn needs(kind: &str, extra: &[Cap]) -> bool {
    let mut caps = store_caps(kind);
    caps.extend_from_slice(extra);
    testkit::require(&format!("results ({kind})"), &caps)
}

fn ok(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

fn round_trip(kind: &str, with_buildah: bool) {
    let env = Env::new(bin(), kind);
    let registry = TestRegistry::start();
    let tmp = env.tmp.path();
    let spec = env.spec("rt.spec", SPEC);
    let iid = tmp.join("iid");

    // --quiet prints the id alone; --iidfile holds it; --tag names it.
    let out = env.build_with(
        &spec,
        &["-q", "-t", "rt", "--iidfile", iid.to_str().unwrap()],
    );
    let id = ok(&out, "build").trim().to_string();
    assert_eq!(id.len(), 64, "{id}");
    assert_eq!(std::fs::read_to_string(&iid).unwrap(), id);

    // inspect: the context the spec ended in (env after the last step, the user).
    let j = ok(&env.run(&["inspect", "rt", "--format", "json"]), "inspect");
    let v: serde_json::Value = serde_json::from_str(&j).unwrap();
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["config"]["workdir"], "/srv");
    assert_eq!(v["config"]["user"], "1000:2000");
    assert!(v["config"]["env"].to_string().contains("BUILT=yes"), "{j}");
    assert_eq!(v["parents"].as_array().unwrap().len(), 3, "{j}");
    assert_eq!(v["tags"][0], "rt");
    assert!(
        v["step"]
            .as_str()
            .unwrap()
            .starts_with("/srv: (run (shell \"echo three >> g"),
        "{j}"
    );

    // run: in a throw-away snapshot, as the result's user and workdir; its exit status.
    let run = |name: &str, script: &str| {
        env.command(&["run", name])
            .args(["--", "/bin/sh", "-c", script])
            .output()
            .unwrap()
    };
    let out = run(
        &id[..12],
        "id -u; pwd; echo $BUILT; cat g; touch /tmp/scratch; exit 3",
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "1000\n/srv\nyes\ntwo\nthree\n");
    let out = run("rt", "ls /tmp/scratch");
    assert_eq!(out.status.code(), Some(1), "the snapshot was thrown away");

    // (from TAG) builds on the result itself (no copy): its base step is a cache hit.
    let on_tag = env.spec(
        "on-tag.spec",
        "((from rt) (shell /bin/sh -c) (run (shell \"echo $BUILT; cat /srv/g\")))",
    );
    let out = ok(&env.build(&on_tag), "build on the tag");
    assert!(
        out.starts_with(&format!("(from rt)\n---> using \"{id}\" from cache\n")),
        "{out}"
    );
    assert!(out.contains("yes\ntwo\nthree\n"), "{out}");

    // export: an OCI layout skopeo reads, a layer per step.
    let oci = tmp.join("oci");
    let dest = format!("oci:{}:v1", oci.display());
    ok(&env.run(&["export", "rt", &dest]), "export");
    let out = Command::new("skopeo")
        .args(["inspect", &dest])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&ok(&out, "skopeo inspect")).unwrap();
    assert_eq!(v["Layers"].as_array().unwrap().len(), 4, "{v}");
    assert!(v["Env"].to_string().contains("BUILT=yes"), "{v}");
    let digest = v["Digest"].as_str().unwrap().to_string();
    // The same result exports to the same bytes.
    let again = format!("oci:{}:v2", oci.display());
    let out = ok(&env.run(&["export", "rt", &again]), "export again");
    assert!(out.contains(&digest), "{out}");

    // push, then a second push that sends nothing.
    let target = format!("{}/rt/img:v1", registry.addr);
    let out = ok(&env.run(&["push", "rt", &target]), "push");
    assert!(out.contains(&digest), "{out}");
    assert!(out.contains("(5 blobs uploaded"), "{out}");
    let out = ok(&env.run(&["push", &id, &target]), "second push");
    assert!(
        out.contains("(0 blobs uploaded, 0 B; 5 already there)"),
        "{out}"
    );

    // Asked for another platform, an image that has only this one is used with a warning.
    let other = if cfg!(target_arch = "aarch64") {
        "linux/amd64"
    } else {
        "linux/arm64"
    };
    let out = ok(
        &env.run(&["pull", "--platform", other, &target]),
        "pull --platform",
    );
    assert!(
        out.contains(&format!("not {other} (it has no other platform)")),
        "{out}"
    );

    // Pulled back by (from REF): the same tree.
    let back = env.spec("back.spec", &format!("((from {target}))"));
    let back_id = ok(&env.build_with(&back, &["-q"]), "pull back")
        .trim()
        .to_string();
    let (a, b) = (tmp.join("a.tar"), tmp.join("b.tar"));
    ok(
        &env.run(&["export", &id, &format!("tar:{}", a.display())]),
        "tar",
    );
    ok(
        &env.run(&["export", &back_id, &format!("tar:{}", b.display())]),
        "tar",
    );
    let (la, lb) = (listing(&a), listing(&b));
    assert!(
        la.contains_key("srv/g") && la.contains_key("x"),
        "{:?}",
        la.keys()
    );
    assert!(!la.contains_key("bin/true") && !la.contains_key("usr/sbin"));
    assert_eq!(la["srv/g"].1, 0o4751);
    assert_eq!((la["srv/g"].2, la["srv/g"].3), (1000, 2000));
    assert_eq!(la["srv/h-link"].0, "Link");
    assert_eq!(la["srv/fifo"].0, "Fifo");
    assert_eq!(la["srv/d"].1, 0o1777);
    for (path, meta) in &la {
        assert_eq!(
            lb.get(path),
            Some(meta),
            "{kind}: {path} differs after the round trip"
        );
    }
    assert_eq!(
        la.len(),
        lb.len(),
        "{kind}: the pulled tree has other paths"
    );

    // Compressed (as for a registry elsewhere): gzip layers, the same tree back.
    let gz_target = format!("{}/rt/img:gz", registry.addr);
    ok(
        &env.run(&["push", "--compress", "gzip", "rt", &gz_target]),
        "push --compress gzip",
    );
    let out = Command::new("skopeo")
        .args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{gz_target}"),
        ])
        .output()
        .unwrap();
    let manifest = ok(&out, "skopeo inspect --raw");
    assert_eq!(manifest.matches("tar+gzip").count(), 4, "{manifest}");
    let gz_spec = env.spec("gz.spec", &format!("((from {gz_target}))"));
    let gz_id = ok(&env.build_with(&gz_spec, &["-q"]), "pull gzip")
        .trim()
        .to_string();
    let c = tmp.join("c.tar");
    ok(
        &env.run(&["export", &gz_id, &format!("tar:{}", c.display())]),
        "tar",
    );
    assert_eq!(
        listing(&c),
        la,
        "{kind}: the gzip round trip changed the tree"
    );

    // Another format each: docker load's and an OCI archive, both read by skopeo.
    for d in ["docker-archive", "oci-archive"] {
        let f = tmp.join(format!("{d}.tar"));
        ok(
            &env.run(&["export", "rt", &format!("{d}:{}", f.display())]),
            d,
        );
        let out = Command::new("skopeo")
            .args(["inspect", &format!("{d}:{}", f.display())])
            .output()
            .unwrap();
        assert!(ok(&out, d).contains("BUILT=yes"));
    }

    if with_buildah {
        // buildah takes the exported image and runs a command in it.
        let vfs = tmp.join("buildah");
        let b = |args: &[&str]| {
            Command::new("buildah")
                .arg("--root")
                .arg(vfs.join("root"))
                .arg("--runroot")
                .arg(vfs.join("run"))
                .args(["--storage-driver", "vfs"])
                .args(args)
                .output()
                .unwrap()
        };
        // (buildah names the image after the path, which must then be lowercase.)
        let lower = std::env::temp_dir().join(format!("obuilder-rt-{}", std::process::id()));
        let lower_dest = format!("oci:{}:v1", lower.display());
        ok(&env.run(&["export", "rt", &lower_dest]), "export");
        let from = b(&["from", "--name", "obuilder-rt", &lower_dest]);
        let _ = std::fs::remove_dir_all(&lower);
        let c = ok(&from, "buildah from");
        let c = c.trim().lines().last().unwrap().to_string();
        let out = b(&[
            "run",
            "--isolation",
            "chroot",
            &c,
            "--",
            "/bin/sh",
            "-c",
            "cat /srv/g; id -u; echo $BUILT; ls /bin/true || echo gone",
        ]);
        assert_eq!(ok(&out, "buildah run"), "two\nthree\n1000\nyes\ngone\n");
        let _ = b(&["rm", &c]);
        let _ = Command::new("umount")
            .arg("-R")
            .arg(vfs.join("root"))
            .status();
    }
    env.assert_clean();
}

#[test]
fn export_push_pull_round_trip_btrfs() {
    if !needs(
        "btrfs",
        &[
            Cap::Tool("docker-registry"),
            Cap::Tool("skopeo"),
            Cap::Tool("buildah"),
        ],
    ) {
        return;
    }
    round_trip("btrfs", true);
}

#[test]
fn export_push_pull_round_trip_overlayfs() {
    if !needs(
        "overlayfs",
        &[Cap::Tool("docker-registry"), Cap::Tool("skopeo")],
    ) {
        return;
    }
    round_trip("overlayfs", false);
}

#[test]
fn export_push_pull_round_trip_xfs() {
    if !needs("xfs", &[Cap::Tool("docker-registry"), Cap::Tool("skopeo")]) {
        return;
    }
    round_trip("xfs", false);
}

#[test]
fn export_push_pull_round_trip_rsync() {
    if !needs(
        "rsync-copy",
        &[Cap::Tool("docker-registry"), Cap::Tool("skopeo")],
    ) {
        return;
    }
    round_trip("rsync-copy", false);
}

/// The machine-readable and the human progress of one build, parsed.
#[test]
fn progress_json_tty_and_listings() {
    if !needs("rsync-copy", &[]) {
        return;
    }
    let env = Env::new(bin(), "rsync-copy");
    let spec = env.spec(
        "p.spec",
        "((from busybox) (shell /bin/sh -c) (run (shell \"echo one\")) (copy (src a.txt) (dst /a)) (run (shell \"exit 4\")))",
    );
    let out = env.build_with(&spec, &["--progress", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let events: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let steps: Vec<(String, u64)> = events
        .iter()
        .filter(|e| e["event"] == "step")
        .map(|e| {
            (
                e["phase"].as_str().unwrap().to_string(),
                e["index"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, u64)> = [
        ("started", 1),
        ("done", 1),
        ("started", 2),
        ("done", 2),
        ("started", 3),
        ("done", 3),
        ("started", 4),
        ("failed", 4),
    ]
    .iter()
    .map(|(p, i)| (p.to_string(), *i))
    .collect();
    assert_eq!(steps, expected);
    let failed = events.iter().find(|e| e["phase"] == "failed").unwrap();
    assert_eq!(failed["status"], 4);
    assert_eq!(failed["total"], 4);
    assert!(events
        .iter()
        .any(|e| e["event"] == "output" && e["text"] == "one\n"));
    let last = events.last().unwrap();
    assert_eq!(
        (&last["event"], &last["exit"], &last["step"]),
        (&"error".into(), &1.into(), &4.into())
    );

    // Again, up to the copy: every step from the cache, said in the result event.
    let ok_spec = env.spec(
        "ok.spec",
        "((from busybox) (shell /bin/sh -c) (run (shell \"echo one\")) (copy (src a.txt) (dst /a)))",
    );
    let out = env.build_with(&ok_spec, &["--progress", "json"]);
    let last: serde_json::Value =
        serde_json::from_str(text(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "result");
    assert_eq!((&last["steps"], &last["cached"]), (&3.into(), &3.into()));
    assert_eq!(last["id"].as_str().unwrap().len(), 64);
    // `log` prints a step's stored log: the `echo one` step's, by the id its event gave.
    let echo_id = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["phase"] == "done" && e["index"] == 2)
        .map(|e| e["id"].as_str().unwrap().to_string())
        .unwrap();
    assert_eq!(ok(&env.run(&["log", &echo_id]), "log"), "one\n");

    // tty: counters on step headings only, a time on what was built, a summary on stderr.
    let new_spec = env.spec(
        "new.spec",
        "((from busybox) (shell /bin/sh -c) (run (shell \"echo one\")) (run (shell \"printf two\")))",
    );
    let out = env.build_with(&new_spec, &["--progress", "tty"]);
    let shown = testkit::e2e::redact(&text(&out.stdout));
    let shown: String = shown
        .lines()
        .map(|l| match l.rfind(" (") {
            Some(i) if l.ends_with("s)") && l.starts_with("---> saved") => {
                format!("{} (T)", &l[..i])
            }
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        shown,
        "[1/3] (from busybox)\n---> using \"[ID]\" from cache\n\
         /: (shell /bin/sh -c)\n\
         [2/3] /: (run (shell \"echo one\"))\none\n---> using \"[ID]\" from cache\n\
         [3/3] /: (run (shell \"printf two\"))\ntwo\n---> saved as \"[ID]\" (T)\nGot: \"[ID]\""
    );
    assert!(
        text(&out.stderr).contains(": 3 steps, 2 from the cache"),
        "{}",
        text(&out.stderr)
    );
    // plain is OBuilder's log as is.
    let out = env.build_with(&new_spec, &["--progress", "plain"]);
    assert!(text(&out.stdout).starts_with("(from busybox)\n"));

    // Listings as JSON.
    let v: serde_json::Value =
        serde_json::from_str(&ok(&env.run(&["image", "ls", "--format", "json"]), "ls")).unwrap();
    assert_eq!(v[0]["name"], "busybox");
    assert!(v[0]["size"].as_u64().unwrap() > 1_000_000, "{v}");
    let v: serde_json::Value =
        serde_json::from_str(&ok(&env.run(&["df", "--format", "json"]), "df")).unwrap();
    assert!(v["results"].as_u64().unwrap() >= 4, "{v}");
    let v: serde_json::Value = serde_json::from_str(&ok(
        &env.run(&["cache", "ls", "--format", "json"]),
        "cache ls",
    ))
    .unwrap();
    assert_eq!(v, serde_json::json!([]));
    env.assert_clean();
}

/// `login` checks credentials against a registry with token auth and keeps them where
/// `push` and `(from …)` find them; `logout` forgets them.
#[test]
fn login_push_pull_logout_with_token_auth() {
    if !needs(
        "rsync-copy",
        &[Cap::Tool("docker-registry"), Cap::Tool("openssl")],
    ) {
        return;
    }
    let env = Env::new(bin(), "rsync-copy");
    let registry = TestRegistry::start_with_token_auth(&["private/img"]);
    let (user, pass) = registry.creds.clone().unwrap();
    let cfg = env.tmp.path().join("docker");
    let with_creds = |args: &[&str], stdin: &str| {
        let mut c = env.command(args);
        if args[0] == "login" || args[0] == "logout" {
            c = Command::new(bin());
            c.args(args);
        }
        c.env("DOCKER_CONFIG", &cfg)
            .env("REGISTRY_AUTH_FILE", env.tmp.path().join("no-auth.json"));
        output_with_stdin(&mut c, stdin.as_bytes())
    };
    let spec = env.spec(
        "s.spec",
        "((from busybox) (shell /bin/sh -c) (run (shell \"echo pushed > /p\")))",
    );
    let id = ok(&env.build_with(&spec, &["-q"]), "build")
        .trim()
        .to_string();
    let target = format!("{}/private/img:v1", registry.addr);

    // Before login: the push is refused, and the error says how to log in.
    let out = with_creds(&["push", &id, &target], "");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("obuilder login"),
        "{}",
        text(&out.stderr)
    );

    let out = with_creds(
        &["login", &registry.addr, "-u", &user, "--password-stdin"],
        "wrong\n",
    );
    assert!(!out.status.success(), "a wrong password is refused");
    assert!(
        text(&out.stderr).contains("access denied"),
        "{}",
        text(&out.stderr)
    );
    let out = with_creds(
        &["login", &registry.addr, "-u", &user, "--password-stdin"],
        &format!("{pass}\n"),
    );
    assert!(ok(&out, "login").contains("Login succeeded"));

    ok(&with_creds(&["push", &id, &target], ""), "push after login");
    let back = env.spec(
        "b.spec",
        &format!("((from {target}) (shell /bin/sh -c) (run (shell \"cat /p\")))"),
    );
    let out = with_creds(
        &[
            "build",
            "-f",
            back.to_str().unwrap(),
            env.ctx.to_str().unwrap(),
        ],
        "",
    );
    assert!(ok(&out, "pull back").contains("pushed\n"));

    ok(&with_creds(&["logout", &registry.addr], ""), "logout");
    let out = with_creds(&["logout", &registry.addr], "");
    assert_eq!(out.status.code(), Some(2), "not logged in any more");

    // Where podman and skopeo keep credentials: the containers auth file...
    // (base64 by coreutils' `base64`, to check ours against another's)
    let basic = text(
        &output_with_stdin(
            Command::new("base64").arg("-w0"),
            format!("{user}:{pass}").as_bytes(),
        )
        .stdout,
    )
    .trim()
    .to_string();
    let auth_file = env.tmp.path().join("auth.json");
    std::fs::write(
        &auth_file,
        format!(
            r#"{{"auths":{{"{}":{{"auth":"{basic}"}}}}}}"#,
            registry.addr
        ),
    )
    .unwrap();
    let push = |extra_env: &[(&str, &std::ffi::OsStr)], tag: &str| {
        let mut c = env.command(&["push", &id, &format!("{}/private/img:{tag}", registry.addr)]);
        c.env("DOCKER_CONFIG", env.tmp.path().join("empty-docker"))
            .env("REGISTRY_AUTH_FILE", env.tmp.path().join("none.json"));
        for (k, v) in extra_env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    ok(
        &push(&[("REGISTRY_AUTH_FILE", auth_file.as_os_str())], "v2"),
        "push with REGISTRY_AUTH_FILE",
    );
    // ...and a credential helper named by credsStore in the Docker config.
    let helpers = env.tmp.path().join("bin");
    std::fs::create_dir_all(&helpers).unwrap();
    let helper = helpers.join("docker-credential-obtest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\nread server\n[ \"$server\" = \"{}\" ] || exit 1\necho '{{\"Username\":\"{user}\",\"Secret\":\"{pass}\"}}'\n",
            registry.addr
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let docker = env.tmp.path().join("helper-docker");
    std::fs::create_dir_all(&docker).unwrap();
    std::fs::write(docker.join("config.json"), r#"{"credsStore":"obtest"}"#).unwrap();
    let path = format!(
        "{}:{}",
        helpers.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    ok(
        &push(
            &[
                ("DOCKER_CONFIG", docker.as_os_str()),
                ("PATH", std::ffi::OsStr::new(&path)),
            ],
            "v3",
        ),
        "push with a credential helper",
    );
}

/// The exported Dockerfile makes, with buildah, the tree the spec makes with obuilder:
/// a directory copied into a directory lands as DST/NAME in both.
#[test]
fn dockerfile_export_builds_the_same_tree_with_buildah() {
    if !needs(
        "rsync-copy",
        &[Cap::Tool("docker-registry"), Cap::Tool("buildah")],
    ) {
        return;
    }
    let env = Env::new(bin(), "rsync-copy");
    let registry = TestRegistry::start();
    let base = env.spec("base.spec", "((from busybox))");
    let base_id = ok(&env.build_with(&base, &["-q"]), "base")
        .trim()
        .to_string();
    let bb = format!("{}/bb:1", registry.addr);
    ok(&env.run(&["push", &base_id, &bb]), "push the base");
    let spec = env.spec(
        "d.spec",
        &format!(
            "((from {bb}) (shell /bin/sh -c) (copy (src sub a.txt) (dst /build/)) (copy (src sub) (dst /other)) (run (network host) (shell \"true\")))"
        ),
    );
    let id = ok(&env.build_with(&spec, &["-q"]), "build")
        .trim()
        .to_string();
    let list = "find /build /other | sort";
    let ours = env
        .command(&["run", &id])
        .args(["--", "/bin/sh", "-c", list])
        .output()
        .unwrap();
    let ours = ok(&ours, "run");
    assert!(ours.contains("/build/sub/run.sh\n"), "{ours}");

    let dockerfile = ok(
        &Command::new(bin())
            .args(["dockerfile", "-f", spec.to_str().unwrap()])
            .output()
            .unwrap(),
        "dockerfile",
    );
    assert!(
        dockerfile.contains("COPY sub /build/sub\nCOPY a.txt /build/a.txt\n"),
        "{dockerfile}"
    );
    assert!(
        dockerfile.contains("# dropped: (network host)"),
        "{dockerfile}"
    );
    let df = env.tmp.path().join("Dockerfile");
    std::fs::write(&df, &dockerfile).unwrap();
    let vfs = env.tmp.path().join("buildah");
    let b = |args: &[&str]| {
        Command::new("buildah")
            .arg("--root")
            .arg(vfs.join("root"))
            .arg("--runroot")
            .arg(vfs.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .output()
            .unwrap()
    };
    ok(
        &b(&[
            "bud",
            "--quiet",
            "--isolation",
            "chroot",
            "--tls-verify=false",
            "-f",
            df.to_str().unwrap(),
            "-t",
            "obuilder-dtest",
            env.ctx.to_str().unwrap(),
        ]),
        "buildah bud",
    );
    let c = ok(
        &b(&["from", "--name", "obuilder-dtest-c", "obuilder-dtest"]),
        "buildah from",
    );
    let c = c.trim().lines().last().unwrap().to_string();
    let theirs = ok(
        &b(&[
            "run",
            "--isolation",
            "chroot",
            &c,
            "--",
            "/bin/sh",
            "-c",
            list,
        ]),
        "buildah run",
    );
    assert_eq!(
        ours, theirs,
        "obuilder's tree (left) and buildah's (right) differ"
    );
    let _ = b(&["rm", &c]);
    let _ = b(&["rmi", "--all", "--force"]);
    let _ = Command::new("umount")
        .arg("-R")
        .arg(vfs.join("root"))
        .status();
    env.assert_clean();
}

/// `--keep-failed`: the failed step's tree is kept under an id of its own, `run`/`shell`
/// enter it, a second failure of the same step replaces it, `delete` removes it; without
/// the flag nothing is kept.
fn keep_failed(kind: &str) {
    let env = Env::new(bin(), kind);
    let spec = env.spec(
        "f.spec",
        "((from busybox) (shell /bin/sh -c) (run (shell \"echo one > /a\")) (run (shell \"echo partial > /half; exit 3\")))",
    );
    let out = env.build(&spec);
    assert_eq!(out.status.code(), Some(1));
    assert!(!text(&out.stdout).contains("kept"), "{}", text(&out.stdout));
    let out = env.build_with(&spec, &["--keep-failed"]);
    assert_eq!(out.status.code(), Some(1));
    let log = text(&out.stdout);
    let short = testkit::e2e::kept_id(&log);
    let look = |id: &str| {
        env.command(&["run", id])
            .args(["--", "/bin/sh", "-c", "cat /a /half"])
            .output()
            .unwrap()
    };
    assert_eq!(ok(&look(&short), "run in the kept tree"), "one\npartial\n");
    // Again: the same id, replaced (one kept tree per failing step).
    let out = env.build_with(&spec, &["--keep-failed", "-q"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(&format!("`obuilder shell {short}`")),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(ok(&look(&short), "run again"), "one\npartial\n");
    ok(&env.run(&["delete", &short]), "delete");
    assert_eq!(look(&short).status.code(), Some(2), "gone");
    env.assert_clean();
}

#[test]
fn keep_failed_btrfs() {
    if !needs("btrfs", &[]) {
        return;
    }
    keep_failed("btrfs");
}

#[test]
fn keep_failed_overlayfs() {
    if !needs("overlayfs", &[]) {
        return;
    }
    keep_failed("overlayfs");
}

/// `image import`: one image of a layout holding several by `DIR:TAG` (never a guess),
/// names checked, a replaced image said, a binary file's bytes never printed.
#[test]
fn import_picks_a_tag_checks_names_and_prints_no_binary() {
    if !needs("rsync-copy", &[]) {
        return;
    }
    let env = Env::new(bin(), "rsync-copy");
    let a = env.spec(
        "a.spec",
        "((from busybox) (shell /bin/sh -c) (run (shell \"echo a > /which\")))",
    );
    let b = env.spec(
        "b.spec",
        "((from busybox) (shell /bin/sh -c) (run (shell \"echo b > /which\")))",
    );
    let layout = env.tmp.path().join("two");
    for (spec, tag) in [(&a, "a"), (&b, "b")] {
        let id = ok(&env.build_with(spec, &["-q"]), "build")
            .trim()
            .to_string();
        ok(
            &env.run(&["export", &id, &format!("oci:{}:{tag}", layout.display())]),
            "export",
        );
    }
    let out = env.run(&["image", "import", "both", layout.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("holds 2 images (a, b); say which with PATH:TAG"),
        "{}",
        text(&out.stderr)
    );
    ok(
        &env.run(&[
            "image",
            "import",
            "pick-b",
            &format!("{}:b", layout.display()),
        ]),
        "import :b",
    );
    let spec = env.spec(
        "on-b.spec",
        "((from pick-b) (shell /bin/sh -c) (run (shell \"cat /which\")))",
    );
    assert!(ok(&env.build(&spec), "build on it").contains("b\n"));
    let out = env.run(&[
        "image",
        "import",
        "pick-c",
        &format!("{}:c", layout.display()),
    ]);
    assert!(
        text(&out.stderr).contains("no image tagged \"c\" (it has: a, b)"),
        "{}",
        text(&out.stderr)
    );

    // Re-import under the same name with other content: said.
    let out = env.run(&[
        "image",
        "import",
        "pick-b",
        &format!("{}:a", layout.display()),
    ]);
    assert!(ok(&out, "re-import").contains("Imported"));
    assert!(
        text(&out.stderr).contains("Replaced the image \"pick-b\""),
        "{}",
        text(&out.stderr)
    );

    let out = env.run(&["image", "import", "Bad Name!", layout.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("not a valid name"),
        "{}",
        text(&out.stderr)
    );

    let garbage = env.tmp.path().join("garbage.bin");
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&garbage, &bytes).unwrap();
    let out = env.run(&["image", "import", "g", garbage.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.chars().all(|c| !c.is_control() || c == '\n'),
        "control characters in the error: {err:?}"
    );
    env.assert_clean();
}

/// `shell` on a terminal: with runc the shell gets a terminal of its own (runc's, relayed);
/// with the native sandbox it gets this one, in the foreground. Either way it reads what
/// is typed, and its exit status is the command's.
#[test]
fn shell_gets_a_terminal() {
    if !needs("rsync-copy", &[Cap::Tool("script")]) {
        return;
    }
    for sandbox in testkit::e2e::SANDBOXES {
        let env = Env::new(bin(), "rsync-copy").sandboxed(sandbox);
        let spec = env.spec(
            "s.spec",
            "((from busybox) (shell /bin/sh -c) (env SEEN yes) (run (shell \"true\")))",
        );
        ok(&env.build_with(&spec, &["-t", "t1", "-q"]), "build");
        // `script` runs obuilder on a pseudo-terminal and types what it reads.
        let cmdline = env
            .args(&["shell", "t1"])
            .iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ");
        let out = output_with_stdin(
            Command::new("timeout")
                .args([
                    "60",
                    "script",
                    "-qec",
                    &format!("'{}' {cmdline}", bin()),
                    "/dev/null",
                ])
                .env("OBUILDER_SANDBOX", sandbox),
            b"tty; test -t 0 && test -t 1 && echo on-a-terminal; echo seen=$SEEN; exit 7\n",
        );
        let o = text(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(7),
            "{sandbox}: {o}{}",
            text(&out.stderr)
        );
        if sandbox == "runc" {
            assert!(o.contains("/dev/pts/"), "a terminal of its own: {o}");
        }
        assert!(o.contains("on-a-terminal"), "{sandbox}: {o}");
        assert!(o.contains("seen=yes"), "{sandbox}: {o}");
        env.assert_clean();
    }
}

/// Deleting results frees the layers their exports left in the blob store, and only those.
#[test]
fn deleting_a_result_frees_its_exported_layers() {
    if !needs("rsync-copy", &[]) {
        return;
    }
    let env = Env::new(bin(), "rsync-copy");
    let blobs = env.root().join("state/images/blobs/sha256");
    let count = || std::fs::read_dir(&blobs).unwrap().count();
    let before = count();
    let spec = env.spec(
        "s.spec",
        "((from busybox) (shell /bin/sh -c) (run (shell \"head -c 100000 /dev/zero > /big\")))",
    );
    let id = ok(&env.build_with(&spec, &["-q"]), "build")
        .trim()
        .to_string();
    let oci = env.tmp.path().join("oci");
    ok(
        &env.run(&["export", &id, &format!("oci:{}", oci.display())]),
        "export",
    );
    assert!(
        count() > before,
        "the export stored its layer, config and manifest"
    );
    let out = ok(&env.run(&["delete", &id]), "delete");
    assert!(out.contains("Freed "), "{out}");
    assert_eq!(count(), before, "only what the export made is gone");
    // The base image is intact: it builds again without a new import.
    ok(&env.build_with(&spec, &["-q"]), "build again");
    env.assert_clean();
}
