//! The build-spec AST, its reader (from the lossless S-expression tree, collecting every
//! error with its position) and its conversion back to the S-expression OBuilder prints.
//!
//! The grammar is OBuilder's (reference §1): zero or more `(build NAME SPEC)` stages, then
//! `(from IMAGE)`, then ops. Record-like ops (`run`, `copy`, `user`, `env`) take their
//! fields in any order and write list fields inline (`(src a b)`). The one extension is
//! `(from (build NAME))`, a stage based on another stage; a spec without it reads exactly as
//! OBuilder reads it.

use crate::error::{did_you_mean, Diagnostic, SpecError};
use crate::sexp::{parse_document, Node, Sexp, Span};

/// A build spec: stages built first, a base, then the steps.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Spec {
    /// Nested `(build NAME SPEC)` stages, in order; later ones may copy from earlier ones.
    pub child_builds: Vec<(String, Spec)>,
    pub from: Base,
    pub ops: Vec<Op>,
}

/// What a stage starts from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Base {
    /// `(from IMAGE)`: an image reference (or a local image name).
    Image(String),
    /// `(from (build NAME))`: the result of a stage in scope (extension; OBuilder has none).
    Build(String),
}

/// One operation of a stage.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Op {
    Comment(String),
    Workdir(String),
    Shell(Vec<String>),
    Run(Run),
    Copy(Copy),
    User(User),
    Env(String, String),
}

/// `(run (cache …)? (network …)? (secrets …)? (shell CMD))`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Run {
    pub cache: Vec<Mount>,
    pub network: Vec<String>,
    pub secrets: Vec<Mount>,
    pub shell: String,
}

/// A cache `(NAME (target PATH))` or secret `(ID (target PATH))` entry of a `run`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mount {
    pub id: String,
    pub target: String,
    /// Extra `k=v` options used only by the BuildKit Dockerfile export.
    pub buildkit_options: Vec<(String, String)>,
}

/// Where a `copy` takes its files from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum DataSource {
    #[default]
    Context,
    Build(String),
}

/// `(copy (from …)? (src SRC…) (dst DST) (exclude NAME…)?)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Copy {
    pub from: DataSource,
    pub src: Vec<String>,
    pub dst: String,
    pub exclude: Vec<String>,
}

/// `(user (uid N) (gid N))` or `(user (name NAME))`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum User {
    Unix { uid: u32, gid: u32 },
    Name(String),
}

impl User {
    pub const ROOT: User = User::Unix { uid: 0, gid: 0 };

    /// The name of a `(user (name N))`; none for numeric ids.
    pub fn name(&self) -> Option<&str> {
        match self {
            User::Name(n) => Some(n),
            User::Unix { .. } => None,
        }
    }

    /// The S-expression OBuilder writes (and hashes): `((uid 0)(gid 0))` or `((name X))`.
    pub fn to_sexp(&self) -> Sexp {
        match self {
            User::Unix { uid, gid } => Sexp::list([
                Sexp::field("uid", Sexp::atom(uid.to_string())),
                Sexp::field("gid", Sexp::atom(gid.to_string())),
            ]),
            User::Name(name) => Sexp::list([Sexp::field("name", Sexp::atom(name.clone()))]),
        }
    }
}

pub const OPS: [&str; 7] = ["comment", "workdir", "shell", "run", "copy", "user", "env"];
const RUN_FIELDS: [&str; 4] = ["cache", "network", "secrets", "shell"];
const COPY_FIELDS: [&str; 4] = ["from", "src", "dst", "exclude"];
const MOUNT_FIELDS: [&str; 2] = ["target", "buildkit_options"];

impl Spec {
    /// Reads a spec from text. `file` names it in errors (`file:line:col`).
    pub fn parse_named(file: &str, src: &str) -> Result<Spec, SpecError> {
        parse_with_doc(file, src).map(|(spec, _)| spec)
    }

    /// Reads a spec from text with no file name (errors say `<spec>`).
    pub fn parse(src: &str) -> Result<Spec, SpecError> {
        Spec::parse_named("<spec>", src)
    }

