//! The S-expression dialect of OBuilder specs: Sexplib's, read with source positions.
//!
//! Why hand-written: no crate reads Sexplib's exact dialect (`#| |#` nesting, `#;` datum
//! comments, OCaml string escapes incl. `\ddd`, `\xhh`, backslash-newline continuations and
//! unknown escapes kept literally) *and* keeps positions and comments. The reader builds a
//! lossless tree ([`Node`]): every atom keeps its raw source text and every comment is kept,
//! so the formatter can lay a file out again without losing a byte of meaning. [`Sexp`] is the
//! plain value (what Sexplib would return), and [`Sexp::to_mach`] prints it byte-identically to
//! `Sexplib.Sexp.to_string_mach`, the form OBuilder hashes for its cache keys.

use std::fmt;

/// A position in a source text: 1-based line and column (columns count characters), plus
/// the byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
    pub offset: usize,
}

/// A half-open byte range of a source text with the position of its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    pub start: Pos,
    pub end: usize,
    /// The line of the last character of the range.
    pub end_line: u32,
}

/// A plain S-expression value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Sexp {
    Atom(String),
    List(Vec<Sexp>),
}

impl Sexp {
    pub fn atom(s: impl Into<String>) -> Sexp {
        Sexp::Atom(s.into())
    }

    pub fn list(items: impl IntoIterator<Item = Sexp>) -> Sexp {
        Sexp::List(items.into_iter().collect())
    }

    /// `(name value…)`: a record field as ppx_sexp_conv writes it.
    pub fn field(name: &str, value: Sexp) -> Sexp {
        Sexp::List(vec![Sexp::atom(name), value])
    }

    /// Prints like `Sexplib.Sexp.to_string_mach`: no space except between two bare atoms.
    /// Cache keys are hashes of this text, so it must never change.
    pub fn to_mach(&self) -> String {
        let mut out = String::new();
        self.write_mach(&mut out, false);
        out
    }

    fn write_mach(&self, out: &mut String, may_need_space: bool) -> bool {
        match self {
            Sexp::Atom(s) => {
                if must_escape(s) {
                    out.push_str(&escape_atom(s));
                    false
                } else {
                    if may_need_space {
                        out.push(' ');
                    }
                    out.push_str(s);
                    true
                }
            }
            Sexp::List(items) => {
                out.push('(');
                let mut need = false;
                for item in items {
                    need = item.write_mach(out, need);
                }
                out.push(')');
                false
            }
        }
    }

    /// One-line human form, like `Sexplib.Sexp.to_string_hum` for a short value.
    pub fn to_hum(&self) -> String {
        match self {
            Sexp::Atom(s) => quote_if_needed(s),
            Sexp::List(items) => {
                let inner: Vec<String> = items.iter().map(Sexp::to_hum).collect();
                format!("({})", inner.join(" "))
            }
        }
    }
}

impl fmt::Display for Sexp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hum())
    }
}

/// Whether Sexplib would quote this atom when printing (`Sexplib0.Sexp.must_escape`).
pub fn must_escape(s: &str) -> bool {
    if s.is_empty() {
        return true;
    }
    let b = s.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'"' | b'(' | b')' | b';' | b'\\' => return true,
            0..=32 | 127..=255 => return true,
            b'|' if i > 0 && b[i - 1] == b'#' => return true,
            b'#' if i > 0 && b[i - 1] == b'|' => return true,
            _ => {}
        }
    }
    false
}

/// The quoted form of an atom, with OCaml escapes (`Sexplib0.Sexp.esc_str`).
pub fn escape_atom(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for &c in s.as_bytes() {
        match c {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'\r' => out.push_str("\\r"),
            8 => out.push_str("\\b"),
            b' '..=b'~' => out.push(c as char),
            _ => out.push_str(&format!("\\{c:03}")),
        }
    }
    out.push('"');
    out
}

/// The atom as Sexplib prints it: bare when it can be, quoted otherwise.
pub fn quote_if_needed(s: &str) -> String {
    if must_escape(s) {
        escape_atom(s)
    } else {
        s.to_string()
    }
}

/// A node of the lossless tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// An atom: its value, its source text (quotes and escapes as written) and where it is.
    Atom {
        value: String,
        raw: String,
        span: Span,
    },
    /// A list and its children (comments included), spanning `(` to `)`.
    List { items: Vec<Node>, span: Span },
    /// `; …` to the end of the line (without the newline), `#| … |#`, or `#;` with the datum
    /// it comments out, all as raw source text. `own_line` is false when the comment follows
    /// other text on its line.
    Comment {
        raw: String,
        span: Span,
        own_line: bool,
    },
}

