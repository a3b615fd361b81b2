//! The spec subcommands as a user runs them: exit codes, messages, files rewritten.

// Tests drive the real binary and tools directly.
#![allow(clippy::disallowed_methods)]

use std::path::Path;
use std::process::{Command, Output};

fn obuilder(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_obuilder"))
        .args(args)
        .output()
        .expect("run obuilder")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn examples() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples"))
}

#[test]
fn check_accepts_the_examples() {
    let specs: Vec<String> = std::fs::read_dir(examples())
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|p| p.ends_with(".spec"))
        .collect();
    let mut args = vec!["check"];
    args.extend(specs.iter().map(String::as_str));
    let out = obuilder(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("specs OK"));
}

#[test]
fn check_reports_every_error_in_every_file() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.spec");
    let b = dir.path().join("b.spec");
    std::fs::write(&a, "((from busybox)\n (rn (shell \"x\")))\n").unwrap();
    std::fs::write(
        &b,
        "((from busybox)\n (copy (from (build x)) (src a) (dst b))\n (env A))\n",
    )
    .unwrap();
    let out = obuilder(&["check", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:2:3: error: unknown operation `rn`",
            a.display()
        )),
        "{err}"
    );
    assert!(err.contains("help: did you mean `run`?"), "{err}");
    assert!(
        err.contains(&format!("{}:2:14: error: unknown build `x`", b.display())),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{}:3:2: error: expected `(env NAME VALUE)`",
            b.display()
        )),
        "{err}"
    );
    assert!(err.contains("2 of 2 spec file(s) have errors"), "{err}");
}

