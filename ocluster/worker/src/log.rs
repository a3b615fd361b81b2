//! A job's log as the worker keeps it: every byte, in memory, for `Job.log` to read from
//! any offset while the job runs and after.

use std::sync::{Arc, Mutex};

use obuilder_engine::log::{LogEvent, LogSink};

/// The most `Job.log` returns at once, as the original.
pub const MAX_CHUNK: usize = 10 * 1024;

#[derive(Default)]
struct Inner {
    data: Vec<u8>,
    finished: bool,
    /// The last write ended mid-line (a note must start on a line of its own).
    mid_line: bool,
}

/// Shared between the build (which writes, from any thread) and the `Job` capability.
#[derive(Clone, Default)]
pub struct JobLog {
    inner: Arc<Mutex<Inner>>,
    changed: Arc<tokio::sync::Notify>,
}

impl JobLog {
    pub fn new() -> JobLog {
        JobLog::default()
    }

    pub fn write(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        {
            let mut i = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            if i.finished {
                return;
            }
            i.data.extend_from_slice(bytes);
            i.mid_line = !bytes.ends_with(b"\n");
        }
        self.changed.notify_waiters();
    }

    /// A line of the worker's own ("Building on …", "Job succeeded").
    pub fn line(&self, text: &str) {
        let nl = if self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .mid_line
        {
            "\n"
        } else {
            ""
        };
        self.write(format!("{nl}{text}\n").as_bytes());
    }

    /// No more writes: readers at the end get empty data.
    pub fn finish(&self) {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .finished = true;
        self.changed.notify_waiters();
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .data
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `Job.log(start)`: up to [`MAX_CHUNK`] bytes from `start` (negative: from the end)
    /// and the offset after them. Waits while the job runs and has nothing new; empty
    /// data means the log is complete.
    pub async fn read(&self, start: i64) -> (Vec<u8>, i64) {
        loop {
            let changed = self.changed.notified();
            {
                let i = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                let len = i.data.len() as i64;
                let from = if start < 0 {
                    (len + start).max(0)
                } else {
                    start.min(len)
                };
                if from < len || i.finished {
                    let to = len.min(from + MAX_CHUNK as i64);
                    return (i.data[from as usize..to as usize].to_vec(), to);
                }
            }
            changed.await;
        }
    }

    /// A sink for the builder's events, written as the original worker's log: headings in
    /// bold blue after a blank line, notes in magenta with the UTC time, output as it is.
    pub fn sink(&self) -> LogSink {
        let log = self.clone();
        Arc::new(move |e: &LogEvent| match e {
            LogEvent::Heading(h) => {
                log.line("");
                log.write(format!("\x1b[01;34m{h}\x1b[0m\n").as_bytes());
            }
            LogEvent::Note(n) => {
                let now = time::OffsetDateTime::now_utc();
                let stamp = now
                    .format(time::macros::format_description!(
                        "[year]-[month]-[day] [hour]:[minute].[second]"
                    ))
                    .unwrap_or_default();
                log.line(&format!("\x1b[01;2m\x1b[01;35m{stamp} {n}\x1b[0m"));
            }
            LogEvent::Output(b) => log.write(b),
            // (The original's log has no step events.)
            LogEvent::Step(_) => {}
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn chunks_negative_starts_and_the_end() {
        let log = JobLog::new();
        log.write(&vec![b'x'; 25_000]);
        let (a, next) = block(log.read(0));
        assert_eq!((a.len(), next), (MAX_CHUNK, MAX_CHUNK as i64));
        let (b, next) = block(log.read(20_000));
        assert_eq!((b.len(), next), (5_000, 25_000));
        let (c, next) = block(log.read(-10));
        assert_eq!((c.len(), next), (10, 25_000));
        let (d, _) = block(log.read(-1_000_000));
        assert_eq!(d.len(), MAX_CHUNK);
        log.finish();
        let (e, next) = block(log.read(25_000));
        assert!(e.is_empty());
        assert_eq!(next, 25_000);
        let (f, _) = block(log.read(99_999));
        assert!(f.is_empty());
    }

    #[test]
    fn a_reader_waits_for_new_output() {
        block(async {
            let log = JobLog::new();
            let reader = {
                let log = log.clone();
                tokio::spawn(async move { log.read(0).await })
            };
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            assert!(!reader.is_finished());
            log.write(b"hi\n");
            let (data, next) = reader.await.unwrap();
            assert_eq!((data.as_slice(), next), (&b"hi\n"[..], 3));
        });
    }

    #[test]
    fn notes_start_on_their_own_line() {
        let log = JobLog::new();
        let sink = log.sink();
        sink(&LogEvent::Output(b"no newline".to_vec()));
        sink(&LogEvent::Note("---> saved as \"x\"".into()));
        log.finish();
        let (d, _) = block(log.read(0));
        let s = String::from_utf8(d).unwrap();
        assert!(s.starts_with("no newline\n\x1b[01;2m\x1b[01;35m"), "{s:?}");
        assert!(s.ends_with(" ---> saved as \"x\"\x1b[0m\n"), "{s:?}");
    }
}
