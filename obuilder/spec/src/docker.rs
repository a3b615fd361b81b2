//! Dockerfile export, as OBuilder's `obuilder dockerfile` does it.
//!
//! Each nested build becomes `FROM IMAGE as NAME` followed by its ops and a blank line; the
//! main stage is `FROM IMAGE`. Without `--buildkit`, caches and secrets are dropped; with
//! it they become `--mount=type=cache|secret,…,uid=UID` options of `RUN`. `network` and
//! `exclude` have no Dockerfile form: they are dropped, each with a `# dropped:` comment.
//! A copy into a directory (`dst` ending in `/`) becomes one `COPY SRC DST/NAME` per
//! source, so that Docker, which copies a directory's contents, makes the tree OBuilder
//! makes (OBuilder's own exporter writes `COPY src DST/`, which differs). With the Windows
//! escape, the file starts with ``#escape=` `` and continuations use a backtick.

use crate::spec::{Base, Copy, DataSource, Mount, Op, Run, Spec, User};

/// The escape character (and platform conventions) of the generated Dockerfile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Escape {
    #[default]
    Unix,
    Windows,
}

impl std::str::FromStr for Escape {
    type Err = String;
    fn from_str(s: &str) -> Result<Escape, String> {
        match s {
            "unix" => Ok(Escape::Unix),
            "windows" => Ok(Escape::Windows),
            _ => Err(format!(
                "unknown escape style {s:?}: expected `unix` or `windows`"
            )),
        }
    }
}

/// Why a spec has no Dockerfile form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DockerfileError {
    #[error("BuildKit mounts need a numeric user, but the current user is `{0}` (at {1})")]
    NamedUserMount(String, String),
}

struct Ctx {
    user: User,
}

fn root_of(escape: Escape) -> User {
    match escape {
        Escape::Unix => User::ROOT,
        Escape::Windows => User::Name("ContainerAdministrator".into()),
    }
}

fn is_root(user: &User) -> bool {
    *user == User::ROOT || *user == User::Name("ContainerAdministrator".into())
}

/// Renders `spec` as a Dockerfile.
pub fn dockerfile(spec: &Spec, buildkit: bool, escape: Escape) -> Result<String, DockerfileError> {
    let mut out = String::new();
    if escape == Escape::Windows {
        out.push_str("#escape=`\n");
    }
    convert(&mut out, None, spec, buildkit, escape)?;
    Ok(out)
}

fn convert(
    out: &mut String,
    name: Option<&str>,
    spec: &Spec,
    buildkit: bool,
    escape: Escape,
) -> Result<(), DockerfileError> {
    for (child_name, child) in &spec.child_builds {
        convert(out, Some(child_name), child, buildkit, escape)?;
        out.push('\n');
    }
    let from = match &spec.from {
        Base::Image(image) => image.as_str(),
        Base::Build(stage) => stage.as_str(),
    };
    out.push_str("FROM ");
    out.push_str(from);
    if let Some(name) = name {
        out.push_str(" as ");
        out.push_str(name);
    }
    out.push('\n');
    let mut ctx = Ctx {
        user: root_of(escape),
    };
    for op in &spec.ops {
        out.push_str(&op_line(&mut ctx, op, buildkit, escape)?);
        out.push('\n');
    }
    Ok(())
}

fn esc_char(escape: Escape) -> char {
    match escape {
        Escape::Unix => '\\',
        Escape::Windows => '`',
    }
}

/// OCaml's `String.trim` blanks.
fn trim_ocaml(s: &str) -> &str {
    s.trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0c'))
}

fn wrap(cmd: &str, escape: Escape) -> String {
    let sep = format!(" {}\n    ", esc_char(escape));
    cmd.split('\n')
        .map(trim_ocaml)
        .collect::<Vec<_>>()
        .join(&sep)
}

