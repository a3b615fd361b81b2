//! Spec errors a person can act on: `file:line:col`, the offending text underlined in its
//! line, what was expected, and a "did you mean" where a near name exists.

use std::fmt;

use crate::sexp::{Pos, Span, SyntaxError};

/// One problem found in a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub pos: Pos,
    /// Byte length of the offending text (the underline).
    pub len: usize,
    pub message: String,
    /// A hint such as "did you mean `run`?".
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn new(span: Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            pos: span.start,
            len: span.end.saturating_sub(span.start.offset).max(1),
            message: message.into(),
            help: None,
        }
    }

    pub fn with_help(mut self, help: Option<String>) -> Diagnostic {
        self.help = help;
        self
    }
}

impl From<SyntaxError> for Diagnostic {
    fn from(e: SyntaxError) -> Diagnostic {
        Diagnostic {
            pos: e.pos,
            len: e.len.max(1),
            message: e.message,
            help: None,
        }
    }
}

/// All the problems found in one spec file, with the text needed to show them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// The name shown before `:line:col` (a path, or `<spec>` for text with no file).
    pub file: String,
    pub source: String,
    pub diagnostics: Vec<Diagnostic>,
}

impl SpecError {
    /// A short one-line summary of the first problem: `file:line:col: message`.
    pub fn first_line(&self) -> String {
        match self.diagnostics.first() {
            Some(d) => format!(
                "{}:{}:{}: {}",
                self.file,
                d.pos.line,
                d.pos.col,
                crate::clip(&d.message, 300)
            ),
            None => format!("{}: invalid spec", self.file),
        }
    }
}

impl std::error::Error for SpecError {}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write_diagnostic(f, &self.file, &self.source, d)?;
        }
        Ok(())
    }
}

/// The most characters of a source line an error shows.
const WINDOW: usize = 120;

fn write_diagnostic(
    f: &mut fmt::Formatter<'_>,
    file: &str,
    source: &str,
    d: &Diagnostic,
) -> fmt::Result {
    writeln!(
        f,
        "{}:{}:{}: error: {}",
        file,
        d.pos.line,
        d.pos.col,
        crate::clip(&d.message, 300)
    )?;
    let line_start = source[..d.pos.offset.min(source.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line_end = source[line_start..]
        .find('\n')
        .map_or(source.len(), |i| line_start + i);
    let line = source[line_start..line_end].trim_end_matches('\r');
    let num = d.pos.line.to_string();
    let pad = " ".repeat(num.len());
    // A long line (a generated spec can hold megabytes on one) is shown as a window
    // around the error.
    let col = d.pos.col.saturating_sub(1) as usize;
    let chars: Vec<char> = line.chars().collect();
    let start = col.saturating_sub(WINDOW / 2).min(chars.len());
    let end = (start + WINDOW).min(chars.len());
    // Tabs would misalign the underline; show them as single spaces.
    let mut shown: String = chars[start..end]
        .iter()
        .map(|c| if *c == '\t' { ' ' } else { *c })
        .collect();
    let mut before = col - start;
    if start > 0 {
        shown.insert_str(0, "… ");
        before += 2;
    }
    if end < chars.len() {
        shown.push_str(" …");
    }
    writeln!(f, "{pad} |")?;
    writeln!(f, "{num} | {shown}")?;
    let avail = line.len().saturating_sub(d.pos.offset - line_start);
    let width = source
        .get(d.pos.offset..d.pos.offset + d.len.min(avail.max(1)))
        .map_or(1, |s| s.chars().count())
        .clamp(1, end.saturating_sub(col).max(1));
    write!(f, "{pad} | {}{}", " ".repeat(before), "^".repeat(width))?;
    if let Some(help) = &d.help {
        write!(f, "\n{pad} = help: {help}")?;
    }
    Ok(())
}

/// Levenshtein distance, for suggestions.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest candidates to `name` (case-insensitive match first, then small edit
/// distance), formatted as "did you mean `x`?" or "did you mean `x` or `y`?".
pub fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let lower = name.to_lowercase();
    let mut scored: Vec<(usize, &str)> = candidates
        .into_iter()
        .filter_map(|c| {
            let d = if c.to_lowercase() == lower {
                0
            } else {
                distance(&lower, &c.to_lowercase())
            };
            let limit = (name.chars().count().max(c.chars().count()) / 3).max(1);
            (d <= limit || c.starts_with(name) && !name.is_empty()).then_some((d, c))
        })
        .collect();
    scored.sort();
    scored.dedup_by(|a, b| a.1 == b.1);
    let names: Vec<String> = scored
        .iter()
        .take(3)
        .map(|(_, c)| format!("`{c}`"))
        .collect();
    match names.len() {
        0 => None,
        1 => Some(format!("did you mean {}?", names[0])),
        _ => Some(format!(
            "did you mean {} or {}?",
            names[..names.len() - 1].join(", "),
            names[names.len() - 1]
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        let ops = ["comment", "workdir", "shell", "run", "copy", "user", "env"];
        assert_eq!(
            did_you_mean("rn", ops).as_deref(),
            Some("did you mean `run`?")
        );
        assert_eq!(
            did_you_mean("RUN", ops).as_deref(),
            Some("did you mean `run`?")
        );
        assert_eq!(
            did_you_mean("wrkdir", ops).as_deref(),
            Some("did you mean `workdir`?")
        );
        assert_eq!(did_you_mean("zzzzzz", ops), None);
        assert_eq!(
            did_you_mean("dev", ["dev1", "dev2"]).as_deref(),
            Some("did you mean `dev1` or `dev2`?")
        );
    }
}
