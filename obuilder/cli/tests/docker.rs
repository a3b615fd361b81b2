#![cfg(target_os = "linux")]
//! The docker: store and the Docker sandbox for real, through Debian's podman as the
//! Docker-compatible CLI (`--docker-cli`): a wrapper gives it a private storage (vfs) and
//! run directory under the test's temp dir, runc, and file limits this machine allows.
//! The Windows-only parts (servercore and Cygwin's tar, pulled base images,
//! `--isolation hyperv`) are in the command-seam tests of `obuilder-sandbox`
//! (`tests/docker_seam.rs`) and `obuilder-stores` (`tests/commands.rs`, `windows_seam_…`).

// Tests drive the real binary and tools directly.
#![allow(clippy::disallowed_methods)]

use std::path::PathBuf;
use std::process::{Command, Output};

use testkit::e2e::{make_busybox, text};
use testkit::{require, Cap};

struct Engine {
    tmp: tempfile::TempDir,
    cli: PathBuf,
    store: String,
    ctx: PathBuf,
}

impl Engine {
    fn new() -> Engine {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::write(
            d.join("containers.conf"),
            "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=4096:4096\"]\n",
        )
        .unwrap();
        // Registries the engine may reach over plain HTTP (a test's own, on 127.0.0.1).
        std::fs::write(d.join("registries.conf"), "").unwrap();
        let cli = d.join("docker");
        std::fs::write(
            &cli,
            format!(
                "#!/bin/sh\nexport CONTAINERS_CONF={d}/containers.conf CONTAINERS_REGISTRIES_CONF={d}/registries.conf\nexec podman --root {d}/storage --runroot {d}/run --runtime runc --storage-driver vfs --cgroup-manager cgroupfs --events-backend none \"$@\"\n",
                d = d.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&cli, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let ctx = d.join("ctx");
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::write(ctx.join("a.txt"), "hello\n").unwrap();
        let e = Engine {
            store: format!("docker:{}", d.join("store").display()),
            cli,
            ctx,
            tmp,
        };
        let rootfs = e.tmp.path().join("busybox");
        make_busybox(&rootfs);
        let out = e.obuilder(&[
            "image",
            "import",
            "busybox",
            rootfs.to_str().unwrap(),
            "--env",
            "PATH=/bin:/usr/bin",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        e
    }

    fn obuilder(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .args(["120", env!("CARGO_BIN_EXE_obuilder")])
            .args(args)
            .args(["--store", &self.store, "--docker-cli"])
            .arg(&self.cli)
            .output()
            .unwrap()
    }

    fn build(&self, name: &str, spec: &str, extra: &[&str]) -> Output {
        let f = self.tmp.path().join(name);
        std::fs::write(&f, spec).unwrap();
        let mut args = vec![
            "build",
            "-f",
            f.to_str().unwrap(),
            self.ctx.to_str().unwrap(),
            "--sandbox",
            "docker",
        ];
        args.extend_from_slice(extra);
        self.obuilder(&args)
    }

    /// `docker ARGS` on the test's engine.
    fn docker(&self, args: &[&str]) -> String {
        let out = Command::new(&self.cli).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    }

    fn images(&self) -> Vec<String> {
        self.docker(&["images", "--format", "{{.Tag}}"])
            .lines()
            .map(str::to_string)
            .collect()
    }
}

fn ok(out: &Output, what: &str) -> String {
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{what}:\n{all}");
    all
}

const SPEC: &str = r#"((from busybox)
 (shell /bin/sh -c)
 (run (shell "chmod 0711 /etc; mkdir -p /home/opam && chown 1000:1000 /home/opam"))
 (workdir /home/opam)
 (copy (src a.txt) (dst /etc/))
 (copy (src a.txt) (dst ./src/a.txt))
 (run (cache (dl (target /var/cache/dl)))
      (shell "echo x >> /var/cache/dl/n; wc -l < /var/cache/dl/n"))
 (run (secrets (tok (target /run/secrets/tok)))
      (shell "cat /etc/a.txt src/a.txt; stat -c '%a %u' /etc /home/opam; id -u; hostname; ls /sys/class/net; test \"$(cut -c2- /run/secrets/tok)\" = 3cret && echo secret-read; cat /run/secrets/tok")))
"#;

#[test]
fn docker_store_and_sandbox_with_podman_run_copy_cache_secret_and_cached_rebuild() {
    require!(Cap::Root, Cap::Tool("podman"), Cap::Tool("runc"));
    let e = Engine::new();
    let secret = e.tmp.path().join("tok");
    std::fs::write(&secret, "s3cret").unwrap();
    let sec = format!("tok:{}", secret.display());
    let out = ok(&e.build("s.spec", SPEC, &["--secret", &sec]), "first build");
    // The copies kept the image's directories as they were (0711 root, 1000's home).
    assert!(
        out.contains("hello\nhello\n711 0\n755 1000\n0\nbuilder\nlo\nsecret-read\n***"),
        "{out}"
    );
    assert!(!out.contains("s3cret"), "the secret is masked: {out}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("Got: "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    assert!(
        e.images().contains(&id),
        "the result is an image: {:?}",
        e.images()
    );
    assert_eq!(e.docker(&["ps", "-a", "-q"]), "", "no container left");
    // Every result keeps the base image's ENTRYPOINT and CMD (none), not the last
    // step's command or a copy's `tar`.
    let names = e.docker(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    for name in names.lines().filter(|n| !n.ends_with(":latest")) {
        let cfg = e.docker(&[
            "image",
            "inspect",
            "--format",
            "{{json .Config.Entrypoint}} {{json .Config.Cmd}}",
            name,
        ]);
        assert!(
            ["null null", "[] []", "null []", "[] null"].contains(&cfg.trim()),
            "{name}: {cfg}"
        );
    }

    // Cached; then only the last step runs, with the cache the first build left.
    let out = ok(&e.build("s.spec", SPEC, &["--secret", &sec]), "again");
    assert!(
        out.contains("from the cache") && !out.contains("saved as"),
        "{out}"
    );
    let changed = SPEC.replace("(shell \"echo x", "(shell \"echo y; echo x");
    let out = ok(&e.build("c.spec", &changed, &["--secret", &sec]), "changed");
    assert!(out.contains("y\n2\n"), "{out}");

    // The network: none by default; the host's with (network host).
    let net = r#"((from busybox) (shell /bin/sh -c) (run (network host) (shell "ls /sys/class/net | wc -l")))"#;
    let out = ok(&e.build("n.spec", net, &[]), "host network");
    let count: usize = out.lines().find_map(|l| l.trim().parse().ok()).unwrap_or(0);
    assert!(count >= 1, "{out}");

    // A user by name (Windows' ContainerAdministrator in the original): the image's
    // passwd resolves it.
    let named = r#"((from busybox) (shell /bin/sh -c) (user (name nobody)) (run (shell "echo uid=$(id -u)")))"#;
    let out = ok(&e.build("u.spec", named, &[]), "user by name");
    assert!(out.contains("uid=65534"), "{out}");

    // A stage's result copied into another: its image exported as a view.
    let stages = r#"((build stage ((from busybox) (shell /bin/sh -c) (run (shell "echo staged > /out"))))
 (from busybox) (shell /bin/sh -c)
 (copy (from (build stage)) (src /out) (dst /got))
 (run (shell "cat /got")))"#;
    let out = ok(&e.build("m.spec", stages, &[]), "stages");
    assert!(out.contains("staged"), "{out}");
    let views = e.tmp.path().join("store/state/docker-views");
    let left: Vec<_> = std::fs::read_dir(&views).into_iter().flatten().collect();
    assert!(left.is_empty(), "views released: {left:?}");

    // A failing step: its exit status, no image, no container.
    let before = e.images().len();
    let fail = r#"((from busybox) (shell /bin/sh -c) (run (shell "echo failing; exit 3")))"#;
    let out = e.build("f.spec", fail, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("exited with status 3"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(e.images().len(), before, "nothing committed");
    assert_eq!(e.docker(&["ps", "-a", "-q"]), "");

    // `run` in a throw-away container of a result.
    let out = Command::new(env!("CARGO_BIN_EXE_obuilder"))
        .args([
            "run",
            &id,
            "--sandbox",
            "docker",
            "--store",
            &e.store,
            "--docker-cli",
        ])
        .arg(&e.cli)
        .args(["--", "cat", "/etc/a.txt"])
        .output()
        .unwrap();
    let out = ok(&out, "run");
    assert!(out.contains("hello"), "{out}");

    // A crash leaves a container and an image no result has: the next start removes them.
    let prefix = e
        .docker(&["images", "--format", "{{.Repository}}"])
        .lines()
        .next()
        .unwrap()
        .trim_start_matches("localhost/")
        .to_string();
    e.docker(&[
        "create",
        "--name",
        &format!("{prefix}-leftover"),
        &format!("{prefix}:{id}"),
        "x",
    ]);
    e.docker(&[
        "tag",
        &format!("{prefix}:{id}"),
        &format!("{prefix}:orphan"),
    ]);
    ok(&e.obuilder(&["cache", "ls"]), "cache ls");
    ok(
        &e.build("s.spec", SPEC, &["--secret", &sec]),
        "after a crash",
    );
    assert_eq!(e.docker(&["ps", "-a", "-q"]), "");
    assert!(
        !e.images().contains(&"orphan".to_string()),
        "{:?}",
        e.images()
    );

    // Caches: listed, refused while... idle here, so removed; results deleted with images.
    let out = ok(&e.obuilder(&["cache", "ls"]), "cache ls");
    assert!(out.contains("dl"), "{out}");
    ok(&e.obuilder(&["cache", "rm", "dl"]), "cache rm");
    ok(&e.obuilder(&["delete", &id]), "delete");
    assert!(!e.images().contains(&id));
    ok(&e.obuilder(&["clean"]), "clean");
    assert!(e.images().is_empty(), "{:?}", e.images());
}

#[test]
fn docker_sandbox_and_store_go_together() {
    require!(Cap::Root, Cap::Tool("podman"), Cap::Tool("runc"));
    let e = Engine::new();
    let spec = "((from busybox) (shell /bin/sh -c) (run (shell \"true\")))";
    let f = e.tmp.path().join("p.spec");
    std::fs::write(&f, spec).unwrap();
    // Without --sandbox, a docker: store's steps run in its engine.
    let out = e.obuilder(&["build", "-f", f.to_str().unwrap(), e.ctx.to_str().unwrap()]);
    ok(&out, "the store's sandbox by default");
    let out = e.obuilder(&[
        "build",
        "-f",
        f.to_str().unwrap(),
        e.ctx.to_str().unwrap(),
        "--sandbox",
        "runc",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("a docker: store runs its steps with --sandbox docker"),
        "{}",
        text(&out.stderr)
    );
    // A store opened for Windows containers on this (Linux) engine: refused, saying which
    // flag fits, before anything is made in the engine.
    let before = e.images();
    let out = e.obuilder(&[
        "build",
        "-f",
        f.to_str().unwrap(),
        e.ctx.to_str().unwrap(),
        "--docker-platform",
        "windows",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr)
            .contains("runs linux containers, not windows ones: give --docker-platform linux"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(e.images(), before);
    let out = Command::new(env!("CARGO_BIN_EXE_obuilder"))
        .args(["build", "-f", f.to_str().unwrap(), e.ctx.to_str().unwrap()])
        .args([
            "--store",
            "rsync:/nonexistent",
            "--docker-platform",
            "windows",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--docker-platform needs --store docker:/PATH"),
        "{}",
        text(&out.stderr)
    );
}

/// `--docker-pull`: base images come from the engine's own pull (its registries and
/// settings), as on Windows engines, where it is the only way: the base step is the
/// pulled image tagged, its env is the image's, and a rebuild is fully cached.
#[test]
fn docker_pull_takes_base_images_from_the_engine() {
    require!(
        Cap::Root,
        Cap::Tool("podman"),
        Cap::Tool("runc"),
        Cap::Tool("skopeo"),
        Cap::Tool("docker-registry")
    );
    use testkit::registry::{oci, TestRegistry};
    let e = Engine::new();
    let reg = TestRegistry::start();
    let rootfs = e.tmp.path().join("busybox");
    let layout = e.tmp.path().join("layout");
    oci::write_layout(
        &layout,
        &[oci::Image {
            os: "linux",
            arch: "amd64",
            layers: vec![oci::layer_of_dir(&rootfs)],
            env: vec!["PATH=/bin:/usr/bin", "FROM_THE_IMAGE=yes"],
        }],
    );
    reg.push(&layout, "bb", "v1");
    std::fs::write(
        e.tmp.path().join("registries.conf"),
        format!(
            "[[registry]]\nlocation = \"{}\"\ninsecure = true\n",
            reg.addr
        ),
    )
    .unwrap();
    let spec = format!(
        "((from {}/bb:v1) (shell /bin/sh -c) (run (shell \"echo pulled-$FROM_THE_IMAGE\")))",
        reg.addr
    );
    let out = ok(
        &e.build("pull.spec", &spec, &["--docker-pull"]),
        "a pulled base",
    );
    assert!(out.contains("pulled-yes"), "{out}");
    assert!(out.contains("Pulled "), "{out}");
    // The pulled image, and the base step's result as a tag of it; nothing imported.
    let repos = e.docker(&["images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}"]);
    let pulled_id = repos
        .lines()
        .find(|l| l.contains("/bb:v1 "))
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or_else(|| panic!("the pulled image: {repos}"))
        .to_string();
    assert!(
        repos
            .lines()
            .filter(|l| l.ends_with(&format!(" {pulled_id}")))
            .count()
            >= 2,
        "the base step is the pulled image tagged: {repos}"
    );
    let again = ok(&e.build("pull.spec", &spec, &["--docker-pull"]), "rebuild");
    assert!(
        again.contains("2 steps, 2 from the cache"),
        "fully cached: {again}"
    );
    // The healthcheck on a pulled image (as a Windows engine's on servercore) leaves
    // the store's images as they were.
    let before = e.images();
    let image = format!("{}/bb:v1", reg.addr);
    let out = ok(
        &e.obuilder(&["healthcheck", "--docker-pull", "--image", &image]),
        "healthcheck",
    );
    assert!(out.contains("Healthcheck passed"), "{out}");
    assert_eq!(e.images(), before);
}

/// `--keep-failed` on a docker: store: the failed step's container is committed under the
/// kept id (an image to look into), replaced by the next failure, removed by `delete`.
#[test]
fn docker_store_keeps_a_failed_step_as_an_image() {
    require!(Cap::Root, Cap::Tool("podman"), Cap::Tool("runc"));
    let e = Engine::new();
    let spec = "((from busybox) (shell /bin/sh -c) (run (shell \"echo partial > /half; exit 3\")))";
    let out = e.build("f.spec", spec, &["--keep-failed"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let log = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let short = testkit::e2e::kept_id(&log);
    let kept = e
        .images()
        .into_iter()
        .find(|t| t.starts_with(&short))
        .unwrap_or_else(|| panic!("{short} is an image: {:?}", e.images()));
    let names = e.docker(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    let name = names
        .lines()
        .find(|n| n.ends_with(&kept))
        .unwrap()
        .to_string();
    let half = e.docker(&["run", "--rm", "--entrypoint", "cat", &name, "/half"]);
    assert_eq!(half, "partial\n");
    assert_eq!(e.docker(&["ps", "-a", "-q"]), "", "no container left");
    // Again: replaced, not added.
    let n = e.images().len();
    let out = e.build("f.spec", spec, &["--keep-failed"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(e.images().len(), n);
    ok(&e.obuilder(&["delete", &short]), "delete");
    assert!(!e.images().contains(&kept), "{:?}", e.images());
}
