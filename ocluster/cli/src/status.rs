//! The scheduler's live status page (`ocluster-scheduler --listen-http`): what the
//! original shows only through `ocluster-admin show`, in a browser.
//!
//! * `/`: every pool: its workers (connected or not, paused, running jobs, free space,
//!   their queues), its queue, its clients (queued jobs, share, how far ahead their
//!   fair-share clock is) and its running jobs; it reloads itself every 2 s;
//! * `/pool/POOL/job/ID`: a running job and the end of its log, reloaded every second;
//!   `/pool/POOL/job/ID/log` is that tail as text;
//! * `/status.json`: the same data, for tools.
//!
//! Plain HTML and CSS, no script and nothing fetched from elsewhere, so it works on a
//! machine without internet access and in any browser.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use ocluster_api::worker;
use ocluster_scheduler::pool::QueuedView;
use ocluster_scheduler::service::{PoolStatus, Scheduler};

/// Jobs listed per queue (the rest are counted).
const LIST: usize = 50;
/// Bytes of log on a job's page.
const TAIL: u32 = 8 << 10;

/// The paths the status page serves.
pub fn is_status_path(path: &str) -> bool {
    let path = path.split('?').next().unwrap_or("");
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    matches!(
        segs.as_slice(),
        [] | ["status.json"] | ["pool", _, "job", _] | ["pool", _, "job", _, "log"]
    )
}

pub async fn route(path: &str, sched: &Rc<Scheduler>) -> (u16, String, String) {
    let path = path.split('?').next().unwrap_or("");
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        [] => {
            let pools = sched.status(LIST);
            let free = free_space(sched, &pools).await;
            (
                200,
                "text/html; charset=utf-8".into(),
                overview(&pools, &free),
            )
        }
        ["status.json"] => {
            let pools = sched.status(usize::MAX);
            let free = free_space(sched, &pools).await;
            let body = serde_json::json!({ "pools": pools, "free_space": free });
            (200, "application/json".into(), body.to_string())
        }
        ["pool", pool, "job", id, rest @ ..] if rest.is_empty() || rest == ["log"] => {
            let Ok(id) = id.parse::<u64>() else {
                return (404, "text/plain".into(), "No such job\n".into());
            };
            let Some(job) = sched.running_job(pool, id) else {
                return (
                    404,
                    "text/html; charset=utf-8".into(),
                    page(
                        "Job not running",
                        0,
                        &format!(
                            "<p>Job {id} of pool {} is not running (it has finished, or the \
                             scheduler restarted). <a href=\"/\">Status</a></p>",
                            esc(pool)
                        ),
                    ),
                );
            };
            let tail = sched.log_tail(pool, id, TAIL).await.unwrap_or_default();
            let tail = String::from_utf8_lossy(&tail);
            if rest == ["log"] {
                return (200, "text/plain; charset=utf-8".into(), tail.into_owned());
            }
            let body = format!(
                "<p><a href=\"/\">&larr; status</a></p>\
                 <table><tr><th>pool</th><td>{}</td></tr><tr><th>client</th><td>{}</td></tr>\
                 <tr><th>job</th><td>{}</td></tr><tr><th>worker</th><td>{}</td></tr>\
                 <tr><th>priority</th><td>{}</td></tr><tr><th>running for</th><td>{}</td></tr>\
                 <tr><th>attempt</th><td>{}</td></tr></table>\
                 <h2>Log (last {} KiB)</h2><pre id=\"log\">{}</pre>",
                esc(pool),
                esc(&job.client),
                esc(&job.label),
                esc(&job.worker),
                job.priority,
                duration(job.running_for),
                job.attempt,
                TAIL >> 10,
                esc(&tail)
            );
            (
                200,
                "text/html; charset=utf-8".into(),
                page(&format!("{} on {}", job.label, job.worker), 1, &body),
            )
        }
        _ => (404, "text/plain".into(), "Not found\n".into()),
    }
}

/// Each connected worker's free space (percent), as its metrics say, asked of all at
/// once; a worker that does not answer within half a second has none.
async fn free_space(sched: &Rc<Scheduler>, pools: &[PoolStatus]) -> BTreeMap<String, f64> {
    let asks = pools.iter().flat_map(|p| {
        p.pool.workers.iter().filter_map(|w| {
            let cap: worker::Client = sched.worker(&p.pool.name, &w.name)?;
            let key = format!("{}/{}", p.pool.name, w.name);
            Some(async move {
                let got = tokio::time::timeout(
                    Duration::from_millis(500),
                    crate::metrics_http::worker_metrics(&cap, "metrics"),
                )
                .await;
                let text = match got {
                    Ok(Ok(Some((_, text)))) => text,
                    _ => return None,
                };
                let value = text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
                    let (name, v) = l.split_once(' ')?;
                    name.ends_with("obuilder_space_free")
                        .then(|| v.trim().parse().ok())?
                })?;
                Some((key, value))
            })
        })
    });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn duration(secs: f64) -> String {
    let s = secs.max(0.0);
    if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.4em}\