impl Node {
    pub fn span(&self) -> Span {
        match self {
            Node::Atom { span, .. } | Node::List { span, .. } | Node::Comment { span, .. } => *span,
        }
    }

    pub fn is_comment(&self) -> bool {
        matches!(self, Node::Comment { .. })
    }

    /// The plain value, comments dropped. `None` for a comment.
    pub fn to_sexp(&self) -> Option<Sexp> {
        match self {
            Node::Atom { value, .. } => Some(Sexp::Atom(value.clone())),
            Node::List { items, .. } => {
                Some(Sexp::List(items.iter().filter_map(Node::to_sexp).collect()))
            }
            Node::Comment { .. } => None,
        }
    }

    /// The children that are data (not comments), for a list.
    pub fn data(&self) -> Vec<&Node> {
        match self {
            Node::List { items, .. } => items.iter().filter(|n| !n.is_comment()).collect(),
            _ => Vec::new(),
        }
    }

    pub fn atom(&self) -> Option<&str> {
        match self {
            Node::Atom { value, .. } => Some(value),
            _ => None,
        }
    }
}

/// A lexical error: where, and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub pos: Pos,
    /// The byte length of the offending text (at least 1 for display).
    pub len: usize,
    pub message: String,
}

/// A whole document: the top-level nodes (data and comments) in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub nodes: Vec<Node>,
    /// True when the last character of the source is a newline.
    pub trailing_newline: bool,
}

/// Reads a whole text into its top-level nodes. Never panics; the first lexical error stops.
pub fn parse_document(src: &str) -> Result<Document, SyntaxError> {
    let mut r = Reader {
        src,
        bytes: src.as_bytes(),
        i: 0,
        line: 1,
        line_start: 0,
        last_token_line: 0,
    };
    let mut nodes = Vec::new();
    loop {
        r.skip_blank();
        if r.i >= r.bytes.len() {
            break;
        }
        if r.peek() == Some(b')') {
            return Err(r.error_here(1, "unexpected `)` with no matching `(`"));
        }
        nodes.push(r.node(0)?);
    }
    Ok(Document {
        nodes,
        trailing_newline: src.ends_with('\n'),
    })
}

/// Nesting deeper than this is refused rather than risking the stack.
pub const MAX_DEPTH: usize = 200;

struct Reader<'a> {
    src: &'a str,
    bytes: &'a [u8],
    i: usize,
    line: u32,
    line_start: usize,
    /// The line on which the last token (atom, paren, comment) ended.
    last_token_line: u32,
}