    /// The S-expression OBuilder's `Spec.sexp_of_t` produces.
    pub fn to_sexp(&self) -> Sexp {
        let mut items: Vec<Sexp> = self
            .child_builds
            .iter()
            .map(|(name, spec)| {
                Sexp::list([
                    Sexp::atom("build"),
                    Sexp::atom(name.clone()),
                    spec.to_sexp(),
                ])
            })
            .collect();
        items.push(Sexp::field(
            "from",
            match &self.from {
                Base::Image(image) => Sexp::atom(image.clone()),
                Base::Build(name) => build_ref(name),
            },
        ));
        items.extend(self.ops.iter().map(Op::to_sexp));
        Sexp::List(items)
    }

    /// The canonical machine form: `Sexplib.Sexp.to_string_mach` of [`Spec::to_sexp`].
    pub fn to_mach(&self) -> String {
        self.to_sexp().to_mach()
    }

    /// The pretty form for people (what `obuilder fmt` writes), ending in a newline.
    pub fn to_pretty(&self) -> String {
        crate::layout::pretty_sexp(&self.to_sexp())
    }

    /// Checks that every `(build NAME)` reference names a stage in scope: one defined
    /// earlier at this level or in an enclosing spec. Specs read from text are already
    /// checked; this is for specs built in code.
    pub fn validate(&self) -> Result<(), String> {
        fn go(spec: &Spec, scope: &mut Vec<String>) -> Result<(), String> {
            let depth = scope.len();
            for (name, child) in &spec.child_builds {
                go(child, scope)?;
                scope.push(name.clone());
            }
            let check = |name: &str, what: String| {
                if scope.iter().any(|s| s == name) {
                    Ok(())
                } else {
                    Err(format!("unknown build {name:?} in {what}"))
                }
            };
            if let Base::Build(name) = &spec.from {
                check(name, Sexp::field("from", build_ref(name)).to_hum())?;
            }
            for op in &spec.ops {
                if let Op::Copy(Copy {
                    from: DataSource::Build(name),
                    ..
                }) = op
                {
                    check(name, op.to_sexp().to_hum())?;
                }
            }
            scope.truncate(depth);
            Ok(())
        }
        go(self, &mut Vec::new())
    }
}

fn build_ref(name: &str) -> Sexp {
    Sexp::list([Sexp::atom("build"), Sexp::atom(name)])
}

fn mounts_sexp(name: &str, mounts: &[Mount]) -> Option<Sexp> {
    (!mounts.is_empty()).then(|| {
        let mut items = vec![Sexp::atom(name)];
        items.extend(mounts.iter().map(Mount::to_sexp));
        Sexp::List(items)
    })
}

impl Mount {
    pub fn to_sexp(&self) -> Sexp {
        let mut items = vec![
            Sexp::atom(self.id.clone()),
            Sexp::field("target", Sexp::atom(self.target.clone())),
        ];
        if !self.buildkit_options.is_empty() {
            items.push(Sexp::field(
                "buildkit_options",
                Sexp::list(
                    self.buildkit_options
                        .iter()
                        .map(|(k, v)| Sexp::list([Sexp::atom(k.clone()), Sexp::atom(v.clone())])),
                ),
            ));
        }
        Sexp::List(items)
    }
}

fn atoms(head: &str, values: &[String]) -> Sexp {
    let mut items = vec![Sexp::atom(head)];
    items.extend(values.iter().map(|v| Sexp::atom(v.clone())));
    Sexp::List(items)
}

