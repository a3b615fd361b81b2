//! `.cap` files: a sturdy ref's URI and one newline, mode 0600 (the secret in it is the
//! authority). Read with surrounding whitespace trimmed, as the original does.

use std::io::Write;
use std::path::Path;

use crate::uri::SturdyRef;

#[derive(Debug, thiserror::Error)]
pub enum CapFileError {
    #[error("cannot read the cap file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a cap file: {reason}")]
    Parse { path: String, reason: String },
    #[error("cannot write the cap file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

pub fn read(path: &Path) -> Result<SturdyRef, CapFileError> {
    let name = path.display().to_string();
    let text = std::fs::read(path).map_err(|source| CapFileError::Read {
        path: name.clone(),
        source,
    })?;
    let text = String::from_utf8(text).map_err(|_| CapFileError::Parse {
        path: name.clone(),
        reason: "it is not text".into(),
    })?;
    text.trim()
        .parse()
        .map_err(|e: crate::uri::UriError| CapFileError::Parse {
            path: name,
            reason: e.0,
        })
}

/// Writes `path` atomically (a temporary file renamed over it), mode 0600.
pub fn write(path: &Path, uri: &SturdyRef) -> Result<(), CapFileError> {
    let name = path.display().to_string();
    let err = |source| CapFileError::Write {
        path: name.clone(),
        source,
    };
    let tmp = path.with_extension(format!("cap.tmp{}", std::process::id()));
    let r = (|| {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        writeln!(f, "{uri}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.map_err(err)
}
