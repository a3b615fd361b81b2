//! What a spec asks that another platform's sandbox cannot give (`obuilder check
//! --platform`): warnings with the place they concern, no I/O. The rules follow each
//! sandbox as reference/obuilder.md §4 describes it: the macOS user sandbox (a build user,
//! paths redirected only under the home and the Homebrew prefix, no network isolation,
//! secrets as files in `$OBUILDER_SECRETS_DIR`), FreeBSD jails (no secrets, the user by
//! uid from the image's passwd) and Windows containers through Docker (users by name,
//! drive paths, no host network, no `/bin/bash`).

use crate::sexp::{parse_document, Node, Span};
use crate::spec::{Op, Spec, User};

/// A platform whose sandbox a spec is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    Linux,
    Macos,
    Windows,
    Freebsd,
}

impl std::str::FromStr for Platform {
    type Err = String;

    fn from_str(s: &str) -> Result<Platform, String> {
        match s {
            "linux" => Ok(Platform::Linux),
            "macos" => Ok(Platform::Macos),
            "windows" => Ok(Platform::Windows),
            "freebsd" => Ok(Platform::Freebsd),
            _ => Err(format!(
                "unknown platform {s:?}: linux, macos, windows or freebsd"
            )),
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Platform::Linux => "linux",
            Platform::Macos => "macos",
            Platform::Windows => "windows",
            Platform::Freebsd => "freebsd",
        })
    }
}

/// Where the macOS user sandbox redirects (see `obuilder build --home-path/--brew-path`).
#[derive(Debug, Clone)]
pub struct MacPaths {
    pub home: String,
    pub prefixes: Vec<String>,
}

impl Default for MacPaths {
    fn default() -> MacPaths {
        MacPaths {
            home: "/Users/mac1000".into(),
            prefixes: vec!["/opt/homebrew".into(), "/usr/local".into()],
        }
    }
}

/// One warning: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub span: Span,
    pub message: String,
}