impl Op {
    /// The S-expression OBuilder's `Spec.sexp_of_op` produces (inline-record form).
    pub fn to_sexp(&self) -> Sexp {
        match self {
            Op::Comment(c) => Sexp::field("comment", Sexp::atom(c.clone())),
            Op::Workdir(d) => Sexp::field("workdir", Sexp::atom(d.clone())),
            Op::Shell(args) => atoms("shell", args),
            Op::Run(run) => {
                let mut items = vec![Sexp::atom("run")];
                items.extend(mounts_sexp("cache", &run.cache));
                if !run.network.is_empty() {
                    items.push(atoms("network", &run.network));
                }
                items.extend(mounts_sexp("secrets", &run.secrets));
                items.push(Sexp::field("shell", Sexp::atom(run.shell.clone())));
                Sexp::List(items)
            }
            Op::Copy(copy) => {
                let mut items = vec![Sexp::atom("copy")];
                if let DataSource::Build(name) = &copy.from {
                    items.push(Sexp::field("from", build_ref(name)));
                }
                items.push(atoms("src", &copy.src));
                items.push(Sexp::field("dst", Sexp::atom(copy.dst.clone())));
                if !copy.exclude.is_empty() {
                    items.push(atoms("exclude", &copy.exclude));
                }
                Sexp::List(items)
            }
            Op::User(user) => {
                let Sexp::List(fields) = user.to_sexp() else {
                    unreachable!()
                };
                let mut items = vec![Sexp::atom("user")];
                items.extend(fields);
                Sexp::List(items)
            }
            Op::Env(k, v) => Sexp::list([
                Sexp::atom("env"),
                Sexp::atom(k.clone()),
                Sexp::atom(v.clone()),
            ]),
        }
    }
}

/// Parses a document and returns the spec with the lossless tree it came from.
/// Where a Dockerfile given by mistake starts (its first instruction, `FROM` or `ARG`,
/// before any `(`): its 1-based line and byte offset.
fn dockerfile_start(src: &str) -> Option<(u32, usize)> {
    let mut offset = 0;
    for (i, line) in src.split('\n').enumerate() {
        let t = line.trim();
        let here = offset;
        offset += line.len() + 1;
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let word = t.split_whitespace().next().unwrap_or("");
        let is_instruction =
            ["FROM", "ARG"].iter().any(|k| word.eq_ignore_ascii_case(k)) && t.len() > word.len();
        return is_instruction.then_some((i as u32 + 1, here));
    }
    None
}

pub(crate) fn parse_with_doc(
    file: &str,
    src: &str,
) -> Result<(Spec, crate::sexp::Document), SpecError> {
    let err = |diagnostics: Vec<Diagnostic>| SpecError {
        file: file.to_string(),
        source: src.to_string(),
        diagnostics,
    };
    if let Some((line, offset)) = dockerfile_start(src) {
        let at = Span {
            start: crate::sexp::Pos {
                line,
                col: 1,
                offset,
            },
            end: offset,
            end_line: line,
        };
        return Err(err(vec![Diagnostic::new(
            at,
            "this looks like a Dockerfile: obuilder reads OBuilder specs, S-expressions such as `((from IMAGE) (run (shell \"make\")))`",
        )
        .with_help(Some(
            "see docs/spec.md for the language; `obuilder dockerfile` goes the other way".into(),
        ))]));
    }
    let doc = parse_document(src).map_err(|e| err(vec![e.into()]))?;
    let data: Vec<&Node> = doc.nodes.iter().filter(|n| !n.is_comment()).collect();
    let mut r = Reader::default();
    let spec = match data.as_slice() {
        [] => {
            let end = Span {
                start: crate::sexp::Pos {
                    line: 1,
                    col: 1,
                    offset: 0,
                },
                end: 0,
                end_line: 1,
            };
            r.error(end, "empty spec: expected `((from IMAGE) OP…)`", None);
            None
        }
        [one, rest @ ..] => {
            for extra in rest {
                r.error(
                    extra.span(),
                    "a spec file holds one S-expression; this is a second one (put every op inside the first list)",
                    None,
                );
            }
            r.spec(one, &mut Vec::new())
        }
    };
    match spec {
        Some(spec) if r.diags.is_empty() => Ok((spec, doc)),
        _ => Err(err(r.diags)),
    }
}

#[derive(Default)]
struct Reader {
    diags: Vec<Diagnostic>,
}

fn head(node: &Node) -> Option<(&str, Span)> {
    match node {
        Node::List { .. } => {
            let data = node.data();
            match data.first() {
                Some(Node::Atom { value, span, .. }) => Some((value.as_str(), *span)),
                _ => None,
            }
        }
        _ => None,
    }
}

