//! Build logs: the user's channel, kept apart from diagnostics (`tracing`).
//!
//! Two levels:
//! * [`LogEvent`]s (heading / note / output) go to the caller's [`LogSink`] as the build
//!   goes: the CLI prints them, a worker streams them (they are serde-serialisable).
//! * Each step's output also goes to a file, `log`, inside the step's result (written in
//!   the build dir, renamed with it on success). [`StepLog`] keeps a read-only descriptor
//!   to it from the start, so followers keep reading after the rename (OBuilder #208), and
//!   a second client of the same in-flight step replays it from the start and then follows
//!   it live.
//!
//! What a step prints passes through [`StepLog::write`], which
//! * masks the build's secret values as `***`, also when a value is split across two
//!   writes (the last bytes that could start a secret are held back until the next write);
//! * caps what is stored ([`LogOptions::max_bytes`], 10 MiB by default): the first half is
//!   written as it comes, the last half is kept in memory and written when the step ends,
//!   after a line saying how much was cut. A `yes` loop cannot fill the disk, and a cached
//!   step never replays gigabytes;
//! * never stops accepting output: if the log's filesystem is full, what follows is kept
//!   in the in-memory tail (the step's last words), and the step's output keeps draining so
//!   the command never blocks on a full pipe.

use std::collections::VecDeque;
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
    /// Where a step (`from`, `run`, `copy`) is, for counters, timings and machine-readable
    /// progress; text logs (OBuilder's format) do not show it.
    Step(StepEvent),
}

/// A step's progress. `index` counts from 1 over the spec's `total` steps.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub enum StepEvent {
    /// Emitted just before the step's heading.
    Started {
        index: usize,
        total: usize,
        heading: String,
    },
    /// The step's result: taken from the cache, or made (by this build or another).
    Done {
        index: usize,
        total: usize,
        id: String,
        cached: bool,
        secs: f64,
    },
    Failed {
        index: usize,
        total: usize,
        secs: f64,
        /// The command's exit status, when it exited non-zero.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<i32>,
        error: String,
    },
}

impl Eq for StepEvent {}

/// The serialised form: `{"event":"output","text":"…"}`, with `"base64"` instead of
/// `"text"` for output that is not UTF-8.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
enum Wire {
    Heading {
        text: String,
    },
    Note {
        text: String,
    },
    Output {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        base64: Option<String>,
    },
    Step(StepEvent),
}

impl serde::Serialize for LogEvent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let w = match self {
            LogEvent::Heading(t) => Wire::Heading { text: t.clone() },
            LogEvent::Note(t) => Wire::Note { text: t.clone() },
            LogEvent::Step(e) => Wire::Step(e.clone()),
            LogEvent::Output(b) => match std::str::from_utf8(b) {
                Ok(t) => Wire::Output {
                    text: Some(t.to_string()),
                    base64: None,
                },
                Err(_) => Wire::Output {
                    text: None,
                    base64: Some(base64_encode(b)),
                },
            },
        };
        w.serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for LogEvent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<LogEvent, D::Error> {
        Ok(match Wire::deserialize(d)? {
            Wire::Heading { text } => LogEvent::Heading(text),
            Wire::Note { text } => LogEvent::Note(text),
            Wire::Step(e) => LogEvent::Step(e),
            Wire::Output { text: Some(t), .. } => LogEvent::Output(t.into_bytes()),
            Wire::Output {
                base64: Some(b), ..
            } => LogEvent::Output(
                base64_decode(&b).ok_or_else(|| serde::de::Error::custom("bad base64"))?,
            ),
            Wire::Output { .. } => LogEvent::Output(Vec::new()),
        })
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = B64.iter().position(|x| *x == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
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
            LogEvent::Step(_) => {}
        }
    });
    (sink, buf)
}

/// How a step's stored log is written.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// The most a step's stored log keeps: the first half and the last half of the output,
    /// with a line saying how much was cut between them.
    pub max_bytes: u64,
    /// Values printed as `***` (a build's secrets).
    pub masked: Vec<Vec<u8>>,
    /// `fdatasync` the file when the log is finished: off where the store's commit writes
    /// the whole result, log included, to the disk anyway (one disk flush less a step).
    pub sync_on_finish: bool,
}

/// 10 MiB.
pub const DEFAULT_MAX_LOG_BYTES: u64 = 10 << 20;

impl Default for LogOptions {
    fn default() -> LogOptions {
        LogOptions {
            max_bytes: DEFAULT_MAX_LOG_BYTES,
            masked: Vec::new(),
            sync_on_finish: true,
        }
    }
}

/// `text` with the secret values in `masked` replaced by `***`, as a step's log masks
/// them (trailing whitespace of a value dropped, longest first).
pub fn mask(text: &str, masked: &[Vec<u8>]) -> String {
    let mut m = Masker::new(masked);
    let mut out = m.feed(text.as_bytes());
    out.extend(m.flush());
    String::from_utf8_lossy(&out).into_owned()
}