fn is_blank(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0c)
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.i).copied()
    }

    fn peek2(&self) -> Option<u8> {
        self.bytes.get(self.i + 1).copied()
    }

    fn pos(&self) -> Pos {
        self.pos_at(self.i)
    }

    fn pos_at(&self, offset: usize) -> Pos {
        // Only called for offsets on the current line or earlier tokens whose line we know
        // is current; compute the column by counting characters from the line start.
        let col = self.src[self.line_start..offset].chars().count() as u32 + 1;
        Pos {
            line: self.line,
            col,
            offset,
        }
    }

    fn error_here(&self, len: usize, msg: impl Into<String>) -> SyntaxError {
        SyntaxError {
            pos: self.pos(),
            len,
            message: msg.into(),
        }
    }

    /// Advances one byte, keeping line accounting.
    fn bump(&mut self) {
        if self.bytes[self.i] == b'\n' {
            self.line += 1;
            self.line_start = self.i + 1;
        }
        self.i += 1;
    }

    fn skip_blank(&mut self) {
        while let Some(c) = self.peek() {
            if is_blank(c) {
                self.bump();
            } else {
                break;
            }
        }
    }

    fn node(&mut self, depth: usize) -> Result<Node, SyntaxError> {
        if depth > MAX_DEPTH {
            return Err(self.error_here(1, format!("nesting deeper than {MAX_DEPTH} levels")));
        }
        let own_line = self.last_token_line != self.line;
        let start = self.pos();
        let c = self.peek().expect("node() called at end of input");
        let node = match c {
            b'(' => {
                self.bump();
                self.last_token_line = self.line;
                let mut items = Vec::new();
                loop {
                    self.skip_blank();
                    match self.peek() {
                        None => {
                            return Err(SyntaxError {
                                pos: start,
                                len: 1,
                                message: "unclosed `(`: the file ends before its `)`".into(),
                            })
                        }
                        Some(b')') => {
                            self.bump();
                            break;
                        }
                        Some(_) => items.push(self.node(depth + 1)?),
                    }
                }
                Node::List {
                    items,
                    span: Span {
                        start,
                        end: self.i,
                        end_line: self.line,
                    },
                }
            }
            b')' => return Err(self.error_here(1, "unexpected `)`")),
            b';' => {
                while let Some(c) = self.peek() {
                    if c == b'\n' || c == b'\r' {
                        break;
                    }
                    self.bump();
                }
                Node::Comment {
                    raw: self.src[start.offset..self.i].to_string(),
                    span: Span {
                        start,
                        end: self.i,
                        end_line: self.line,
                    },
                    own_line,
                }
            }
            b'"' => {
                let value = self.string()?;
                Node::Atom {
                    value,
                    raw: self.src[start.offset..self.i].to_string(),
                    span: Span {
                        start,
                        end: self.i,
                        end_line: self.line,
                    },
                }
            }
            b'#' if self.peek2() == Some(b'|') => {
                self.block_comment()?;
                Node::Comment {
                    raw: self.src[start.offset..self.i].to_string(),
                    span: Span {
                        start,
                        end: self.i,
                        end_line: self.line,
                    },
                    own_line,
                }
            }
            b'#' if self.peek2() == Some(b';') => {
                self.bump();
                self.bump();
                // The commented-out datum; comments between `#;` and it are skipped too.
                loop {
                    self.skip_blank();
                    match self.peek() {
                        None => return Err(SyntaxError {
                            pos: start,
                            len: 2,
                            message: "`#;` comments out the next S-expression, but the file ends first"
                                .into(),
                        }),
                        Some(b')') => return Err(SyntaxError {
                            pos: start,
                            len: 2,
                            message: "`#;` comments out the next S-expression, but none follows before `)`"
                                .into(),
                        }),
                        Some(_) => {
                            if !self.node(depth + 1)?.is_comment() {
                                break;
                            }
                        }
                    }
                }
                Node::Comment {
                    raw: self.src[start.offset..self.i].to_string(),
                    span: Span {
                        start,
                        end: self.i,
                        end_line: self.line,
                    },
                    own_line,
                }
            }
            b'|' if self.peek2() == Some(b'#') => {
                return Err(self.error_here(2, "`|#` closes a block comment that was never opened"))
            }
            _ => {
                while let Some(c) = self.peek() {
                    if is_blank(c) || matches!(c, b'(' | b')' | b'"' | b';') {
                        break;
                    }
                    let two = (c, self.peek2());
                    if self.i > start.offset
                        && matches!(two, (b'#', Some(b'|')) | (b'|', Some(b'#')))
                    {
                        return Err(self.error_here(
                            2,
                            "comment marker inside an atom (quote the atom if this is meant as text)",
                        ));
                    }
                    self.bump();
                }
                let raw = self.src[start.offset..self.i].to_string();
                Node::Atom {
                    value: raw.clone(),
                    raw,
                    span: Span {
                        start,
                        end: self.i,
                        end_line: self.line,
                    },
                }
            }
        };
        self.last_token_line = self.line;
        Ok(node)
    }

    /// Reads a quoted string starting at `"`, applying OCaml escapes; returns its value.
    fn string(&mut self) -> Result<String, SyntaxError> {
        let start = self.pos();
        self.bump();
        let mut out: Vec<u8> = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(SyntaxError {
                    pos: start,
                    len: 1,
                    message: "unterminated string: the file ends before its closing `\"`".into(),
                });
            };
            match c {
                b'"' => {
                    self.bump();
                    break;
                }
                b'\\' => {
                    let esc_pos = self.pos();
                    self.bump();
                    match self.peek() {
                        None => continue, // reported as unterminated on the next turn
                        Some(b'\n') => {
                            self.bump();
                            self.skip_spaces_tabs();
                        }
                        Some(b'\r') if self.peek2() == Some(b'\n') => {
                            self.bump();
                            self.bump();
                            self.skip_spaces_tabs();
                        }
                        Some(e @ (b'\\' | b'\'' | b'"')) => {
                            out.push(e);
                            self.bump();
                        }
                        Some(b'n') => {
                            out.push(b'\n');
                            self.bump();
                        }
                        Some(b't') => {
                            out.push(b'\t');
                            self.bump();
                        }
                        Some(b'b') => {
                            out.push(8);
                            self.bump();
                        }
                        Some(b'r') => {
                            out.push(b'\r');
                            self.bump();
                        }
                        Some(d) if d.is_ascii_digit() => {
                            let digits = &self.bytes[self.i..];
                            if digits.len() >= 3 && digits[..3].iter().all(u8::is_ascii_digit) {
                                let v = (digits[0] - b'0') as u32 * 100
                                    + (digits[1] - b'0') as u32 * 10
                                    + (digits[2] - b'0') as u32;
                                if v > 255 {
                                    return Err(SyntaxError {
                                        pos: esc_pos,
                                        len: 4,
                                        message: format!(
                                            "illegal escape `\\{}` in string: decimal escapes go up to \\255",
                                            &self.src[self.i..self.i + 3]
                                        ),
                                    });
                                }
                                out.push(v as u8);
                                for _ in 0..3 {
                                    self.bump();
                                }
                            } else {
                                // As Sexplib: a decimal escape is exactly three digits.
                                let n = digits
                                    .iter()
                                    .take(3)
                                    .take_while(|c| c.is_ascii_digit())
                                    .count();
                                return Err(SyntaxError {
                                    pos: esc_pos,
                                    len: 1 + n,
                                    message: "unterminated decimal escape sequence: `\\` and a digit start `\\ddd`, exactly three digits (write `\\\\` for a backslash)".into(),
                                });
                            }
                        }
                        Some(b'x') => {
                            let hex = &self.bytes[self.i + 1..];
                            if hex.len() >= 2
                                && hex[0].is_ascii_hexdigit()
                                && hex[1].is_ascii_hexdigit()
                            {
                                let h = &self.src[self.i + 1..self.i + 3];
                                out.push(u8::from_str_radix(h, 16).unwrap_or(0));
                                for _ in 0..3 {
                                    self.bump();
                                }
                            } else {
                                // As Sexplib: `\x` must be followed by two hex digits.
                                return Err(SyntaxError {
                                    pos: esc_pos,
                                    len: 2,
                                    message: "unterminated hexadecimal escape sequence: `\\x` must be followed by two hex digits (write `\\\\x` for a backslash and an x)".into(),
                                });
                            }
                        }
                        Some(_) => {
                            // Unknown escape (`\o`, and `\ ` too): kept literally, as
                            // Sexplib does (`"mkdir C:\obuilder"` reads as written).
                            out.push(b'\\');
                        }
                    }
                }
                _ => {
                    out.push(c);
                    self.bump();
                }
            }
        }
        // Escapes can make invalid UTF-8 (`\255`); keep the bytes losslessly as Latin-1-ish
        // replacement would change meaning, so refuse clearly instead.
        String::from_utf8(out).map_err(|_| SyntaxError {
            pos: start,
            len: 1,
            message: "string escapes produce bytes that are not UTF-8 text; specs must be UTF-8"
                .into(),
        })
    }

    fn skip_spaces_tabs(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.bump();
        }
    }

    /// Skips a (nestable) `#| … |#` comment; strings inside it are skipped as strings.
    fn block_comment(&mut self) -> Result<(), SyntaxError> {
        let mut opens = vec![self.pos()];
        self.bump();
        self.bump();
        while !opens.is_empty() {
            match (self.peek(), self.peek2()) {
                (None, _) => {
                    return Err(SyntaxError {
                        pos: *opens.last().unwrap_or(&Pos::default()),
                        len: 2,
                        message: "unterminated block comment: no `|#` closes this `#|`".into(),
                    })
                }
                (Some(b'#'), Some(b'|')) => {
                    opens.push(self.pos());
                    self.bump();
                    self.bump();
                }
                (Some(b'|'), Some(b'#')) => {
                    opens.pop();
                    self.bump();
                    self.bump();
                }
                (Some(b'"'), _) => {
                    self.string()?;
                }
                _ => self.bump(),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(src: &str) -> Vec<Sexp> {
        parse_document(src)
            .unwrap()
            .nodes
            .iter()
            .filter_map(Node::to_sexp)
            .collect()
    }

    fn one(src: &str) -> Sexp {
        let mut v = values(src);
        assert_eq!(v.len(), 1, "{src:?}");
        v.remove(0)
    }

    #[test]
    fn mach_printer_matches_sexplib() {
        let s = Sexp::list([
            Sexp::field("base", Sexp::atom("abc")),
            Sexp::field("cmd", Sexp::atom("echo hi")),
            Sexp::field(
                "shell",
                Sexp::list([Sexp::atom("/bin/sh"), Sexp::atom("-c")]),
            ),
            Sexp::field("network", Sexp::list([])),
        ]);
        assert_eq!(
            s.to_mach(),
            r#"((base abc)(cmd"echo hi")(shell(/bin/sh -c))(network()))"#
        );
        assert_eq!(Sexp::atom("").to_mach(), "\"\"");
        assert_eq!(Sexp::atom("a#|b").to_mach(), "\"a#|b\"");
        assert_eq!(Sexp::atom("a|#b").to_mach(), "\"a|#b\"");
        assert_eq!(Sexp::atom("#a|").to_mach(), "#a|");
        assert_eq!(Sexp::atom("é").to_mach(), "\"\\195\\169\"");
        assert_eq!(Sexp::atom("\u{8}\x7f").to_mach(), "\"\\b\\127\"");
    }

    #[test]
    fn string_escapes_follow_ocaml() {
        assert_eq!(
            one(r#""a\"b\\c\n\t\r\b\'""#),
            Sexp::atom("a\"b\\c\n\t\r\u{8}'")
        );
        // Backslash-space is no escape in Sexplib: both characters stay.
        assert_eq!(one(r#""a\ b""#), Sexp::atom(r"a\ b"));
        assert_eq!(one(r#""\065\x42""#), Sexp::atom("AB"));
        assert_eq!(
            one(r#""mkdir C:\obuilder""#),
            Sexp::atom(r"mkdir C:\obuilder")
        );
        assert_eq!(one(r#""\o""#), Sexp::atom(r"\o"));
        for (bad, why) in [
            (r#""\12x""#, "unterminated decimal escape sequence"),
            (r#""\9""#, "unterminated decimal escape sequence"),
            (r#""\xZZ""#, "unterminated hexadecimal escape sequence"),
            (r#""\x4""#, "unterminated hexadecimal escape sequence"),
        ] {
            let e = parse_document(bad).unwrap_err();
            assert!(e.message.starts_with(why), "{bad}: {}", e.message);
            assert_eq!((e.pos.line, e.pos.col), (1, 2), "{bad}: at the backslash");
        }
        assert_eq!(
            one("\"cd ~/x \\\n     && make\""),
            Sexp::atom("cd ~/x && make")
        );
        assert_eq!(one("\"a\\\r\n  b\""), Sexp::atom("ab"));
        assert_eq!(one("\"two\nlines\""), Sexp::atom("two\nlines"));
    }

    #[test]
    fn comments_of_all_three_kinds() {
        let src = "; head\n(a #| block #| nested |# \"|#\" |# b #; (c d) e) ; tail\n";
        assert_eq!(
            values(src),
            vec![Sexp::list([
                Sexp::atom("a"),
                Sexp::atom("b"),
                Sexp::atom("e")
            ])]
        );
        assert_eq!(values("#; #; a b c"), vec![Sexp::atom("c")]);
    }

    #[test]
    fn bare_atoms_take_everything_but_delimiters() {
        assert_eq!(
            one("(C:\\src /usr/local/bin/ -O2 x@sha256:ab .git # |)"),
            Sexp::list(
                [
                    "C:\\src",
                    "/usr/local/bin/",
                    "-O2",
                    "x@sha256:ab",
                    ".git",
                    "#",
                    "|"
                ]
                .map(Sexp::atom)
            )
        );
    }

    #[test]
    fn lexical_errors_have_positions() {
        let e = parse_document("(a\n  \"open").unwrap_err();
        assert_eq!((e.pos.line, e.pos.col), (2, 3));
        assert!(e.message.contains("unterminated string"));
        let e = parse_document("(a #| x").unwrap_err();
        assert_eq!((e.pos.line, e.pos.col), (1, 4));
        let e = parse_document("  (a\n (b)").unwrap_err();
        assert_eq!((e.pos.line, e.pos.col), (1, 3));
        assert!(e.message.contains("unclosed"));
        let e = parse_document("a)").unwrap_err();
        assert_eq!((e.pos.line, e.pos.col), (1, 2));
        let e = parse_document("(\"\\256\")").unwrap_err();
        assert!(e.message.contains("\\255"), "{}", e.message);
        assert!(parse_document("ab|#c").is_err());
        assert!(parse_document(&"(".repeat(10_000)).is_err());
    }

    #[test]
    fn columns_count_characters() {
        let doc = parse_document("(é x)").unwrap();
        let Node::List { items, .. } = &doc.nodes[0] else {
            panic!()
        };
        assert_eq!(items[1].span().start.col, 4);
    }
}