impl Reader {
    fn error(&mut self, span: Span, msg: impl Into<String>, help: Option<String>) {
        self.diags.push(Diagnostic::new(span, msg).with_help(help));
    }

    fn spec(&mut self, node: &Node, scope: &mut Vec<String>) -> Option<Spec> {
        let Node::List { span, .. } = node else {
            self.error(
                node.span(),
                format!(
                    "a spec is a list `((from IMAGE) OP…)`, not the atom `{}`",
                    node.atom().unwrap_or("")
                ),
                None,
            );
            return None;
        };
        let items = node.data();
        let depth = scope.len();
        let mut child_builds = Vec::new();
        let mut from = None;
        let mut ops = Vec::new();
        let mut ok = true;
        for item in items {
            let Some((name, name_span)) = head(item) else {
                self.error(item.span(), "expected an operation `(NAME …)`", None);
                ok = false;
                continue;
            };
            match (name, from.is_some()) {
                ("build", false) => match self.build(item, scope) {
                    Some((name, child)) => {
                        scope.push(name.clone());
                        child_builds.push((name, child));
                    }
                    None => ok = false,
                },
                ("build", true) => {
                    self.error(
                        name_span,
                        "`(build NAME SPEC)` stages must come before `(from …)`",
                        None,
                    );
                    ok = false;
                }
                ("from", false) => match self.from(item, scope) {
                    Some(base) => from = Some(base),
                    None => {
                        ok = false;
                        from = Some(Base::Image(String::new()));
                    }
                },
                ("from", true) => {
                    self.error(
                        name_span,
                        "a stage has exactly one `(from …)`; this is a second one",
                        None,
                    );
                    ok = false;
                }
                (_, true) => match self.op(item, name, name_span, scope) {
                    Some(op) => ops.push(op),
                    None => ok = false,
                },
                (_, false) => {
                    if OPS.contains(&name) {
                        self.error(
                            name_span,
                            format!("`{name}` before `(from …)`: only `(build NAME SPEC)` stages may come before the base"),
                            Some("put `(from IMAGE)` first".into()),
                        );
                    } else {
                        let mut all: Vec<&str> = OPS.to_vec();
                        all.extend(["from", "build"]);
                        self.error(
                            name_span,
                            format!("unknown operation `{name}`; expected `(from IMAGE)` or `(build NAME SPEC)` here"),
                            did_you_mean(name, all),
                        );
                    }
                    ok = false;
                }
            }
        }
        scope.truncate(depth);
        let Some(from) = from else {
            self.error(
                Span {
                    start: span.start,
                    end: span.start.offset + 1,
                    end_line: span.start.line,
                },
                "missing `(from IMAGE)`: every stage needs a base",
                None,
            );
            return None;
        };
        ok.then_some(Spec {
            child_builds,
            from,
            ops,
        })
    }

    fn build(&mut self, item: &Node, scope: &mut Vec<String>) -> Option<(String, Spec)> {
        let args = item.data();
        match args.as_slice() {
            [_, Node::Atom { value: name, .. }, child] => {
                let child = self.spec(child, scope)?;
                Some((name.clone(), child))
            }
            _ => {
                self.error(
                    item.span(),
                    "expected `(build NAME ((from IMAGE) OP…))`",
                    None,
                );
                None
            }
        }
    }

    fn from(&mut self, item: &Node, scope: &[String]) -> Option<Base> {
        let args = item.data();
        match args.as_slice() {
            [_, Node::Atom { value, .. }] => Some(Base::Image(value.clone())),
            [_, r @ Node::List { .. }] => {
                let name = self.build_ref(r)?;
                self.check_scope(&name, r.span(), scope)
                    .then_some(Base::Build(name))
            }
            _ => {
                self.error(
                    item.span(),
                    "expected `(from IMAGE)` or `(from (build NAME))`",
                    None,
                );
                None
            }
        }
    }

