//! `obuilder delete|clean|prune|df`: looking after the store.

use std::process::ExitCode;

use obuilder_engine::log::{LogEvent, LogSink};
use obuilder_engine::Builder;

use super::process::{exit, usage};
use super::setup::{builder_config, open, SandboxArgs, StoreArgs};

/// Deleting results is safe only when no other process builds on them.
fn need_alone(b: &Builder) -> anyhow::Result<()> {
    anyhow::ensure!(
        b.try_exclusive(),
        "another obuilder process is using {}; deleting results needs the store to itself \
         (try again when it has finished)",
        b.store().describe()
    );
    Ok(())
}

/// Prints each removal; a closed stdout is noted and the rest goes unprinted (the
/// deletions themselves go on, so the store is never left half-pruned by a `| head`).
fn print_sink() -> LogSink {
    std::sync::Arc::new(|e: &LogEvent| {
        if let LogEvent::Note(n) | LogEvent::Heading(n) = e {
            let _ = crate::outln!("{n}");
        }
    })
}

async fn builder(
    store: &StoreArgs,
    sandbox: &SandboxArgs,
) -> anyhow::Result<std::sync::Arc<Builder>> {
    open(&builder_config(store, sandbox, None, None)?).await
}

#[derive(clap::Args)]
pub struct DeleteArgs {
    /// The result to delete, with everything built on it: its id, a unique prefix of it, or
    /// a --tag name.
    id: String,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

pub async fn delete(a: DeleteArgs) -> anyhow::Result<ExitCode> {
    let b = builder(&a.store, &a.sandbox).await?;
    need_alone(&b)?;
    // An id, a unique prefix of one, or a tag (a tag itself stays: `image rm` forgets it).
    let id = if b.info(&a.id)?.is_some() {
        a.id.clone()
    } else {
        match super::result::find(&b, &a.store.config()?.images(), &a.id).await {
            Ok(named) => named.id,
            Err(e) => {
                eprintln!("obuilder: {e}");
                return Ok(ExitCode::from(exit::USAGE));
            }
        }
    };
    let n = b.delete(&id, &print_sink()).await?;
    swept(&b, &a.store).await;
    crate::outln!("Removed {n} item{}", if n == 1 { "" } else { "s" })?;
    Ok(ExitCode::SUCCESS)
}

/// Frees what exports of deleted results left in the blob store, saying how much.
async fn swept(b: &Builder, store: &StoreArgs) {
    let images = match store.config() {
        Ok(c) => c.images(),
        Err(_) => return,
    };
    match super::result::sweep(b, &images).await {
        Ok(0) => {}
        Ok(n) => {
            let _ = crate::outln!(
                "Freed {} of exported layers no result needs any more",
                obuilder_engine::log::human_bytes(n)
            );
        }
        Err(e) => tracing::warn!("cleaning up exported layers: {e}"),
    }
}

/// Waits (up to a minute on btrfs) until deleted results have given their space back.
#[derive(clap::Args)]
pub struct WaitArgs {
    /// Wait until the filesystem has freed the deleted results' space (btrfs frees it in
    /// the background, which can take a while).
    #[arg(long)]
    wait_for_space: bool,
}

async fn maybe_wait(b: &Builder, w: &WaitArgs) -> anyhow::Result<()> {
    if w.wait_for_space {
        b.store().complete_deletes().await?;
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct CleanArgs {
    #[command(flatten)]
    wait: WaitArgs,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

pub async fn clean(a: CleanArgs) -> anyhow::Result<ExitCode> {
    let b = builder(&a.store, &a.sandbox).await?;
    need_alone(&b)?;
    let n = b.prune(None, usize::MAX, &print_sink()).await?;
    swept(&b, &a.store).await;
    maybe_wait(&b, &a.wait).await?;
    crate::outln!("Removed {n} items")?;
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["before", "keep_free"])))]
pub struct PruneArgs {
    /// Remove results last used before this: a date (`2026-11-01`, `2026-11-01 12:00:00`)
    /// or an age (`90m`, `12h`, `7d`).
    #[arg(long, value_name = "DATE|AGE")]
    before: Option<String>,
    /// Remove least-recently-used results until the store's filesystem has this much free
    /// (in percent, e.g. 20 or 20%).
    #[arg(long, value_name = "PERCENT", conflicts_with = "before", value_parser = parse_percent)]
    keep_free: Option<f64>,
    /// Remove at most this many results (least recently used leaves first).
    #[arg(long, value_name = "N", default_value_t = usize::MAX, hide_default_value = true)]
    limit: usize,
    #[command(flatten)]
    wait: WaitArgs,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

fn parse_percent(s: &str) -> Result<f64, String> {
    let n: f64 = s
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{s:?}: expected a percentage such as 20 or 20%"))?;
    if (0.0..=100.0).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{s:?}: expected a percentage from 0 to 100"))
    }
}

/// Parses `--before`: a date or an age.
pub fn parse_before(s: &str, now: time::OffsetDateTime) -> anyhow::Result<time::OffsetDateTime> {
    let s = s.trim();
    if let Some(unit) = s.chars().last().filter(|c| c.is_ascii_alphabetic()) {
        let n: i64 = s[..s.len() - 1]
            .parse()
            .map_err(|_| usage(format!("--before {s:?}: expected a number before `{unit}`")))?;
        let d = match unit {
            's' => time::Duration::seconds(n),
            'm' => time::Duration::minutes(n),
            'h' => time::Duration::hours(n),
            'd' => time::Duration::days(n),
            _ => {
                return Err(usage(format!(
                    "--before {s:?}: an age ends in s, m, h or d"
                )))
            }
        };
        return Ok(now - d);
    }
    let date = time::macros::format_description!("[year]-[month]-[day]");
    let datetime =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    let t = s.replace('T', " ");
    if let Ok(dt) = time::PrimitiveDateTime::parse(&t, &datetime) {
        return Ok(dt.assume_utc());
    }
    if let Ok(d) = time::Date::parse(&t, &date) {
        return Ok(d.midnight().assume_utc());
    }
    Err(usage(format!(
        "--before {s:?}: expected YYYY-MM-DD[ HH:MM:SS] or an age such as 7d"
    )))
}

pub async fn prune(a: PruneArgs) -> anyhow::Result<ExitCode> {
    let before = a
        .before
        .as_deref()
        .map(|b| parse_before(b, time::OffsetDateTime::now_utc()))
        .transpose()?;
    let b = builder(&a.store, &a.sandbox).await?;
    need_alone(&b)?;
    let n = match (before, a.keep_free) {
        (Some(before), _) => b.prune(Some(before), a.limit, &print_sink()).await?,
        (None, Some(p)) => b.prune_until_free(p, &print_sink()).await?,
        (None, None) => return Err(usage("prune needs --before or --keep-free")),
    };
    swept(&b, &a.store).await;
    maybe_wait(&b, &a.wait).await?;
    crate::outln!("Removed {n} items")?;
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
pub struct DfArgs {
    #[command(flatten)]
    format: super::setup::FormatArgs,
    #[command(flatten)]
    store: StoreArgs,
}

/// Reads the store without opening a sandbox, recovering anything, or creating a store
/// where there is none.
pub async fn df(a: DfArgs) -> anyhow::Result<ExitCode> {
    let config = a.store.config()?;
    let store = config.open_existing_store()?;
    let stats = obuilder_config::store_stats(&*store)?;
    let u = store.df().await?;
    if a.format.json() {
        let v = serde_json::json!({
            "store": store.describe(),
            "results": stats.results,
            "cache_hits": stats.cache.hits,
            "cache_misses": stats.cache.misses,
            "total_bytes": u.total_bytes,
            "free_bytes": u.free_bytes,
            "free_percent": u.free_percent(),
        });
        crate::outln!("{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let gib = |n: u64| n as f64 / (1u64 << 30) as f64;
    crate::outln!("store:   {}", store.describe())?;
    crate::outln!("results: {}", stats.results)?;
    let (hits, misses) = (stats.cache.hits, stats.cache.misses);
    let rate = if hits + misses > 0 {
        100.0 * hits as f64 / (hits + misses) as f64
    } else {
        0.0
    };
    crate::outln!("cache:   {hits} hits, {misses} misses ({rate:.0}% of steps from cache)")?;
    crate::outln!(
        "free:    {:.1}% ({:.1} GiB of {:.1} GiB)",
        u.free_percent(),
        gib(u.free_bytes),
        gib(u.total_bytes)
    )?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn before_accepts_dates_and_ages() {
        let now = time::macros::datetime!(2026-11-22 12:00:00 UTC);
        assert_eq!(
            parse_before("7d", now).unwrap(),
            time::macros::datetime!(2026-11-15 12:00:00 UTC)
        );
        assert_eq!(
            parse_before("90m", now).unwrap(),
            time::macros::datetime!(2026-11-22 10:30:00 UTC)
        );
        assert_eq!(
            parse_before("2026-11-01", now).unwrap(),
            time::macros::datetime!(2026-11-01 00:00:00 UTC)
        );
        assert_eq!(
            parse_before("2026-11-01T10:00:00", now).unwrap(),
            time::macros::datetime!(2026-11-01 10:00:00 UTC)
        );
        assert!(parse_before("yesterday", now).is_err());
        assert!(parse_before("7w", now).is_err());
        assert_eq!(parse_percent("20%"), Ok(20.0));
        assert!(parse_percent("120").is_err());
    }
}
