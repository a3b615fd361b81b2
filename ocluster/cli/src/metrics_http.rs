//! The scheduler's HTTP endpoint for Prometheus (reference/ocluster.md §2.10):
//!
//! * `GET /metrics`: the scheduler's own metrics;
//! * `GET /pool/POOL/worker/WORKER/metrics`: the worker's, fetched over RPC;
//! * `GET /pool/POOL/worker/WORKER/host-metrics`: its host's (node-exporter), relayed;
//! * `GET /pool/POOL/worker/WORKER/NAME`: one of its `--additional-metrics` (404 if it
//!   has none of that name).
//!
//! A small HTTP/1.1 server: one request per connection, bounded request size.

use std::rc::Rc;
use std::time::Duration;

use ocluster_api::{additional_metric, worker};
use ocluster_scheduler::service::Scheduler;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MAX_REQUEST: usize = 16 << 10;

pub async fn serve(listener: tokio::net::TcpListener, sched: Rc<Scheduler>) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let sched = sched.clone();
        tokio::task::spawn_local(async move {
            let _ = tokio::time::timeout(Duration::from_secs(60), handle(s, sched)).await;
        });
    }
}

async fn handle(mut s: tokio::net::TcpStream, sched: Rc<Scheduler>) -> std::io::Result<()> {
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
    } else {
        route(path, &sched).await
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
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

async fn route(path: &str, sched: &Rc<Scheduler>) -> (u16, String, String) {
    let path = path.split('?').next().unwrap_or("");
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["metrics"] => (200, "text/plain; version=0.0.4".into(), sched.metrics()),
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

async fn worker_metrics(
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