    /// `(build NAME)` → NAME.
    fn build_ref(&mut self, node: &Node) -> Option<String> {
        let args = node.data();
        match args.as_slice() {
            [Node::Atom { value: b, .. }, Node::Atom { value: name, .. }] if b == "build" => {
                Some(name.clone())
            }
            _ => {
                self.error(node.span(), "expected `(build NAME)`", None);
                None
            }
        }
    }

    fn check_scope(&mut self, name: &str, span: Span, scope: &[String]) -> bool {
        if scope.iter().any(|s| s == name) {
            return true;
        }
        let help = did_you_mean(name, scope.iter().map(String::as_str)).or_else(|| {
            Some(if scope.is_empty() {
                "no stage is in scope here; define `(build NAME SPEC)` before `(from …)`".into()
            } else {
                format!(
                    "stages in scope: {}",
                    scope
                        .iter()
                        .map(|s| format!("`{s}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
        });
        self.error(
            span,
            format!("unknown build `{name}`: no earlier `(build {name} …)` is in scope"),
            help,
        );
        false
    }

    /// The arguments after the head, which must all be atoms.
    fn atom_args(&mut self, item: &Node, what: &str) -> Option<Vec<String>> {
        let mut out = Vec::new();
        let mut ok = true;
        for arg in item.data().into_iter().skip(1) {
            match arg {
                Node::Atom { value, .. } => out.push(value.clone()),
                _ => {
                    self.error(
                        arg.span(),
                        format!(
                            "{what}: expected an atom (a word or a quoted string), found a list"
                        ),
                        None,
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    fn exactly_atoms(&mut self, item: &Node, n: usize, usage: &str) -> Option<Vec<String>> {
        let values = self.atom_args(item, usage)?;
        if values.len() != n {
            self.error(item.span(), format!("expected `{usage}`"), None);
            return None;
        }
        Some(values)
    }

    fn op(&mut self, item: &Node, name: &str, name_span: Span, scope: &[String]) -> Option<Op> {
        match name {
            "comment" => self
                .exactly_atoms(item, 1, "(comment TEXT)")
                .map(|mut v| Op::Comment(v.remove(0))),
            "workdir" => self
                .exactly_atoms(item, 1, "(workdir DIR)")
                .map(|mut v| Op::Workdir(v.remove(0))),
            "shell" => self.atom_args(item, "(shell ARG…)").map(Op::Shell),
            "env" => self
                .exactly_atoms(item, 2, "(env NAME VALUE)")
                .map(|mut v| {
                    let value = v.pop().unwrap_or_default();
                    Op::Env(v.pop().unwrap_or_default(), value)
                }),
            "user" => self.user(item),
            "run" => self.run(item),
            "copy" => self.copy(item, scope),
            _ => {
                let help = did_you_mean(name, OPS);
                self.error(
                    name_span,
                    format!(
                        "unknown operation `{name}`; expected one of {}",
                        OPS.iter()
                            .map(|o| format!("`{o}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    help,
                );
                None
            }
        }
    }

    /// Splits a record-like op into its fields `(name …)`, reporting unknown and duplicate
    /// fields. Returns the fields found, by name.
    fn fields<'n>(
        &mut self,
        item: &'n Node,
        op: &str,
        known: &[&str],
    ) -> Option<Vec<(&'n str, &'n Node)>> {
        let mut out: Vec<(&str, &Node)> = Vec::new();
        let mut ok = true;
        for field in item.data().into_iter().skip(1) {
            let Some((fname, fspan)) = head(field) else {
                self.error(
                    field.span(),
                    format!("{op} takes fields `(NAME …)`: one of {}", list_names(known)),
                    None,
                );
                ok = false;
                continue;
            };
            if !known.contains(&fname) {
                self.error(
                    fspan,
                    format!(
                        "unknown field `{fname}` in {op}; expected one of {}",
                        list_names(known)
                    ),
                    did_you_mean(fname, known.iter().copied()),
                );
                ok = false;
            } else if out.iter().any(|(n, _)| *n == fname) {
                self.error(fspan, format!("duplicate field `{fname}` in {op}"), None);
                ok = false;
            } else {
                out.push((fname, field));
            }
        }
        ok.then_some(out)
    }

    fn missing(&mut self, item: &Node, op: &str, field: &str, usage: &str) {
        let span = head(item).map_or(item.span(), |(_, s)| s);
        self.error(
            span,
            format!("{op} is missing its `{field}` field: expected `{usage}`"),
            None,
        );
    }

    fn run(&mut self, item: &Node) -> Option<Op> {
        let fields = self.fields(item, "`run`", &RUN_FIELDS)?;
        let mut run = Run::default();
        let mut shell = None;
        let mut ok = true;
        for (name, field) in fields {
            match name {
                "shell" => match self.exactly_atoms(field, 1, "(shell COMMAND)") {
                    Some(mut v) => shell = Some(v.remove(0)),
                    None => ok = false,
                },
                "network" => match self.atom_args(field, "(network NAME…)") {
                    Some(v) => run.network = v,
                    None => ok = false,
                },
                "cache" => match self.mounts(field, "cache") {
                    Some(v) => run.cache = v,
                    None => ok = false,
                },
                _ => match self.mounts(field, "secrets") {
                    Some(v) => run.secrets = v,
                    None => ok = false,
                },
            }
        }
        match shell {
            Some(cmd) if ok => {
                run.shell = cmd;
                Some(Op::Run(run))
            }
            Some(_) => None,
            None => {
                self.missing(item, "`run`", "shell", "(run (shell COMMAND))");
                None
            }
        }
    }

    /// `(cache (NAME (target PATH) (buildkit_options ((K V)…))?)…)`, same for secrets.
    fn mounts(&mut self, field: &Node, kind: &str) -> Option<Vec<Mount>> {
        let entry = if kind == "cache" { "NAME" } else { "ID" };
        let usage = format!("({kind} ({entry} (target PATH))…)");
        let mut out = Vec::new();
        let mut ok = true;
        for m in field.data().into_iter().skip(1) {
            let Some((id, _)) = head(m) else {
                self.error(m.span(), format!("expected `{usage}`"), None);
                ok = false;
                continue;
            };
            let what = format!("{kind} entry `{id}`");
            let Some(fields) = self.fields(m, &what, &MOUNT_FIELDS) else {
                ok = false;
                continue;
            };
            let mut target = None;
            let mut buildkit_options = Vec::new();
            for (fname, f) in fields {
                if fname == "target" {
                    target = self
                        .exactly_atoms(f, 1, "(target PATH)")
                        .map(|mut v| v.remove(0));
                    ok &= target.is_some();
                } else {
                    match self.pairs(f) {
                        Some(p) => buildkit_options = p,
                        None => ok = false,
                    }
                }
            }
            match target {
                Some(target) => out.push(Mount {
                    id: id.to_string(),
                    target,
                    buildkit_options,
                }),
                None => {
                    if ok {
                        self.missing(m, &what, "target", &format!("({id} (target PATH))"));
                    }
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    /// `(buildkit_options ((K V)…))`.
    fn pairs(&mut self, field: &Node) -> Option<Vec<(String, String)>> {
        let usage = "(buildkit_options ((KEY VALUE)…))";
        let args = field.data();
        let [_, list @ Node::List { .. }] = args.as_slice() else {
            self.error(field.span(), format!("expected `{usage}`"), None);
            return None;
        };
        let mut out = Vec::new();
        for pair in list.data() {
            match pair.data().as_slice() {
                [Node::Atom { value: k, .. }, Node::Atom { value: v, .. }] => {
                    out.push((k.clone(), v.clone()))
                }
                _ => {
                    self.error(
                        pair.span(),
                        format!("expected a `(KEY VALUE)` pair in `{usage}`"),
                        None,
                    );
                    return None;
                }
            }
        }
        Some(out)
    }

    fn copy(&mut self, item: &Node, scope: &[String]) -> Option<Op> {
        let fields = self.fields(item, "`copy`", &COPY_FIELDS)?;
        let mut from = DataSource::Context;
        let (mut src, mut dst, mut exclude) = (None, None, Vec::new());
        let (mut src_span, mut dst_span) = (item.span(), item.span());
        let mut ok = true;
        for (name, field) in fields {
            match name {
                "from" => {
                    let args = field.data();
                    match args.as_slice() {
                        [_, Node::Atom { value, .. }] if value == "context" => {}
                        [_, r @ Node::List { .. }] => match self.build_ref(r) {
                            Some(n) if self.check_scope(&n, r.span(), scope) => {
                                from = DataSource::Build(n)
                            }
                            _ => ok = false,
                        },
                        _ => {
                            self.error(
                                field.span(),
                                "expected `(from context)` or `(from (build NAME))`",
                                None,
                            );
                            ok = false;
                        }
                    }
                }
                "src" => {
                    src_span = field.span();
                    src = self.atom_args(field, "(src PATH…)");
                    ok &= src.is_some();
                }
                "dst" => {
                    dst_span = field.span();
                    dst = self
                        .exactly_atoms(field, 1, "(dst PATH)")
                        .map(|mut v| v.remove(0));
                    ok &= dst.is_some();
                }
                _ => match self.atom_args(field, "(exclude NAME…)") {
                    Some(v) => exclude = v,
                    None => ok = false,
                },
            }
        }
        let usage = "(copy (src PATH…) (dst PATH))";
        // What the copy would refuse at build time, said now (OBuilder's rules).
        if let (Some(src), Some(dst)) = (&src, &dst) {
            if src.is_empty() {
                self.error(
                    src_span,
                    "`(src)` names no path: a copy needs at least one source",
                    None,
                );
                ok = false;
            }
            for p in src {
                if p.split('/').any(|c| c == "..") {
                    self.error(
                        src_span,
                        format!("source {p:?} uses `..`: a copy reads only inside its context"),
                        None,
                    );
                    ok = false;
                }
            }
            if src.len() > 1 && !dst.ends_with('/') {
                self.error(
                    dst_span,
                    format!(
                        "{} sources are copied into a directory: the destination must end with `/`",
                        src.len()
                    ),
                    Some(format!("write (dst {dst}/)")),
                );
                ok = false;
            }
        }
        match (src, dst) {
            (Some(src), Some(dst)) if ok => Some(Op::Copy(Copy {
                from,
                src,
                dst,
                exclude,
            })),
            (None, _) if ok => {
                self.missing(item, "`copy`", "src", usage);
                None
            }
            (_, None) if ok => {
                self.missing(item, "`copy`", "dst", usage);
                None
            }
            _ => None,
        }
    }

    fn user(&mut self, item: &Node) -> Option<Op> {
        let fields = self.fields(item, "`user`", &["uid", "gid", "name"])?;
        let usage = "(user (uid N) (gid N)) or (user (name NAME))";
        let get = |r: &mut Reader, name: &str| -> Option<Option<String>> {
            match fields.iter().find(|(n, _)| *n == name) {
                None => Some(None),
                Some((_, f)) => r
                    .exactly_atoms(f, 1, &format!("({name} VALUE)"))
                    .map(|mut v| Some(v.remove(0))),
            }
        };
        let uid = get(self, "uid")?;
        let gid = get(self, "gid")?;
        let name = get(self, "name")?;
        let num = |r: &mut Reader, field: &str, v: &str| -> Option<u32> {
            let f = fields
                .iter()
                .find(|(n, _)| *n == field)
                .map(|(_, f)| f.span());
            match v.parse::<u32>() {
                Ok(n) => Some(n),
                Err(_) => {
                    r.error(
                        f.unwrap_or(item.span()),
                        format!("`{field}` must be a number from 0 to 4294967295, not `{v}`"),
                        None,
                    );
                    None
                }
            }
        };
        match (uid, gid, name) {
            (Some(u), Some(g), None) => {
                let uid = num(self, "uid", &u);
                let gid = num(self, "gid", &g);
                Some(Op::User(User::Unix {
                    uid: uid?,
                    gid: gid?,
                }))
            }
            (None, None, Some(n)) => Some(Op::User(User::Name(n))),
            _ => {
                self.error(item.span(), format!("expected `{usage}`"), None);
                None
            }
        }
    }
}

fn list_names(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}