table{border-collapse:collapse;margin:.4em 0}th,td{border:1px solid #ccc;padding:.25em .6em;\
text-align:left;vertical-align:top}th{background:#f2f2f2}\
.paused{color:#a60}.gone{color:#888}.active{color:#070}\
pre{background:#111;color:#eee;padding:.8em;max-height:40em;overflow:auto;white-space:pre-wrap}\
.muted{color:#777}";

fn page(title: &str, refresh: u32, body: &str) -> String {
    let refresh = if refresh > 0 {
        format!("<meta http-equiv=\"refresh\" content=\"{refresh}\">")
    } else {
        String::new()
    };
    format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">{refresh}\
         <title>{}</title><style>{STYLE}</style></head><body><h1>{}</h1>{body}</body></html>",
        esc(title),
        esc(title)
    )
}

fn queue(items: &[QueuedView], total: usize) -> String {
    if total == 0 {
        return "<span class=\"muted\">empty</span>".into();
    }
    let mut out = String::from("<ol>");
    for q in items {
        let when = if q.start_in > 0.0 {
            format!(", fair start in {}", duration(q.start_in))
        } else {
            String::new()
        };
        out.push_str(&format!(
            "<li>{} <span class=\"muted\">({}, {}{when})</span></li>",
            esc(&q.label),
            esc(&q.client),
            q.priority
        ));
    }
    out.push_str("</ol>");
    if total > items.len() {
        out.push_str(&format!(
            "<p class=\"muted\">and {} more</p>",
            total - items.len()
        ));
    }
    out
}

fn overview(pools: &[PoolStatus], free: &BTreeMap<String, f64>) -> String {
    let mut body = String::new();
    for p in pools {
        let v = &p.pool;
        body.push_str(&format!(
            "<section class=\"pool\" id=\"pool-{name}\"><h2>Pool {name}</h2>\
             <p>{} workers connected, capacity {}; {} running, {} queued; {} submitted, {} \
             started, {} cancelled while queued, {} moved to an idle worker.</p>",
            v.workers.len(),
            v.capacity,
            p.running.len(),
            v.backlog_len + v.workers.iter().map(|w| w.queue_len).sum::<usize>(),
            v.counters.submitted,
            v.counters.accepted,
            v.counters.cancelled,
            v.counters.stolen,
            name = esc(&v.name),
        ));
        body.push_str(
            "<h3>Workers</h3><table class=\"workers\"><tr><th>worker</th><th>state</th>\
             <th>running</th><th>capacity</th><th>free space</th><th>its queue</th></tr>",
        );
        for w in &v.workers {
            let class = if w.state == "active" {
                "active"
            } else {
                "paused"
            };
            let space = free
                .get(&format!("{}/{}", v.name, w.name))
                .map_or("?".to_string(), |f| format!("{f:.0} %"));
            body.push_str(&format!(
                "<tr><td>{}</td><td class=\"{class}\">{}</td><td>{}</td><td>{}</td>\
                 <td>{space}</td><td>{}</td></tr>",
                esc(&w.name),
                esc(&w.state),
                w.running,
                w.capacity,
                queue(&w.queue, w.queue_len)
            ));
        }
        for (name, paused) in &v.disconnected {
            body.push_str(&format!(
                "<tr><td>{}</td><td class=\"gone\">disconnected{}</td><td></td><td></td>\
                 <td></td><td></td></tr>",
                esc(name),
                if *paused { ", paused" } else { "" }
            ));
        }
        body.push_str("</table>");
        body.push_str("<h3>Running jobs</h3>");
        if p.running.is_empty() {
            body.push_str("<p class=\"muted\">none</p>");
        } else {
            body.push_str(
                "<table class=\"running\"><tr><th>job</th><th>client</th><th>worker</th>\
                 <th>priority</th><th>running for</th><th>attempt</th></tr>",
            );
            for r in &p.running {
                body.push_str(&format!(
                    "<tr><td><a href=\"/pool/{}/job/{}\">{}</a></td><td>{}</td><td>{}</td>\
                     <td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&v.name),
                    r.id,
                    esc(&r.label),
                    esc(&r.client),
                    esc(&r.worker),
                    r.priority,
                    duration(r.running_for),
                    r.attempt
                ));
            }
            body.push_str("</table>");
        }
        body.push_str(&format!(
            "<h3>Queue</h3><div class=\"queue\">{}</div>",
            if v.backlog_len == 0 && v.idle > 0 {
                format!(
                    "<span class=\"muted\">empty; {} free slot(s) waiting for work</span>",
                    v.idle
                )
            } else {
                queue(&v.backlog, v.backlog_len)
            }
        ));
        body.push_str(
            "<h3>Clients</h3><table class=\"clients\"><tr><th>client</th><th>queued</th>\
             <th>rate</th><th>fair-share clock ahead by</th></tr>",
        );
        for c in &v.clients {
            body.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&c.name),
                c.queued,
                c.rate,
                duration(c.ahead)
            ));
        }
        body.push_str("</table></section>");
    }
    page("OCluster scheduler", 2, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_paths() {
        assert_eq!(
            esc("<a href='x'>&\""),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;"
        );
        assert!(is_status_path("/"));
        assert!(is_status_path("/status.json?token=x"));
        assert!(is_status_path("/pool/linux/job/3"));
        assert!(!is_status_path("/metrics"));
        assert!(!is_status_path("/pool/linux/worker/w1/metrics"));
        assert!(!is_status_path("/pool/linux/worker/job/metrics"));
        assert_eq!(duration(59.4), "59 s");
        assert_eq!(duration(600.0), "10 min");
    }
}
