//! The scheduler's HTTP endpoint for Prometheus (reference/ocluster.md §2.10):
//!
//! * `GET /metrics`: the scheduler's own metrics;
//! * `GET /pool/POOL/worker/WORKER/metrics`: the worker's, fetched over RPC;
//! * `GET /pool/POOL/worker/WORKER/host-metrics`: its host's (node-exporter), relayed;
//! * `GET /pool/POOL/worker/WORKER/NAME`: one of its `--additional-metrics` (404 if it
//!   has none of that name).
//!
//! With the status page on (`--listen-http`, see [`crate::status`]), it also serves `/`,
//! `/status.json` and `/pool/POOL/job/ID[/log]`; those need no login from loopback, and
//! the token of `--http-token-file` from anywhere else.
//!
//! A small HTTP/1.1 server: one request per connection, bounded request size.

use std::rc::Rc;
use std::time::Duration;

use ocluster_api::{additional_metric, worker};
use ocluster_scheduler::service::Scheduler;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MAX_REQUEST: usize = 16 << 10;

/// What a listener serves.
#[derive(Clone, Default)]
pub struct Site {
    /// The status page too, not only the metrics.
    pub status: bool,
    /// The token that non-loopback clients must present for the status page.
    pub token: Option<String>,
}

pub async fn serve(listener: tokio::net::TcpListener, sched: Rc<Scheduler>) {
    serve_site(listener, sched, Site::default()).await
}

pub async fn serve_site(listener: tokio::net::TcpListener, sched: Rc<Scheduler>, site: Site) {
    let site = Rc::new(site);
    loop {
        let Ok((s, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let sched = sched.clone();
        let site = site.clone();
        tokio::task::spawn_local(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(60),
                handle(s, sched, &site, peer.ip().is_loopback()),
            )
            .await;
        });
    }
}

/// The token a request presents: `Authorization: Bearer T` or `?token=T`.
fn presented_token<'a>(head: &'a str, path: &'a str) -> Option<&'a str> {
    for line in head.lines().skip(1) {
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("authorization") {
                if let Some(t) = v.trim().strip_prefix("Bearer ") {
                    return Some(t.trim());
                }
            }
        }
    }
    let query = path.split_once('?')?.1;
    query.split('&').find_map(|kv| kv.strip_prefix("token="))
}

/// Compares without stopping at the first difference.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

async fn handle(
    mut s: tokio::net::TcpStream,
    sched: Rc<Scheduler>,
    site: &Site,
    loopback: bool,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk).await?;
        if n == 0 || buf.len() > MAX_REQUEST {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = if method != "GET" {
        (400, "text/plain".to_string(), "Bad request".to_string())
    } else if site.status && crate::status::is_status_path(path) {
        let allowed = loopback
            || matches!((&site.token, presented_token(&line, path)), (Some(t), Some(p)) if same(t, p));
        if allowed {
            crate::status::route(path, &sched).await
        } else if site.token.is_none() {
            (
                403,
                "text/plain".into(),
                "The status page is served only to loopback; start the scheduler with \
                 --http-token-file to let others in with the token.\n"
                    .into(),
            )
        } else {
            (
                401,
                "text/plain".into(),
                "Present the token: Authorization: Bearer TOKEN, or ?token=TOKEN.\n".into(),
            )
        }
    } else {
        route(path, &sched).await
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        _ => "Internal Server Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.shutdown().await
}

/// The heap the process holds live, as glibc counts it (not in the original): the RSS
/// also keeps what was freed, e.g. after a burst of submissions, until the allocator gives
/// it back.
fn heap_metric() -> String {
    match crate::heap::in_use() {
        Some(live) => format!(
            "# HELP ocluster_scheduler_heap_bytes Bytes of heap in use (malloc'd and not freed)\n\
             # TYPE ocluster_scheduler_heap_bytes gauge\nocluster_scheduler_heap_bytes {live}\n"
        ),
        None => String::new(),
    }
}

async fn route(path: &str, sched: &Rc<Scheduler>) -> (u16, String, String) {
    let path = path.split('?').next().unwrap_or("");
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["metrics"] => {
            let mut text = sched.metrics();
            text.push_str(&heap_metric());
            (200, "text/plain; version=0.0.4".into(), text)
        }
        ["pool", pool, "worker", w, what] => {
            if !sched.pool_names().iter().any(|p| p == pool) {
                return (400, "text/plain".into(), "No such pool".into());
            }
            let Some(cap) = sched.worker(pool, w) else {
                return (400, "text/plain".into(), "Worker not connected".into());
            };
            match worker_metrics(&cap, what).await {
                Ok(Some((ct, data))) => (200, ct, data),
                Ok(None) => (404, "text/plain".into(), "Not found".into()),
                Err(e) => {
                    tracing::warn!("Error getting metrics for {pool:?}/{w:?}: {e}");
                    (
                        500,
                        "text/plain".into(),
                        "Worker metrics collection failed".into(),
                    )
                }
            }
        }
        _ => (400, "text/plain".into(), "Bad request".into()),
    }
}

pub(crate) async fn worker_metrics(
    cap: &worker::Client,
    what: &str,
) -> Result<Option<(String, String)>, capnp::Error> {
    match what {
        "metrics" | "host-metrics" => {
            let mut req = cap.metrics_request();
            req.get().set_source(if what == "metrics" {
                worker::MetricsSource::Agent
            } else {
                worker::MetricsSource::Host
            });
            let r = req.send().promise.await?;
            let r = r.get()?;
            Ok(Some((
                r.get_content_type()?.to_string()?,
                r.get_data()?.to_string()?,
            )))
        }
        extra => {
            let mut req = cap.additional_metric_request();
            req.get().set_source(extra);
            let r = req.send().promise.await?;
            match r.get()?.get_metric()?.which()? {
                additional_metric::Metric(m) => {
                    let m = m?;
                    Ok(Some((
                        m.get_content_type()?.to_string()?,
                        m.get_data()?.to_string()?,
                    )))
                }
                additional_metric::NotReported(()) => Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Off loopback the status page needs the token, from the header or the query.
    #[test]
    fn tokens() {
        let head = "GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret-s3cret-s3cret\r\n";
        assert_eq!(presented_token(head, "/"), Some("s3cret-s3cret-s3cret"));
        assert_eq!(
            presented_token("GET / HTTP/1.1\r\n", "/status.json?a=1&token=abc"),
            Some("abc")
        );
        assert_eq!(presented_token("GET / HTTP/1.1\r\n", "/"), None);
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
    }
}
