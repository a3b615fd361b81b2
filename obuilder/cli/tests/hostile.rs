//! What a hostile step must not be able to do to the host, tried for real: the real binary,
//! real runc, every store on its own loopback filesystem.

use testkit::e2e::{caps, text, Env, STORES};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_obuilder")
}

/// A step that swaps a parent of its secret's mount point for a symlink to the host must
/// not make obuilder's clean-up of that mount point delete the host's files of the same
/// name (an empty file and its empty directories).
#[test]
fn secret_mount_point_clean_up_never_follows_a_step_made_symlink() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    for kind in STORES {
        let env = Env::new(bin(), kind);
        let victim = env.tmp.path().join("victim");
        std::fs::create_dir_all(victim.join("b/c")).unwrap();
        std::fs::write(victim.join("b/c/x"), "").unwrap();
        let secret = env.tmp.path().join("tok");
        std::fs::write(&secret, "tok").unwrap();
        let spec = env.spec(
            "s.spec",
            &format!(
                "((from busybox) (shell /bin/sh -c)\n \
                 (run (secrets (t (target /a/b/c/x)))\n  \
                 (shell \"mv /a /a.old && ln -s {} /a\")))",
                victim.display()
            ),
        );
        let out = env.build_with(&spec, &["--secret", &format!("t:{}", secret.display())]);
        assert!(
            out.status.success(),
            "{kind}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        assert!(
            victim.join("b/c/x").exists(),
            "{kind}: obuilder deleted the host's {}",
            victim.join("b/c/x").display()
        );
        assert!(victim.join("b/c").is_dir(), "{kind}: host dir removed");
        env.assert_clean();
    }
}