#[test]
fn check_names_a_missing_file() {
    let out = obuilder(&["check", "/nonexistent/x.spec"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot read spec file /nonexistent/x.spec"));
}

#[test]
fn fmt_rewrites_in_place_keeping_comments_and_check_mode_reports() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("s.spec");
    let original = "; top\n((from   busybox)   (run (shell \"echo hi\")   ; why\n (network host)))";
    std::fs::write(&f, original).unwrap();
    let out = obuilder(&["fmt", "--check", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("not formatted"));
    assert_eq!(
        std::fs::read_to_string(&f).unwrap(),
        original,
        "--check must not write"
    );

    let out = obuilder(&["fmt", f.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let formatted = std::fs::read_to_string(&f).unwrap();
    assert_eq!(
        formatted,
        "; top\n((from busybox)\n (run (shell \"echo hi\") ; why\n      (network host)))\n"
    );
    let out = obuilder(&["fmt", "--check", f.to_str().unwrap()]);
    assert!(out.status.success());
}

#[test]
fn fmt_leaves_an_invalid_spec_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.spec");
    std::fs::write(&f, "((from busybox) (run (shell \"x\")").unwrap();
    let out = obuilder(&["fmt", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains(&format!("{}:1:17: error: unclosed `(`", f.display())));
    assert_eq!(
        std::fs::read_to_string(&f).unwrap(),
        "((from busybox) (run (shell \"x\")"
    );
}

#[test]
fn dockerfile_plain_buildkit_and_windows() {
    let spec = examples().join("secrets.spec");
    let out = obuilder(&["dockerfile", "-f", spec.to_str().unwrap()]);
    assert!(out.status.success());
    let plain = text(&out.stdout);
    assert!(
        plain.starts_with("FROM busybox\nSHELL [ \"/bin/sh\", \"-c\" ]\n"),
        "{plain}"
    );
    assert!(!plain.contains("--mount"));
    let out = obuilder(&["dockerfile", "-f", spec.to_str().unwrap(), "--buildkit"]);
    assert!(text(&out.stdout)
        .contains("RUN --mount=type=secret,id=token,target=/run/secrets/token,uid=0 "));
    let out = obuilder(&[
        "dockerfile",
        "--escape",
        "windows",
        "-f",
        spec.to_str().unwrap(),
    ]);
    assert!(text(&out.stdout).starts_with("#escape=`\n"));
    let out = obuilder(&[
        "dockerfile",
        "--escape",
        "mac",
        "-f",
        spec.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("possible values: unix, windows"));
}

/// Strings read as Sexplib reads them (found by a differential run against OCaml
/// OBuilder's `dockerfile`), and a spec that is not UTF-8 is located.
#[test]
fn strings_and_encodings_read_as_sexplib_does() {
    let dir = tempfile::tempdir().unwrap();
    let ok = dir.path().join("ok.spec");
    std::fs::write(&ok, "((from busybox) (run (shell \"echo a\\ b \\o\")))").unwrap();
    let out = obuilder(&["dockerfile", "-f", ok.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(r"RUN echo a\ b \o"),
        "backslash-space and unknown escapes stay as written: {}",
        text(&out.stdout)
    );
    for (body, at, why) in [
        (
            "((from busybox)\n (run (shell \"a\\9\")))",
            "2:16",
            "unterminated decimal escape sequence",
        ),
        (
            "((from busybox)\n (run (shell \"a\\12b\")))",
            "2:16",
            "unterminated decimal escape sequence",
        ),
        (
            "((from busybox)\n (run (shell \"a\\xZ\")))",
            "2:16",
            "unterminated hexadecimal escape sequence",
        ),
    ] {
        let f = dir.path().join("bad.spec");
        std::fs::write(&f, body).unwrap();
        let out = obuilder(&["check", f.to_str().unwrap()]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("{}:{at}: error: {why}", f.display())),
            "{body}: {err}"
        );
    }
    let latin1 = dir.path().join("latin1.spec");
    std::fs::write(&latin1, b"((from busybox)\n (run (shell \"caf\xe9\")))").unwrap();
    for cmd in ["check", "build"] {
        let mut args = vec![cmd];
        if cmd == "build" {
            args.extend(["-f", latin1.to_str().unwrap(), "/tmp"]);
        } else {
            args.push(latin1.to_str().unwrap());
        }
        let out = obuilder(&args);
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!(
                "{}:2:18: error: the spec is not UTF-8 text: byte 0xe9",
                latin1.display()
            )),
            "{cmd}: {err}"
        );
    }
}

fn obuilder_stdin(args: &[&str], stdin: &str) -> Output {
    testkit::e2e::output_with_stdin(
        Command::new(env!("CARGO_BIN_EXE_obuilder")).args(args),
        stdin.as_bytes(),
    )
}

/// What a copy would refuse at build time is refused by `check`, each at its place.
#[test]
fn check_catches_copy_mistakes_statically() {
    let spec = "((from busybox)\n (copy (src a b) (dst /x))\n (copy (src ../etc) (dst /y))\n (copy (src) (dst /z)))\n";
    let out = obuilder_stdin(&["check", "-"], spec);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    for want in [
        "<stdin>:2:18: error: 2 sources are copied into a directory: the destination must end with `/`",
        "help: write (dst /x/)",
        "<stdin>:3:8: error: source \"../etc\" uses `..`",
        "<stdin>:4:8: error: `(src)` names no path",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}

#[test]
fn a_dockerfile_is_recognised() {
    let out = obuilder_stdin(
        &["check", "-"],
        "# syntax=docker/dockerfile:1\nFROM alpine:3.20\nRUN apk add make\nCOPY . /src\n",
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("<stdin>:2:1: error: this looks like a Dockerfile"),
        "{err}"
    );
    assert_eq!(
        err.matches("error:").count(),
        1,
        "one error, not one per line: {err}"
    );
}

#[test]
fn dash_is_standard_input_for_fmt_and_check() {
    let out = obuilder_stdin(&["fmt", "-"], "((from busybox)(run (shell \"x\")))");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "((from busybox)\n (run (shell \"x\")))\n"
    );
    let out = obuilder_stdin(&["check", "-"], "((from busybox))");
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn check_platform_warns_with_the_place_and_still_passes() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("mac.spec");
    std::fs::write(
        &spec,
        "((from base)\n (workdir /opt/src)\n (user (uid 1000) (gid 1000))\n (run (network host) (shell \"make\")))\n",
    )
    .unwrap();
    let s = spec.to_str().unwrap();
    let out = obuilder(&[
        "check",
        "--platform",
        "macos",
        "--home-path",
        "/Users/ci",
        s,
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(&format!(
            "{s}:2:2: warning: macOS: the user sandbox refuses the workdir /opt/src"
        )),
        "{err}"
    );
    assert!(err.contains("under the home (/Users/ci)"), "{err}");
    assert!(
        err.contains(&format!("{s}:3:2: warning: macOS: (user …) is refused")),
        "{err}"
    );
    assert!(err.contains("1 spec OK, 2 warning(s) for macos"), "{err}");
    let out = obuilder(&["check", "--platform", "windows", s]);
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "{s}:4:2: warning: Windows: containers have no host network"
        )),
        "{err}"
    );
    let out = obuilder(&["check", "--platform", "linux", s]);
    assert_eq!(text(&out.stderr), "1 spec OK\n");
    let out = obuilder(&["check", "--platform", "beos", s]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("unknown platform \"beos\""));
}