/// The warnings for `spec` (read from `src`, which gives the places) on `platform`.
pub fn check(spec: &Spec, src: &str, platform: Platform, mac: &MacPaths) -> Vec<Warning> {
    let spans = parse_document(src)
        .ok()
        .and_then(|doc| {
            let data: Vec<&Node> = doc.nodes.iter().filter(|n| !n.is_comment()).collect();
            match data.as_slice() {
                [root] => Some(stage_spans(root)),
                _ => None,
            }
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut once = Vec::new();
    stage(spec, &spans, platform, mac, &mut out, &mut once);
    out
}

/// The spans of a stage's ops and of its child stages, in order.
#[derive(Debug, Default)]
struct Spans {
    builds: Vec<Spans>,
    ops: Vec<Span>,
}

fn items(node: &Node) -> Vec<&Node> {
    match node {
        Node::List { items, .. } => items.iter().filter(|n| !n.is_comment()).collect(),
        _ => Vec::new(),
    }
}

fn head(node: &Node) -> Option<&str> {
    match items(node).first() {
        Some(Node::Atom { value, .. }) => Some(value),
        _ => None,
    }
}

fn stage_spans(root: &Node) -> Spans {
    let mut s = Spans::default();
    for item in items(root) {
        match head(item) {
            Some("build") => s.builds.push(
                items(item)
                    .get(2)
                    .map(|n| stage_spans(n))
                    .unwrap_or_default(),
            ),
            Some("from") => {}
            _ => s.ops.push(item.span()),
        }
    }
    s
}

fn under(path: &str, dir: &str) -> bool {
    path == dir || path.starts_with(&format!("{}/", dir.trim_end_matches('/')))
}

fn stage(
    spec: &Spec,
    spans: &Spans,
    platform: Platform,
    mac: &MacPaths,
    out: &mut Vec<Warning>,
    once: &mut Vec<&'static str>,
) {
    let empty = Spans::default();
    for (i, (_, child)) in spec.child_builds.iter().enumerate() {
        stage(
            child,
            spans.builds.get(i).unwrap_or(&empty),
            platform,
            mac,
            out,
            once,
        );
    }
    let mut shell_set = false;
    for (i, op) in spec.ops.iter().enumerate() {
        let span = spans.ops.get(i).copied().unwrap_or_default();
        // (A warning, and for the ones said once per spec, their key.)
        let mut found: Vec<(Option<&'static str>, String)> = Vec::new();
        let mut warn = |once: Option<&'static str>, message: String| found.push((once, message));
        match platform {
            Platform::Linux => {}
            Platform::Macos => {
                let outside = |p: &str| {
                    p.starts_with('/')
                        && !under(p, &mac.home)
                        && !mac.prefixes.iter().any(|d| under(p, d))
                };
                let refused = |what: &str, p: &str| {
                    format!(
                        "macOS: the user sandbox refuses {what} {p}: only paths under the home \
                         ({}) and the Homebrew prefix ({}) are each build's own; elsewhere every \
                         build on the Mac would share them",
                        mac.home,
                        mac.prefixes.join(" or ")
                    )
                };
                match op {
                    Op::Workdir(p) if outside(p) => warn(None, refused("the workdir", p)),
                    Op::Copy(c) if outside(&c.dst) => {
                        warn(None, refused("the copy destination", &c.dst))
                    }
                    Op::User(_) => warn(
                        None,
                        "macOS: (user …) is refused: each step runs as its build user \
                         (macUID), whose results are valid for every build user"
                            .into(),
                    ),
                    Op::Run(r) => {
                        for c in &r.cache {
                            if outside(&c.target) {
                                warn(None, refused("the cache target", &c.target));
                            }
                        }
                        if !r.network.iter().any(|n| n == "host") {
                            warn(
                                Some("mac-network"),
                                "macOS: no network isolation: this step and every other one \
                                 has the host's network (say (network host) to make it plain)"
                                    .into(),
                            );
                        }
                        if !r.secrets.is_empty() {
                            warn(
                                Some("mac-secrets"),
                                "macOS: secrets are files in $OBUILDER_SECRETS_DIR, named by \
                                 their target's last component; the target path itself is not \
                                 created"
                                    .into(),
                            );
                        }
                    }
                    _ => {}
                }
            }
            Platform::Freebsd => match op {
                Op::Run(r) if !r.secrets.is_empty() => warn(
                    None,
                    "FreeBSD: the jail sandbox passes no secrets: the step will not find them"
                        .into(),
                ),
                Op::User(User::Unix { uid, gid }) => warn(
                    None,
                    format!(
                    "FreeBSD: the jail runs the step as the user with uid {uid} in the image's \
                     /etc/passwd (it must be there), with that user's groups: gid {gid} is not \
                     applied"
                ),
                ),
                _ => {}
            },
            Platform::Windows => match op {
                Op::Shell(_) => shell_set = true,
                Op::Workdir(p) if p.starts_with('/') => warn(
                    None,
                    format!(
                        "Windows: the workdir {p} is a Unix path; Windows containers take a drive \
                     path such as C:/{}",
                        p.trim_start_matches('/')
                    ),
                ),
                Op::User(User::Unix { .. }) => warn(
                    None,
                    "Windows: containers take a user by name (e.g. (user (name \
                     ContainerAdministrator))), not a uid and gid"
                        .into(),
                ),
                Op::Run(r) => {
                    if !r.secrets.is_empty() {
                        warn(
                            None,
                            "Windows: the Docker sandbox refuses secrets on an engine of \
                             Windows containers (a file of this host cannot be mounted there)"
                                .into(),
                        );
                    }
                    if r.network.iter().any(|n| n == "host") {
                        warn(
                            None,
                            "Windows: containers have no host network: (network host) fails; \
                             name a Docker network (e.g. nat)"
                                .into(),
                        );
                    }
                    if !shell_set {
                        warn(
                            Some("win-shell"),
                            "Windows: a run before any (shell …) runs in cmd /S /C there (the \
                             original's default), in /bin/bash -c elsewhere: set the shell"
                                .into(),
                        );
                    }
                }
                _ => {}
            },
        }
        for (key, message) in found {
            if let Some(key) = key {
                if once.contains(&key) {
                    continue;
                }
                once.push(key);
            }
            out.push(Warning { span, message });
        }
    }
}

/// A path in a Windows container as a path from `C:`, with `/` between names: `C:\\src`
/// and `c:/src` are `/src`, a path without a drive is as it is, and another drive is
/// refused (a container has only `C:`).
pub fn windows_path_on_c(path: &str) -> Result<String, String> {
    let p = path.replace('\\', "/");
    let b = p.as_bytes();
    if b.len() < 2 || b[1] != b':' || !b[0].is_ascii_alphabetic() {
        return Ok(p);
    }
    if !b[0].eq_ignore_ascii_case(&b'c') {
        return Err("a Windows container has the C: drive only".into());
    }
    let rest = &p[2..];
    Ok(if rest.starts_with('/') {
        rest.to_string()
    } else {
        format!("/{rest}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warnings(src: &str, platform: Platform) -> Vec<(u32, String)> {
        let spec = Spec::parse(src).unwrap();
        check(&spec, src, platform, &MacPaths::default())
            .into_iter()
            .map(|w| (w.span.start.line, w.message))
            .collect()
    }

    const SPEC: &str = r#"((build tools
   ((from base)
    (user (uid 1000) (gid 1000))
    (run (shell "make"))))
 (from base)
 ; a comment is no op
 (workdir /Users/mac1000/src)
 (workdir /etc)
 (copy (src .) (dst /srv/app))
 (run (cache (opam (target /Users/mac1000/.opam/download-cache)) (brew (target /var/cache/brew)))
      (secrets (token (target /run/secrets/token)))
      (shell "make"))
 (run (network host) (shell "curl -O x"))
 (user (name builder)))
"#;

    #[test]
    fn linux_has_nothing_to_say() {
        assert!(warnings(SPEC, Platform::Linux).is_empty());
    }

    #[test]
    fn macos_paths_outside_home_and_prefix_users_network_and_secrets() {
        let w = warnings(SPEC, Platform::Macos);
        let lines: Vec<u32> = w.iter().map(|(l, _)| *l).collect();
        // The child stage's (user …) and run first, then the main stage in order.
        assert_eq!(lines, [3, 4, 8, 9, 10, 10, 14], "{w:#?}");
        assert!(w[0].1.contains("(user …) is refused"), "{w:?}");
        assert!(w[1].1.contains("no network isolation"), "{w:?}");
        assert!(w[2].1.contains("refuses the workdir /etc"), "{w:?}");
        assert!(
            w[3].1.contains("refuses the copy destination /srv/app"),
            "{w:?}"
        );
        assert!(
            w[4].1.contains("refuses the cache target /var/cache/brew"),
            "{w:?}"
        );
        assert!(w[5].1.contains("$OBUILDER_SECRETS_DIR"), "{w:?}");
        // The network warning comes once per spec, not per step.
        assert_eq!(w.iter().filter(|(_, m)| m.contains("network")).count(), 1);
    }

    #[test]
    fn freebsd_secrets_and_numeric_users() {
        let w = warnings(SPEC, Platform::Freebsd);
        let lines: Vec<u32> = w.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, [3, 10], "{w:#?}");
        assert!(w[0].1.contains("gid 1000 is not applied"), "{w:?}");
        assert!(w[1].1.contains("passes no secrets"), "{w:?}");
    }

    #[test]
    fn windows_paths_users_host_network_and_the_shell() {
        let w = warnings(SPEC, Platform::Windows);
        let lines: Vec<u32> = w.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, [3, 4, 7, 8, 10, 13], "{w:#?}");
        assert!(w[0].1.contains("not a uid and gid"), "{w:?}");
        assert!(w[1].1.contains("runs in cmd /S /C there"), "{w:?}");
        assert!(w[2].1.contains("C:/Users/mac1000/src"), "{w:?}");
        assert!(w[4].1.contains("refuses secrets"), "{w:?}");
        assert!(w[5].1.contains("no host network"), "{w:?}");
        // With a shell set first, no shell warning.
        let set = "((from base) (shell cmd /S /C) (workdir C:/src) (run (shell \"dir\")))";
        assert!(warnings(set, Platform::Windows).is_empty());
    }

    #[test]
    fn platform_names() {
        assert_eq!("macos".parse::<Platform>(), Ok(Platform::Macos));
        assert!("beos"
            .parse::<Platform>()
            .unwrap_err()
            .contains("linux, macos"));
    }
}
