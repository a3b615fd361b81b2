//! `obuilder delete|clean|prune|df`: looking after the store.

use std::process::ExitCode;

use obuilder_engine::db;
use obuilder_engine::log::{LogEvent, LogSink};

use super::setup::{builder, SandboxArgs, StoreArgs};

/// Deleting results is safe only when no other process builds on them.
fn need_alone(b: &obuilder_engine::Builder) -> anyhow::Result<()> {
    anyhow::ensure!(
        b.try_exclusive(),
        "another obuilder process is using {}; deleting results needs the store to itself \
         (try again when it has finished)",
        b.store().describe()
    );
    Ok(())
}

fn print_sink() -> LogSink {
    std::sync::Arc::new(|e: &LogEvent| {
        if let LogEvent::Note(n) | LogEvent::Heading(n) = e {
            println!("{n}");
        }
    })
}

#[derive(clap::Args)]
pub struct DeleteArgs {
    /// The result to delete, with everything built on it.
    id: String,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

pub async fn delete(a: DeleteArgs) -> anyhow::Result<ExitCode> {
    let b = builder(&a.store, &a.sandbox).await?;
    need_alone(&b)?;
    if b.db().get(&a.id)?.is_none() && b.store().result(&a.id).await?.is_none() {
        eprintln!("obuilder: no result {:?} in this store", a.id);
        return Ok(ExitCode::FAILURE);
    }
    let n = b.delete(&a.id, &print_sink()).await?;
    println!("Removed {n} item{}", if n == 1 { "" } else { "s" });
    Ok(ExitCode::SUCCESS)
}

/// Waits (up to a minute on btrfs) until deleted results have given their space back.
#[derive(clap::Args)]
pub struct WaitArgs {
    /// Wait until the filesystem has freed the deleted results' space (btrfs frees it in
    /// the background, which can take a while).
    #[arg(long)]
    wait_for_space: bool,
}

async fn maybe_wait(b: &obuilder_engine::Builder, w: &WaitArgs) -> anyhow::Result<()> {
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
    let n = b
        .prune("9999-12-31 23:59:59.999", usize::MAX, &print_sink())
        .await?;
    println!("Removed {n} items");
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
    /// (in percent).
    #[arg(long, value_name = "PERCENT", conflicts_with = "before")]
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

/// Parses `--before` into database time text.
pub fn parse_before(s: &str, now: time::OffsetDateTime) -> anyhow::Result<String> {
    let s = s.trim();
    if let Some(unit) = s.chars().last().filter(|c| c.is_ascii_alphabetic()) {
        let n: i64 = s[..s.len() - 1]
            .parse()
            .map_err(|_| anyhow::anyhow!("--before {s:?}: expected a number before `{unit}`"))?;
        let d = match unit {
            's' => time::Duration::seconds(n),
            'm' => time::Duration::minutes(n),
            'h' => time::Duration::hours(n),
            'd' => time::Duration::days(n),
            _ => anyhow::bail!("--before {s:?}: an age ends in s, m, h or d"),
        };
        return Ok(db::format_time(now - d));
    }
    let ok_date = s.len() >= 10
        && s.as_bytes()[4] == b'-'
        && s.as_bytes()[7] == b'-'
        && s[..4]
            .bytes()
            .chain(s[5..7].bytes())
            .chain(s[8..10].bytes())
            .all(|b| b.is_ascii_digit());
    if !ok_date {
        anyhow::bail!("--before {s:?}: expected YYYY-MM-DD[ HH:MM:SS] or an age such as 7d");
    }
    Ok(s.replace('T', " "))
}

pub async fn prune(a: PruneArgs) -> anyhow::Result<ExitCode> {
    let before = a
        .before
        .as_deref()
        .map(|b| parse_before(b, time::OffsetDateTime::now_utc()))
        .transpose()?;
    if let Some(p) = a.keep_free {
        anyhow::ensure!(
            (0.0..=100.0).contains(&p),
            "--keep-free {p}: expected a percentage from 0 to 100"
        );
    }
    let b = builder(&a.store, &a.sandbox).await?;
    need_alone(&b)?;
    let n = match (before, a.keep_free) {
        (Some(before), _) => b.prune(&before, a.limit, &print_sink()).await?,
        (None, Some(p)) => b.prune_until_free(p, &print_sink()).await?,
        (None, None) => unreachable!("clap requires one"),
    };
    maybe_wait(&b, &a.wait).await?;
    println!("Removed {n} items");
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
pub struct DfArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

pub async fn df(a: DfArgs) -> anyhow::Result<ExitCode> {
    let b = builder(&a.store, &a.sandbox).await?;
    let u = b.store().df().await?;
    let gib = |n: u64| n as f64 / (1u64 << 30) as f64;
    println!("store:   {}", b.store().describe());
    println!("results: {}", b.db().count()?);
    let (hits, misses) = b.db().hit_miss()?;
    let rate = if hits + misses > 0 {
        100.0 * hits as f64 / (hits + misses) as f64
    } else {
        0.0
    };
    println!("cache:   {hits} hits, {misses} misses ({rate:.0}% of steps from cache)");
    println!(
        "free:    {:.1}% ({:.1} GiB of {:.1} GiB)",
        u.free_percent(),
        gib(u.free_bytes),
        gib(u.total_bytes)
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn before_accepts_dates_and_ages() {
        let now = time::macros::datetime!(2026-11-22 12:00:00 UTC);
        assert_eq!(parse_before("7d", now).unwrap(), "2026-11-15 12:00:00.000");
        assert_eq!(parse_before("90m", now).unwrap(), "2026-11-22 10:30:00.000");
        assert_eq!(parse_before("2026-11-01", now).unwrap(), "2026-11-01");
        assert_eq!(
            parse_before("2026-11-01T10:00:00", now).unwrap(),
            "2026-11-01 10:00:00"
        );
        assert!(parse_before("yesterday", now).is_err());
        assert!(parse_before("7w", now).is_err());
    }
}