/// Puts the escape character before every `"` and every escape character.
fn quote(v: &str, escape: Escape) -> String {
    let e = esc_char(escape);
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if c == '"' || c == e {
            out.push(e);
        }
        out.push(c);
    }
    out
}

fn mount(ctx: &Ctx, kind: &str, m: &Mount, op: &Op) -> Result<String, DockerfileError> {
    let uid = match &ctx.user {
        User::Unix { uid, .. } => *uid,
        User::Name(name) => {
            return Err(DockerfileError::NamedUserMount(
                name.clone(),
                op.to_sexp().to_hum(),
            ))
        }
    };
    let mut parts = vec![
        format!("--mount=type={kind}"),
        format!("id={}", m.id),
        format!("target={}", m.target),
        format!("uid={uid}"),
    ];
    parts.extend(m.buildkit_options.iter().map(|(k, v)| format!("{k}={v}")));
    Ok(parts.join(","))
}

fn op_line(
    ctx: &mut Ctx,
    op: &Op,
    buildkit: bool,
    escape: Escape,
) -> Result<String, DockerfileError> {
    Ok(match op {
        Op::Comment(c) => format!("# {c}"),
        Op::Workdir(d) => format!("WORKDIR {d}"),
        Op::Shell(args) => format!(
            "SHELL [ {} ]",
            args.iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Op::Run(Run {
            cache,
            secrets,
            shell,
            network,
        }) => {
            let mut line = String::new();
            if !network.is_empty() {
                line.push_str(&format!(
                    "# dropped: (network {}) has no Dockerfile form (use `--network` when building)\n",
                    network.join(" ")
                ));
            }
            line.push_str("RUN ");
            if buildkit {
                for s in secrets {
                    line.push_str(&mount(ctx, "secret", s, op)?);
                    line.push(' ');
                }
                for c in cache {
                    line.push_str(&mount(ctx, "cache", c, op)?);
                    line.push(' ');
                }
            }
            line.push_str(&wrap(shell, escape));
            line
        }
        Op::Copy(Copy {
            from,
            src,
            dst,
            exclude,
        }) => {
            let mut opts = String::new();
            if !is_root(&ctx.user) {
                match &ctx.user {
                    User::Unix { uid, gid } => opts.push_str(&format!("--chown={uid}:{gid} ")),
                    User::Name(name) if escape == Escape::Unix => {
                        opts.push_str(&format!("--chown={name} "))
                    }
                    User::Name(_) => {}
                }
            }
            if let DataSource::Build(name) = from {
                opts.push_str(&format!("--from={name} "));
            }
            let mut out = String::new();
            if !exclude.is_empty() {
                out.push_str(&format!(
                    "# dropped: (exclude {}) has no Dockerfile form (use .dockerignore)\n",
                    exclude.join(" ")
                ));
            }
            // OBuilder copies each source *into* a directory destination (a directory
            // lands as DST/NAME); Docker copies a directory's contents. One COPY per
            // source naming DST/NAME gives Docker the same tree, for files and directories.
            let base = |p: &str| {
                p.trim_end_matches('/')
                    .rsplit('/')
                    .next()
                    .unwrap_or("")
                    .to_string()
            };
            let named = dst.ends_with('/')
                && src
                    .iter()
                    .all(|p| !matches!(base(p).as_str(), "" | "." | ".."));
            if named {
                let lines: Vec<String> = src
                    .iter()
                    .map(|p| format!("COPY {opts}{p} {dst}{}", base(p)))
                    .collect();
                out.push_str(&lines.join("\n"));
            } else {
                out.push_str(&format!("COPY {opts}{} {dst}", src.join(" ")));
            }
            out
        }
        Op::User(user) => {
            ctx.user = user.clone();
            match user {
                User::Unix { uid, gid } => format!("USER {uid}:{gid}"),
                User::Name(name) => format!("USER {name}"),
            }
        }
        Op::Env(k, v) => format!("ENV {k}=\"{}\"", quote(v, escape)),
    })
}