/// Replaces secret values by `***` in a stream, across write boundaries.
struct Masker {
    /// Longest first, so a value containing another is masked whole.
    values: Vec<Vec<u8>>,
    longest: usize,
    /// Bytes that may be the start of a value, held until the next write or the end.
    pending: Vec<u8>,
}

const MASK: &[u8] = b"***";

impl Masker {
    fn new(masked: &[Vec<u8>]) -> Masker {
        let mut values: Vec<Vec<u8>> = Vec::new();
        for v in masked {
            // A secret file usually ends in a newline that `echo $(cat f)` drops: mask the
            // value without its trailing whitespace, which covers both (and keeps the
            // output's lines as they were). A value of whitespace alone cannot be masked.
            let trimmed = v.trim_ascii_end();
            if !trimmed.is_empty() && !values.iter().any(|x| x == trimmed) {
                values.push(trimmed.to_vec());
            }
        }
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        Masker {
            longest: values.first().map_or(0, Vec::len),
            values,
            pending: Vec::new(),
        }
    }

    /// Masks `data` and returns what can be written now.
    fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        if self.values.is_empty() {
            return data.to_vec();
        }
        let mut buf = std::mem::take(&mut self.pending);
        buf.extend_from_slice(data);
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        'scan: while i < buf.len() {
            let rest = &buf[i..];
            for v in &self.values {
                if rest.starts_with(v) {
                    out.extend_from_slice(MASK);
                    i += v.len();
                    continue 'scan;
                }
            }
            // Could a value start here and continue in the next write? Hold it back.
            if rest.len() < self.longest
                && self
                    .values
                    .iter()
                    .any(|v| v.len() > rest.len() && v.starts_with(rest))
            {
                self.pending = rest.to_vec();
                return out;
            }
            out.push(buf[i]);
            i += 1;
        }
        out
    }

    /// The end of the stream: what was held back was not a secret after all.
    fn flush(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }
}

/// The log file of one step, written once and followed by any number of readers.
#[derive(Clone)]
pub struct StepLog {
    inner: Arc<Inner>,
}

struct Writer {
    /// `None` once finished.
    file: Option<File>,
    /// False after a write to the file failed (a full disk): the rest goes to `tail`.
    file_ok: bool,
    /// Bytes in the file.
    len: u64,
    /// The file takes this much; then output goes to `tail` only.
    head_limit: u64,
    tail: VecDeque<u8>,
    tail_limit: usize,
    /// Output dropped between the head and the tail.
    cut: u64,
    /// The head was full (so the middle is being cut).
    capped: bool,
    masker: Masker,
    /// `fdatasync` at `finish` (see [`LogOptions::sync_on_finish`]).
    sync: bool,
}

struct Inner {
    writer: Mutex<Writer>,
    reader: File,
    /// What followers read after the file's `len` bytes once finished: the tail, if it
    /// could not be written to the file.
    epilogue: Mutex<Vec<u8>>,
    /// (bytes in the file so far, finished)
    progress: watch::Sender<(u64, bool)>,
}

impl StepLog {
    /// Creates (truncating) the log file at `path` for writing, with the default options.
    pub fn create(path: &Path) -> io::Result<StepLog> {
        StepLog::create_with(path, &LogOptions::default())
    }

    /// Creates (truncating) the log file at `path` for writing.
    pub fn create_with(path: &Path, opts: &LogOptions) -> io::Result<StepLog> {
        let file = File::create(path)?;
        let reader = File::open(path)?;
        let half = opts.max_bytes / 2;
        Ok(StepLog::new(
            Writer {
                file: Some(file),
                file_ok: true,
                len: 0,
                head_limit: opts.max_bytes - half,
                tail: VecDeque::new(),
                tail_limit: half as usize,
                cut: 0,
                capped: false,
                masker: Masker::new(&opts.masked),
                sync: opts.sync_on_finish,
            },
            reader,
            0,
            false,
        ))
    }

    fn new(w: Writer, reader: File, len: u64, done: bool) -> StepLog {
        let (progress, _) = watch::channel((len, done));
        StepLog {
            inner: Arc::new(Inner {
                writer: Mutex::new(w),
                reader,
                epilogue: Mutex::new(Vec::new()),
                progress,
            }),
        }
    }

