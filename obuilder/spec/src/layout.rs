//! The pretty form for people, and the comment-preserving formatter behind `obuilder fmt`.
//!
//! One layout engine serves both: it lays out the lossless tree ([`Node`]), so a file keeps
//! every comment and every atom exactly as written (quotes, escapes, continuations); the AST
//! printer builds such a tree from a [`Sexp`] first. Layout rules, in the style of OBuilder's
//! README examples:
//!
//! * a spec is a vertical list: `((from …)` then one item per line, indented by one;
//! * `(build NAME` puts its spec on the next line, indented by one more than `(build`;
//! * `(run …)` with more than one field puts each field on its own line, aligned;
//! * any other list stays on one line if it fits in [`WIDTH`] columns and holds no comment,
//!   and otherwise puts its head and first argument on the first line and the rest aligned
//!   under that argument;
//! * a comment that followed other text on its line stays there; one on its own line stays on
//!   its own line; a single blank line between items is kept, longer runs become one.

use crate::sexp::{quote_if_needed, Document, Node, Sexp, Span};

/// The line width the formatter aims for.
pub const WIDTH: usize = 100;

/// The pretty form of an S-expression spec (no comments), ending in a newline.
pub fn pretty_sexp(s: &Sexp) -> String {
    let node = node_of_sexp(s);
    let mut out = Out::default();
    write_node(&mut out, &node, Kind::Spec);
    out.s.push('\n');
    out.s
}

/// Lays out a whole document, comments included, ending in a newline.
pub fn format_document(doc: &Document) -> String {
    let mut out = Out::default();
    let mut prev: Option<&Node> = None;
    let mut first_data = true;
    for node in &doc.nodes {
        if let Some(p) = prev {
            separate(&mut out, p, node, 0, false);
        }
        let kind = if !node.is_comment() && first_data {
            first_data = false;
            Kind::Spec
        } else {
            Kind::Other
        };
        write_node(&mut out, node, kind);
        prev = Some(node);
    }
    out.s.push('\n');
    out.s
}

fn node_of_sexp(s: &Sexp) -> Node {
    let span = Span::default();
    match s {
        Sexp::Atom(a) => Node::Atom {
            value: a.clone(),
            raw: quote_if_needed(a),
            span,
        },
        Sexp::List(items) => Node::List {
            items: items.iter().map(node_of_sexp).collect(),
            span,
        },
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A spec: `((from …) OP…)`, always vertical.
    Spec,
    Other,
}

#[derive(Default)]
struct Out {
    s: String,
}

impl Out {
    fn col(&self) -> usize {
        let line = match self.s.rfind('\n') {
            Some(i) => &self.s[i + 1..],
            None => &self.s[..],
        };
        line.chars().count()
    }

    fn newline(&mut self, indent: usize) {
        // No trailing spaces on the line being ended.
        let trimmed = self.s.trim_end_matches(' ').len();
        self.s.truncate(trimmed);
        self.s.push('\n');
        self.s.extend(std::iter::repeat_n(' ', indent));
    }
}

/// The one-line form of a node, if it has one (no comments inside).
fn flat(node: &Node) -> Option<String> {
    match node {
        Node::Atom { raw, .. } => Some(raw.clone()),
        Node::Comment { .. } => None,
        Node::List { items, .. } => {
            let parts: Option<Vec<String>> = items.iter().map(flat).collect();
            Some(format!("({})", parts?.join(" ")))
        }
    }
}

fn width(s: &str) -> usize {
    s.lines().map(|l| l.chars().count()).max().unwrap_or(0)
}

fn head_atom(items: &[Node]) -> Option<&str> {
    match items.iter().find(|n| !n.is_comment()) {
        Some(Node::Atom { value, .. }) => Some(value),
        _ => None,
    }
}

/// Writes what goes between two neighbouring items: a trailing comment stays on the line;
/// after a comment, or in vertical layouts, a newline (keeping one blank line if the source
/// had one).
fn separate(out: &mut Out, prev: &Node, next: &Node, indent: usize, inline: bool) {
    match next {
        Node::Comment {
            own_line: false, ..
        } if !ends_line(prev) => out.s.push(' '),
        _ if inline && !ends_line(prev) && !next.is_comment() => out.s.push(' '),
        _ => {
            if blank_between(prev.span(), next.span()) {
                out.newline(0);
            }
            out.newline(indent);
        }
    }
}

/// A `;` comment runs to the end of its line, so nothing may follow it there.
fn ends_line(node: &Node) -> bool {
    matches!(node, Node::Comment { raw, .. } if raw.starts_with(';'))
}

fn blank_between(prev: Span, next: Span) -> bool {
    prev.end_line != 0 && next.start.line > prev.end_line + 1
}

fn write_node(out: &mut Out, node: &Node, kind: Kind) {
    let items = match node {
        Node::Atom { raw, .. } | Node::Comment { raw, .. } => {
            out.s.push_str(raw);
            return;
        }
        Node::List { items, .. } => items,
    };
    let indent = out.col();
    let data: Vec<&Node> = items.iter().filter(|n| !n.is_comment()).collect();
    let head = head_atom(items);
    let is_build = kind == Kind::Other
        && head == Some("build")
        && data.len() == 3
        && matches!(data[1], Node::Atom { .. })
        && matches!(data[2], Node::List { .. });
    let is_multi_run = head == Some("run") && data.len() > 2;

    // (joined, continuation column): how many leading data items share the first line, and
    // where the following lines start.
    let (joined, cont) = if kind == Kind::Spec {
        (1, indent + 1)
    } else if is_build {
        (2, indent + 1)
    } else {
        if !is_multi_run {
            if let Some(f) = flat(node) {
                // Breaking a list of one or two items gains no width.
                if indent + width(&f) <= WIDTH || data.len() <= 2 {
                    out.s.push_str(&f);
                    return;
                }
            }
        }
        match (head, data.get(1)) {
            (Some(h), Some(_)) => (2, indent + 1 + quote_if_needed(h).chars().count() + 1),
            _ => (1, indent + 1),
        }
    };

    out.s.push('(');
    let mut data_seen = 0;
    let mut prev: Option<&Node> = None;
    for item in items {
        if let Some(p) = prev {
            let inline = !item.is_comment() && data_seen < joined;
            separate(out, p, item, cont, inline);
        }
        let child_kind = if is_build && data_seen == 2 && !item.is_comment() {
            Kind::Spec
        } else {
            Kind::Other
        };
        write_node(out, item, child_kind);
        if !item.is_comment() {
            data_seen += 1;
        }
        prev = Some(item);
    }
    if prev.is_some_and(ends_line) {
        out.newline(indent);
    }
    out.s.push(')');
}
