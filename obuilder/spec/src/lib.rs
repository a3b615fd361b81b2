//! OBuilder build specs: read, check, print and export them.
//!
//! A leaf crate with no I/O, shared by the engine, the CLI and the cluster client.
//!
//! * [`Spec::parse_named`] reads OBuilder's S-expression format (Sexplib's dialect) and
//!   returns every problem with `file:line:col`, the offending text and a "did you mean".
//! * [`Spec::to_mach`] prints the canonical machine form, byte-identical to OBuilder's
//!   `Sexplib.Sexp.to_string_mach`; [`sexp::Sexp`] is also what cache keys are built from.
//! * [`Spec::to_pretty`] and [`format_source`] give the form for people (`obuilder fmt`);
//!   the latter keeps comments.
//! * [`docker::dockerfile`] exports a Dockerfile as `obuilder dockerfile` does.

pub mod docker;
pub mod error;
pub mod layout;
pub mod portability;
pub mod sexp;
mod spec;

pub use error::{Diagnostic, SpecError};
pub use sexp::Sexp;
pub use spec::{Base, Copy, DataSource, Mount, Op, Run, Spec, User, OPS};

/// A spec file's bytes as text: a file that is not UTF-8 is an error at its first bad
/// byte (`file:line:col`), as any other spec error.
pub fn decode(file: &str, bytes: Vec<u8>) -> Result<String, SpecError> {
    String::from_utf8(bytes).map_err(|e| {
        let bytes = e.as_bytes();
        let at = e.utf8_error().valid_up_to();
        // The valid prefix is text: count lines and characters in it.
        let prefix = std::str::from_utf8(&bytes[..at]).unwrap_or_default();
        let line = prefix.matches('\n').count() + 1;
        let line_start = prefix.rfind('\n').map_or(0, |i| i + 1);
        let col = prefix[line_start..].chars().count() + 1;
        // The source shown is the valid text around it, the bad bytes replaced.
        let shown = String::from_utf8_lossy(bytes).into_owned();
        let offset = shown
            .char_indices()
            .nth(prefix.chars().count())
            .map_or(shown.len(), |(i, _)| i);
        SpecError {
            file: file.to_string(),
            source: shown,
            diagnostics: vec![Diagnostic {
                pos: sexp::Pos {
                    line: line as u32,
                    col: col as u32,
                    offset,
                },
                len: 1,
                message: format!(
                    "the spec is not UTF-8 text: byte {:#04x} here cannot start a character",
                    bytes[at]
                ),
                help: Some("save the spec as UTF-8".into()),
            }],
        }
    })
}

/// `text` cut to at most `max` characters for a message, with what was left out counted:
/// errors quote specs and commands, which can be megabytes long.
pub fn clip(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(max) {
        None => std::borrow::Cow::Borrowed(text),
        Some((end, _)) => std::borrow::Cow::Owned(format!(
            "{}… ({} more bytes)",
            &text[..end],
            text.len() - end
        )),
    }
}

/// Formats a spec file's text for people, keeping its comments and atoms as written.
///
/// The spec must be valid (its errors are returned otherwise). The result is checked to read
/// back as the very same spec before it is returned, so formatting can never change meaning.
pub fn format_source(file: &str, src: &str) -> Result<String, SpecError> {
    let (spec, doc) = spec::parse_with_doc(file, src)?;
    let formatted = layout::format_document(&doc);
    match Spec::parse_named(file, &formatted) {
        Ok(again) if again == spec => Ok(formatted),
        _ => Err(SpecError {
            file: file.to_string(),
            source: src.to_string(),
            diagnostics: vec![Diagnostic {
                pos: sexp::Pos {
                    line: 1,
                    col: 1,
                    offset: 0,
                },
                len: 1,
                message:
                    "internal error: the formatted text would not read back as the same spec; \
                          the file was left as it is (please report this)"
                        .into(),
                help: None,
            }],
        }),
    }
}