    /// Opens a finished log (a cached result's) for replay. A missing file replays as empty.
    pub fn open_finished(path: &Path) -> io::Result<StepLog> {
        let reader = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => File::open("/dev/null")?,
            Err(e) => return Err(e),
        };
        let len = reader.metadata()?.len();
        Ok(StepLog::new(
            Writer {
                file: None,
                file_ok: false,
                len,
                head_limit: 0,
                tail: VecDeque::new(),
                tail_limit: 0,
                cut: 0,
                capped: false,
                masker: Masker::new(&[]),
                sync: false,
            },
            reader,
            len,
            true,
        ))
    }

    /// Appends bytes (masked) and wakes followers. Never fails for lack of space: what the
    /// file cannot take is kept in the in-memory tail.
    pub fn write(&self, data: &[u8]) -> io::Result<()> {
        let mut w = self.inner.writer.lock().unwrap_or_else(|p| p.into_inner());
        if w.file.is_none() {
            return Err(io::Error::other("log already finished"));
        }
        let masked = w.masker.feed(data);
        let before = w.len;
        w.append(&masked);
        if w.len != before {
            let len = w.len;
            self.inner.progress.send_modify(|(l, _)| *l = len);
        }
        Ok(())
    }

    /// Marks the log complete: what was held back, the line saying what was cut and the
    /// kept tail are written (or, if the file cannot take them, kept for followers), and
    /// followers stop at the end.
    pub fn finish(&self) {
        let mut w = self.inner.writer.lock().unwrap_or_else(|p| p.into_inner());
        if w.file.is_none() {
            return;
        }
        let rest = w.masker.flush();
        w.append(&rest);
        let mut end = Vec::new();
        if w.cut > 0 {
            end.extend_from_slice(
                format!(
                    "\n[obuilder: {} of output cut here; the last {} follow]\n",
                    human_bytes(w.cut),
                    human_bytes(w.tail.len() as u64)
                )
                .as_bytes(),
            );
        }
        end.extend(w.tail.drain(..));
        if !end.is_empty() && w.file_ok {
            let ok = w.file.as_mut().is_some_and(|f| f.write_all(&end).is_ok());
            if ok {
                w.len += end.len() as u64;
                end.clear();
            }
        }
        if let Some(f) = w.file.take() {
            if w.sync {
                let _ = f.sync_data();
            }
        }
        *self
            .inner
            .epilogue
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = end;
        let len = w.len;
        self.inner
            .progress
            .send_modify(|(l, done)| (*l, *done) = (len, true));
    }

    pub fn is_finished(&self) -> bool {
        self.inner.progress.borrow().1
    }

    /// The last `n` bytes of what the step printed (from the file and the kept tail), for
    /// error messages.
    pub fn last_bytes(&self, n: usize) -> Vec<u8> {
        let w = self.inner.writer.lock().unwrap_or_else(|p| p.into_inner());
        let epi = self
            .inner
            .epilogue
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<u8> = w.tail.iter().copied().collect();
        out.splice(0..0, epi.iter().copied());
        if out.len() < n {
            let want = (n - out.len()).min(w.len as usize);
            let mut head = vec![0u8; want];
            if let Ok(k) = self.inner.reader.read_at(&mut head, w.len - want as u64) {
                head.truncate(k);
                out.splice(0..0, head);
            }
        }
        let skip = out.len().saturating_sub(n);
        out.split_off(skip)
    }

    /// Calls `f` with the whole log from its start, then with new bytes as they are written,
    /// and returns when the log is finished and fully read.
    pub async fn follow(&self, mut f: impl FnMut(&[u8])) -> io::Result<()> {
        let mut rx = self.inner.progress.subscribe();
        let mut offset = 0u64;
        // Grown to what is read, up to 64 KiB: a cached step replays a log of a few bytes,
        // and zeroing 64 KiB for each was a tenth of a fully cached build's instructions.
        let mut buf = Vec::new();
        loop {
            let (len, done) = *rx.borrow_and_update();
            while offset < len {
                let want = ((len - offset) as usize).min(64 * 1024);
                if buf.len() < want {
                    buf.resize(want, 0);
                }
                let n = self.inner.reader.read_at(&mut buf[..want], offset)?;
                if n == 0 {
                    break;
                }
                f(&buf[..n]);
                offset += n as u64;
            }
            if done && offset >= len {
                let epi = self
                    .inner
                    .epilogue
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                if !epi.is_empty() {
                    f(&epi);
                }
                return Ok(());
            }
            if rx.changed().await.is_err() {
                return Ok(());
            }
        }
    }
}

impl Writer {
    fn append(&mut self, mut data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.file_ok && !self.capped {
            let room = self.head_limit.saturating_sub(self.len) as usize;
            let now = &data[..room.min(data.len())];
            let ok = self.file.as_mut().is_some_and(|f| f.write_all(now).is_ok());
            if ok {
                self.len += now.len() as u64;
                data = &data[now.len()..];
                if !data.is_empty() {
                    self.capped = true;
                    let note = format!(
                        "\n[obuilder: the log passed {}; the rest is not stored until the step ends, then its last {} are]\n",
                        human_bytes(self.head_limit),
                        human_bytes(self.tail_limit as u64)
                    );
                    if self
                        .file
                        .as_mut()
                        .is_some_and(|f| f.write_all(note.as_bytes()).is_ok())
                    {
                        self.len += note.len() as u64;
                    }
                }
            } else {
                // The log's filesystem is full (or broken): keep draining into memory.
                self.file_ok = false;
            }
        }
        if data.is_empty() {
            return;
        }
        self.tail.extend(data);
        let limit = self.tail_limit.max(1);
        if self.tail.len() > limit {
            let drop = self.tail.len() - limit;
            self.tail.drain(..drop);
            self.cut += drop as u64;
        }
    }
}

/// `12.3 MiB`-style sizes (binary units, one decimal).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests;
