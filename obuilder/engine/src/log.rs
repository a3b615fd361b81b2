//! Build logs: the user's channel, kept apart from diagnostics (`tracing`).
//!
//! Two levels:
//! * [`LogEvent`]s (heading / note / output) go to the caller's [`LogSink`] as the build
//!   goes: the CLI prints them, a worker streams them.
//! * Each step's output also goes to a file, `log`, inside the step's result (written in
//!   the build dir, renamed with it on success). [`StepLog`] keeps a read-only descriptor
//!   to it from the start, so followers keep reading after the rename (OBuilder #208), and
//!   a second client of the same in-flight step replays it from the start and then follows
//!   it live.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// One event of a build's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// A step starts: `/src: (run (shell "make"))`, `(from busybox)`.
    Heading(String),
    /// The builder's own remarks: `---> saved as "ID"`, `---> using "ID" from cache`.
    Note(String),
    /// Bytes the step's command printed (stdout and stderr merged).
    Output(Vec<u8>),
}

/// Where a build's events go. Called from the builder's tasks; must not block for long.
pub type LogSink = Arc<dyn Fn(&LogEvent) + Send + Sync>;

/// A sink that drops everything.
pub fn null_sink() -> LogSink {
    Arc::new(|_| {})
}

/// A sink that collects the events as text (headings and notes as lines), for tests and
/// for the healthcheck's error report.
pub fn buffer_sink() -> (LogSink, Arc<Mutex<String>>) {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    let sink: LogSink = Arc::new(move |e: &LogEvent| {
        let mut b = b.lock().unwrap_or_else(|p| p.into_inner());
        match e {
            LogEvent::Heading(s) | LogEvent::Note(s) => {
                b.push_str(s);
                b.push('\n');
            }
            LogEvent::Output(o) => b.push_str(&String::from_utf8_lossy(o)),
        }
    });
    (sink, buf)
}

/// The log file of one step, written once and followed by any number of readers.
#[derive(Clone)]
pub struct StepLog {
    inner: Arc<Inner>,
}

struct Inner {
    writer: Mutex<Option<File>>,
    reader: File,
    /// (bytes written so far, finished)
    progress: watch::Sender<(u64, bool)>,
}

impl StepLog {
    /// Creates (truncating) the log file at `path` for writing.
    pub fn create(path: &Path) -> io::Result<StepLog> {
        let writer = File::create(path)?;
        let reader = File::open(path)?;
        let (progress, _) = watch::channel((0, false));
        Ok(StepLog {
            inner: Arc::new(Inner {
                writer: Mutex::new(Some(writer)),
                reader,
                progress,
            }),
        })
    }

    /// Opens a finished log (a cached result's) for replay. A missing file replays as empty.
    pub fn open_finished(path: &Path) -> io::Result<StepLog> {
        let reader = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => File::open("/dev/null")?,
            Err(e) => return Err(e),
        };
        let len = reader.metadata()?.len();
        let (progress, _) = watch::channel((len, true));
        Ok(StepLog {
            inner: Arc::new(Inner {
                writer: Mutex::new(None),
                reader,
                progress,
            }),
        })
    }

    /// Appends bytes and wakes followers.
    pub fn write(&self, data: &[u8]) -> io::Result<()> {
        let mut w = self.inner.writer.lock().unwrap_or_else(|p| p.into_inner());
        let Some(file) = w.as_mut() else {
            return Err(io::Error::other("log already finished"));
        };
        file.write_all(data)?;
        self.inner
            .progress
            .send_modify(|(len, _)| *len += data.len() as u64);
        Ok(())
    }

    /// Marks the log complete (closing the writer); followers stop at its end.
    pub fn finish(&self) {
        let mut w = self.inner.writer.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = w.take() {
            let _ = f.sync_data();
        }
        self.inner.progress.send_modify(|(_, done)| *done = true);
    }

    pub fn is_finished(&self) -> bool {
        self.inner.progress.borrow().1
    }

    /// Calls `f` with the whole log from its start, then with new bytes as they are written,
    /// and returns when the log is finished and fully read.
    pub async fn follow(&self, mut f: impl FnMut(&[u8])) -> io::Result<()> {
        let mut rx = self.inner.progress.subscribe();
        let mut offset = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let (len, done) = *rx.borrow_and_update();
            while offset < len {
                let want = ((len - offset) as usize).min(buf.len());
                let n = self.inner.reader.read_at(&mut buf[..want], offset)?;
                if n == 0 {
                    break;
                }
                f(&buf[..n]);
                offset += n as u64;
            }
            if done && offset >= len {
                return Ok(());
            }
            if rx.changed().await.is_err() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn follower_sees_everything_even_after_rename() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let log = StepLog::create(&path).unwrap();
        log.write(b"one\n").unwrap();
        let l2 = log.clone();
        let follower = tokio::spawn(async move {
            let mut got = Vec::new();
            l2.follow(|b| got.extend_from_slice(b)).await.unwrap();
            got
        });
        tokio::task::yield_now().await;
        std::fs::rename(&path, dir.path().join("moved")).unwrap();
        log.write(b"two\n").unwrap();
        log.finish();
        assert_eq!(follower.await.unwrap(), b"one\ntwo\n");
        let replay = StepLog::open_finished(&dir.path().join("moved")).unwrap();
        let mut got = Vec::new();
        replay.follow(|b| got.extend_from_slice(b)).await.unwrap();
        assert_eq!(got, b"one\ntwo\n");
    }
}
