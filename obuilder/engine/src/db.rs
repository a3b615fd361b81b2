//! The SQLite database of results, at `<state dir>/db/db.sqlite`.
//!
//! Table `builds` as OBuilder's (id, created, used, rc = children count, parent), so LRU
//! pruning only ever sees leaves; foreign keys are enforced (OBuilder declares but never
//! enables them). Table `stats` keeps the cache hit and miss counters, `file_hashes` the
//! hashes of build-context files by what `stat` says of them. Times are UTC `YYYY-MM-DD HH:MM:SS.mmm` text, which sorts by time.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use time::OffsetDateTime;

/// A transaction that writes, begun `IMMEDIATE`: it takes the write lock at its start,
/// waiting for it as long as the busy timeout. A deferred one that reads first holds a
/// read lock when it comes to write, and SQLite then answers "database is locked" at
/// once rather than wait (the other writer may be waiting for that very read lock): seen
/// when three builders opened a new store at once and each added the results on disk.
fn write_tx(c: &mut Connection) -> rusqlite::Result<rusqlite::Transaction<'_>> {
    c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
}

#[derive(Debug, thiserror::Error)]
#[error("database {path}: {source}")]
pub struct DbError {
    path: String,
    #[source]
    source: rusqlite::Error,
}

/// One row of `builds`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRow {
    pub id: String,
    pub created: String,
    pub used: String,
    pub children: i64,
    pub parent: Option<String>,
}

pub struct Db {
    /// `None` until the first use of a database opened lazily ([`Db::lazy`]).
    conn: Mutex<Option<Connection>>,
    path: String,
    /// Cache hits not yet in the tables (see [`Db::touch`]).
    touches: Touches,
    /// Space set aside for writes on a full disk (see the module's doc).
    reserve: Option<std::path::PathBuf>,
}

/// `db/touches` is folded into the tables once it is this big.
const TOUCHES_FOLD_BYTES: u64 = 64 << 10;

/// One line of `db/touches`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Touch {
    now: String,
    hits: i64,
    misses: i64,
    ids: Vec<String>,
}

/// The lines of `db/touches`; a torn or foreign line is skipped.
fn parse_touches(text: &str) -> Vec<Touch> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let now = f.next()?.to_string();
            let hits = f.next()?.parse().ok()?;
            let misses = f.next()?.parse().ok()?;
            let ids = f
                .next()?
                .split(' ')
                .filter(|i| !i.is_empty())
                .map(str::to_string)
                .collect();
            (now.len() == 23).then_some(Touch {
                now,
                hits,
                misses,
                ids,
            })
        })
        .collect()
}

/// An append-only file of pending lines, under `flock` while read and emptied.
#[derive(Debug)]
struct Touches {
    path: std::path::PathBuf,
}

impl Touches {
    fn open_file(&self) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&self.path)
    }

    /// Appends `line` in one write; returns the file's length after it.
    fn append(&self, line: &[u8]) -> std::io::Result<u64> {
        use std::io::Write;
        let mut f = self.open_file()?;
        // (held until `f` closes)
        flock(&f, rustix::fs::FlockOperation::LockShared)?;
        f.write_all(line)?;
        Ok(f.metadata()?.len())
    }

    /// What is pending, read without a lock (a torn last line is skipped by the parser).
    fn peek(&self) -> std::io::Result<String> {
        match std::fs::read_to_string(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            r => r,
        }
    }

    /// Calls `f` with what is pending, and empties the file if `f` succeeds.
    fn take<T, E>(&self, f: impl FnOnce(&str) -> Result<T, E>) -> std::io::Result<Result<T, E>> {
        use std::io::Read;
        let mut file = self.open_file()?;
        // (held until `file` closes)
        flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        let r = f(&text);
        if r.is_ok() && !text.is_empty() {
            file.set_len(0)?;
        }
        Ok(r)
    }
}

/// Takes `flock(op)` on `f`; closing the file releases it.
fn flock(f: &std::fs::File, op: rustix::fs::FlockOperation) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    rustix::fs::flock(f.as_fd(), op).map_err(Into::into)
}

/// The size of `db/reserve`.
pub const RESERVE_BYTES: u64 = 4 << 20;

/// Keeps `path` as a file of [`RESERVE_BYTES`] if there is room for it (a quarter of the
/// free space at most).
fn keep_reserve(path: &Path) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == RESERVE_BYTES) {
        return;
    }
    let Some(dir) = path.parent() else { return };
    let room = rustix::fs::statvfs(dir).map_or(0, |s| s.f_bavail * s.f_frsize);
    if room < RESERVE_BYTES * 4 {
        return;
    }
    let r = (|| {
        use std::io::Write;
        let mut f = std::fs::File::create(path)?;
        f.write_all(&vec![0u8; RESERVE_BYTES as usize])?;
        f.sync_all()
    })();
    if let Err(e) = r {
        tracing::debug!("cannot keep {}: {e}", path.display());
        let _ = std::fs::remove_file(path);
    }
}

/// `db/damaged`, beside the database at `path`: left when a database opened lazily was
/// found damaged, so that the next process opens, checks and if need be rebuilds it.
pub fn damaged_marker(path: &Path) -> std::path::PathBuf {
    path.with_file_name("damaged")
}

/// Whether the file at `path` begins as an SQLite database does (`SQLite format 3` and a
/// NUL): false for a missing, empty or overwritten one.
pub fn looks_like_sqlite(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 16];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head == b"SQLite format 3\0"
}

/// Whether an error means the database file is damaged (a crash of the machine with
/// `synchronous=OFF`): it is then set aside and rebuilt from the store.
pub fn is_corrupt(e: &DbError) -> bool {
    matches!(
        &e.source,
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

/// Moves a damaged database (and its journal) aside as `db.sqlite.corrupt-N`, keeping it
/// for a post-mortem; returns where it went.
pub fn set_aside(path: &Path) -> std::io::Result<std::path::PathBuf> {
    let mut n = 0;
    let to = loop {
        let to = path.with_extension(format!("sqlite.corrupt-{n}"));
        if !to.exists() {
            break to;
        }
        n += 1;
    };
    std::fs::rename(path, &to)?;
    let journal = path.with_extension("sqlite-journal");
    if journal.exists() {
        std::fs::rename(&journal, to.with_extension(format!("corrupt-{n}-journal")))?;
    }
    Ok(to)
}

/// Whether an error means the disk is full.
fn is_full(e: &rusqlite::Error) -> bool {
    match e {
        // SQLite reports ENOSPC on a write as SQLITE_FULL.
        rusqlite::Error::SqliteFailure(f, _) => f.code == rusqlite::ErrorCode::DiskFull,
        _ => false,
    }
}

/// Now as the database's time text.
pub fn now() -> String {
    format_time(OffsetDateTime::now_utc())
}

pub fn format_time(t: OffsetDateTime) -> String {
    let f = time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3]"
    );
    t.format(&f).unwrap_or_default()
}

/// The schema made by [`Db::open`], in `PRAGMA user_version` (0: a database made before
/// the version was kept, whose tables are checked and made once more). Raise it with any
/// change to the tables.
const SCHEMA_VERSION: i64 = 1;

/// How many context-file hashes the database keeps (the oldest recorded go first).
pub const FILE_HASHES_KEPT: i64 = 200_000;

impl Db {
    /// Opens (and makes or upgrades) the database at `path` now.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let db = Db::lazy(path);
        db.prefetch()?;
        Ok(db)
    }

    /// The database at `path`, opened (and made or upgraded) at its first use: a build
    /// whose steps all come from the cache writes only `db/touches` and never needs it
    /// (opening it, a third of a millisecond, was a tenth of such a build).
    pub fn lazy(path: &Path) -> Db {
        Db {
            conn: Mutex::new(None),
            path: path.display().to_string(),
            touches: Touches {
                path: path.with_file_name("touches"),
            },
            reserve: Some(path.with_file_name("reserve")),
        }
    }

    /// Opens the database now if it is not open yet (e.g. on another thread, ahead of
    /// its first use).
    pub fn prefetch(&self) -> Result<(), DbError> {
        self.with(|_| Ok(()))
    }

    /// Opens the connection and makes the tables (or upgrades them).
    fn connect(&self) -> Result<Connection, DbError> {
        let path = Path::new(&self.path);
        let err = |source| DbError {
            path: self.path.clone(),
            source,
        };
        let mut conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err)?;
        // (No checkpoint on close: for a database left in WAL mode by an older version.)
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )
        .map_err(err)?;
        // A rollback journal (see the module's doc). A database made by an older version
        // in WAL mode switches when no other process has it open.
        self.retrying(&mut conn, |c| {
            c.execute_batch(
                "PRAGMA journal_mode=TRUNCATE;
                 PRAGMA synchronous=OFF;
                 PRAGMA foreign_keys=ON;",
            )?;
            // The tables are made (and old ones dropped) once: parsing the schema's
            // statements on every open cost a fully cached build a quarter of a millisecond.
            let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
            if version == SCHEMA_VERSION {
                return Ok(());
            }
            c.execute_batch(&format!(
                "CREATE TABLE IF NOT EXISTS builds (
                   id TEXT PRIMARY KEY,
                   created TEXT NOT NULL,
                   used TEXT NOT NULL,
                   rc INTEGER NOT NULL,
                   parent TEXT,
                   FOREIGN KEY (parent) REFERENCES builds (id) ON DELETE RESTRICT);
                 CREATE INDEX IF NOT EXISTS lru ON builds (rc, used);
                 CREATE TABLE IF NOT EXISTS stats (
                   key TEXT PRIMARY KEY,
                   value INTEGER NOT NULL);
                 CREATE TABLE IF NOT EXISTS file_hashes (
                   path TEXT PRIMARY KEY,
                   stat TEXT NOT NULL,
                   sha256 TEXT NOT NULL);
                 DROP TABLE IF EXISTS images;
                 PRAGMA user_version={SCHEMA_VERSION};"
            ))
        })?;
        if let Some(reserve) = &self.reserve {
            keep_reserve(reserve);
        }
        Ok(conn)
    }

    /// Opens the database of an existing store without creating or changing anything (for
    /// read-only commands); `None` if there is none at `path`.
    pub fn open_existing(path: &Path) -> Result<Option<Db>, DbError> {
        if !path.exists() {
            return Ok(None);
        }
        let err = |source| DbError {
            path: path.display().to_string(),
            source,
        };
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err)?;
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )
        .map_err(err)?;
        // No reserve is made here, but one left may be used: rolling back a journal that a
        // write on a full disk left behind needs room.
        Ok(Some(Db {
            conn: Mutex::new(Some(conn)),
            ..Db::lazy(path)
        }))
    }

    /// Whether there is room for a write that may be skipped (statistics, hashes): on a
    /// nearly full disk such a write is not even tried, so that it can neither fail
    /// half-way (leaving a journal to roll back) nor use up the reserve.
    fn room_for_extras(&self) -> bool {
        let dir = Path::new(&self.path).parent().unwrap_or(Path::new("/"));
        rustix::fs::statvfs(dir).map_or(true, |s| s.f_bavail * s.f_frsize >= 4 * RESERVE_BYTES)
    }

    /// Runs `f` on the connection, opening it first if it is not open yet.
    fn with<T>(&self, f: impl Fn(&mut Connection) -> rusqlite::Result<T>) -> Result<T, DbError> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let c = match &mut *guard {
            Some(c) => c,
            none => match self.connect() {
                Ok(c) => none.insert(c),
                Err(e) => {
                    // Found damaged at its first use: the next process to open the store
                    // opens it at once, checks it and rebuilds it (`damaged_marker`).
                    if is_corrupt(&e) {
                        let _ = std::fs::write(damaged_marker(Path::new(&self.path)), b"");
                    }
                    return Err(e);
                }
            },
        };
        self.retrying(c, f)
    }

    /// Runs `f` on `c`; if the disk is full (a write, or rolling back a journal a failed
    /// write left), gives up the reserve and runs it once more.
    fn retrying<T>(
        &self,
        c: &mut Connection,
        f: impl Fn(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, DbError> {
        let r = match f(c) {
            Err(e) if is_full(&e) => match &self.reserve {
                Some(reserve) if std::fs::remove_file(reserve).is_ok() => {
                    tracing::warn!(
                        "the disk of {} is full: using the space kept in reserve",
                        self.path
                    );
                    // Let the filesystem count the freed blocks (btrfs frees at commit).
                    rustix::fs::sync();
                    f(c)
                }
                _ => Err(e),
            },
            r => r,
        };
        r.map_err(|source| DbError {
            path: self.path.clone(),
            source,
        })
    }

    /// Whether SQLite finds the database sound (`PRAGMA quick_check`).
    pub fn check(&self) -> Result<bool, DbError> {
        self.with(|c| {
            c.query_row("PRAGMA quick_check", [], |r| r.get::<_, String>(0))
                .map(|v| v == "ok")
        })
    }

    /// Records a new result and counts it as a child of its parent, in one transaction.
    /// A parent missing from the table (a result from before the database) is added first.
    pub fn add(&self, id: &str, parent: Option<&str>, now: &str) -> Result<(), DbError> {
        self.with(|c| {
            let tx = write_tx(c)?;
            self.fold_touches(&tx)?;
            if let Some(p) = parent {
                tx.execute(
                    "INSERT OR IGNORE INTO builds (id, created, used, rc, parent) VALUES (?1, ?2, ?2, 0, NULL)",
                    params![p, now],
                )?;
            }
            let existed: bool = tx
                .query_row("SELECT 1 FROM builds WHERE id = ?1", params![id], |_| Ok(true))
                .optional()?
                .unwrap_or(false);
            if !existed {
                tx.execute(
                    "INSERT INTO builds (id, created, used, rc, parent) VALUES (?1, ?2, ?2, 0, ?3)",
                    params![id, now, parent],
                )?;
                if let Some(p) = parent {
                    tx.execute("UPDATE builds SET rc = rc + 1 WHERE id = ?1", params![p])?;
                }
            }
            tx.commit()
        })
    }

    /// Marks several results used and adds to the hit/miss counters (a build's cache
    /// hits). A fully cached build should cost no disk flush, so this appends one line to
    /// `db/touches` (no fsync) instead of a transaction; the lines are folded into the
    /// tables by the next write that flushes anyway (a result recorded or removed), before
    /// pruning picks its victims, or when the file grows past 64 KiB. A line lost to a
    /// power cut costs only statistics.
    pub fn touch(&self, ids: &[String], now: &str, hits: i64, misses: i64) -> Result<(), DbError> {
        if ids.is_empty() && hits == 0 && misses == 0 {
            return Ok(());
        }
        if !self.room_for_extras() {
            tracing::info!(
                "{}: the disk is nearly full; not recording cache hits",
                self.path
            );
            return Ok(());
        }
        let line = format!("{now}\t{hits}\t{misses}\t{}\n", ids.join(" "));
        let big = match self.touches.append(line.as_bytes()) {
            Ok(len) => len > TOUCHES_FOLD_BYTES,
            Err(e) => {
                tracing::debug!("cannot record cache hits: {e}");
                false
            }
        };
        if big {
            self.with(|c| {
                let tx = write_tx(c)?;
                self.fold_touches(&tx)?;
                tx.commit()
            })?;
        }
        Ok(())
    }

    /// Applies the pending lines of `db/touches` in `tx` and empties the file (under its
    /// lock, so no line is lost to a concurrent append).
    fn fold_touches(&self, tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
        let to_sql = |e: std::io::Error| rusqlite::Error::ToSqlConversionFailure(Box::new(e));
        self.touches
            .take(|text| {
                let mut used = tx.prepare_cached(
                    "UPDATE builds SET used = ?2 WHERE id = ?1 AND used < ?2",
                )?;
                let mut add = tx.prepare_cached(
                    "INSERT INTO stats (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = value + ?2",
                )?;
                for t in parse_touches(text) {
                    for id in &t.ids {
                        used.execute(params![id, t.now])?;
                    }
                    for (k, v) in [("cache_hits", t.hits), ("cache_misses", t.misses)] {
                        if v != 0 {
                            add.execute(params![k, v])?;
                        }
                    }
                }
                Ok(())
            })
            .map_err(to_sql)?
    }

    /// Every recorded hash of a file under `dir` (an absolute path): path → (stat, sha256).
    pub fn file_hashes_under(
        &self,
        dir: &str,
    ) -> Result<std::collections::HashMap<String, (String, String)>, DbError> {
        let lo = format!("{}/", dir.trim_end_matches('/'));
        // The next string after every one that starts with `lo`.
        let hi = format!("{}0", dir.trim_end_matches('/'));
        self.with(|c| {
            let mut s = c.prepare_cached(
                "SELECT path, stat, sha256 FROM file_hashes WHERE path >= ?1 AND path < ?2",
            )?;
            let rows = s.query_map(params![lo, hi], |r| {
                Ok((r.get::<_, String>(0)?, (r.get(1)?, r.get(2)?)))
            })?;
            rows.collect()
        })
    }

    /// Records context files' hashes (path, stat key, sha256) in one transaction, keeping
    /// the table to the most recent `FILE_HASHES_KEPT` rows.
    pub fn put_file_hashes(&self, rows: &[(String, String, String)]) -> Result<(), DbError> {
        if rows.is_empty() || !self.room_for_extras() {
            return Ok(());
        }
        self.with(|c| {
            let tx = write_tx(c)?;
            {
                let mut s = tx.prepare_cached(
                    "INSERT OR REPLACE INTO file_hashes (path, stat, sha256) VALUES (?1, ?2, ?3)",
                )?;
                for (p, k, h) in rows {
                    s.execute(params![p, k, h])?;
                }
                let max: i64 =
                    tx.query_row("SELECT coalesce(max(rowid), 0) FROM file_hashes", [], |r| {
                        r.get(0)
                    })?;
                if max > FILE_HASHES_KEPT {
                    tx.execute(
                        "DELETE FROM file_hashes WHERE rowid <= ?1",
                        params![max - FILE_HASHES_KEPT],
                    )?;
                }
            }
            tx.commit()
        })
    }

    /// Cache hits and misses recorded since the store was made.
    pub fn hit_miss(&self) -> Result<(i64, i64), DbError> {
        self.with(|c| {
            let get = |k: &str| -> rusqlite::Result<i64> {
                Ok(
                    c.query_row("SELECT value FROM stats WHERE key = ?1", params![k], |r| {
                        r.get(0)
                    })
                    .optional()?
                    .unwrap_or(0),
                )
            };
            Ok((get("cache_hits")?, get("cache_misses")?))
        })
        .map(|(h, m)| {
            // Plus what is still pending in `db/touches`.
            let pending = self
                .touches
                .peek()
                .map(|t| parse_touches(&t))
                .unwrap_or_default();
            (
                h + pending.iter().map(|t| t.hits).sum::<i64>(),
                m + pending.iter().map(|t| t.misses).sum::<i64>(),
            )
        })
    }

    /// A result's row, its `used` time counting hits still pending in `db/touches`.
    pub fn get(&self, id: &str) -> Result<Option<BuildRow>, DbError> {
        let r = self.with(|c| {
            c.query_row(
                "SELECT id, created, used, rc, parent FROM builds WHERE id = ?1",
                params![id],
                row,
            )
            .optional()
        })?;
        Ok(r.map(|mut r| {
            let pending = self
                .touches
                .peek()
                .map(|t| parse_touches(&t))
                .unwrap_or_default();
            for t in pending {
                if t.ids.contains(&r.id) && t.now > r.used {
                    r.used = t.now;
                }
            }
            r
        }))
    }

    pub fn children(&self, id: &str) -> Result<Vec<String>, DbError> {
        self.with(|c| {
            let mut s = c.prepare("SELECT id FROM builds WHERE parent = ?1 ORDER BY id")?;
            let rows = s.query_map(params![id], |r| r.get(0))?;
            rows.collect()
        })
    }

    /// Removes a row (which must have no children) and uncounts it from its parent.
    pub fn delete(&self, id: &str) -> Result<(), DbError> {
        self.with(|c| {
            let tx = write_tx(c)?;
            self.fold_touches(&tx)?;
            let parent: Option<Option<String>> = tx
                .query_row(
                    "SELECT parent FROM builds WHERE id = ?1",
                    params![id],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(parent) = parent {
                tx.execute("DELETE FROM builds WHERE id = ?1", params![id])?;
                if let Some(p) = parent {
                    tx.execute("UPDATE builds SET rc = rc - 1 WHERE id = ?1", params![p])?;
                }
            }
            tx.commit()
        })
    }

    /// Leaves (no children) last used before `before` (any time with `None`), least
    /// recently used first.
    pub fn lru(
        &self,
        before: Option<OffsetDateTime>,
        limit: usize,
    ) -> Result<Vec<String>, DbError> {
        // Past every time the database holds.
        let before = before.map_or_else(|| "9999-12-31 23:59:59.999".to_string(), format_time);
        self.with(|c| {
            // Recent cache hits count: fold them in before choosing.
            let tx = write_tx(c)?;
            self.fold_touches(&tx)?;
            tx.commit()?;
            let mut s = c.prepare(
                "SELECT id FROM builds WHERE rc = 0 AND used < ?1 ORDER BY used ASC, rowid ASC LIMIT ?2",
            )?;
            let rows = s.query_map(params![before, limit as i64], |r| r.get(0))?;
            rows.collect()
        })
    }

    pub fn count(&self) -> Result<i64, DbError> {
        self.with(|c| c.query_row("SELECT COUNT(*) FROM builds", [], |r| r.get(0)))
    }

    pub fn all(&self) -> Result<Vec<BuildRow>, DbError> {
        self.with(|c| {
            let mut s =
                c.prepare("SELECT id, created, used, rc, parent FROM builds ORDER BY rowid")?;
            let rows = s.query_map([], row)?;
            rows.collect()
        })
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BuildRow> {
    Ok(BuildRow {
        id: r.get(0)?,
        created: r.get(1)?,
        used: r.get(2)?,
        children: r.get(3)?,
        parent: r.get(4)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that holds the write lock makes another process's `add` wait for it (up
    /// to the busy timeout), not fail with "database is locked", even for a row whose
    /// transaction reads before it writes (a result without a parent).
    #[test]
    fn an_add_waits_for_another_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let db = Db::open(&path).unwrap();
        db.add("base", None, "2026-01-01 00:00:00.000").unwrap();
        let other = Connection::open(&path).unwrap();
        other
            .execute_batch("BEGIN IMMEDIATE; UPDATE builds SET used = used WHERE id = 'base';")
            .unwrap();
        let adding = std::thread::spawn(move || db.add("new", None, "2026-01-01 00:00:01.000"));
        std::thread::sleep(std::time::Duration::from_millis(300));
        other.execute_batch("COMMIT").unwrap();
        adding
            .join()
            .unwrap()
            .expect("the add waited for the other writer");
        let db = Db::open(&path).unwrap();
        assert!(db.get("new").unwrap().is_some());
    }

    #[test]
    fn file_hashes_by_directory_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db.sqlite")).unwrap();
        let row = |p: &str, h: &str| (p.to_string(), "k".to_string(), h.to_string());
        db.put_file_hashes(&[
            row("/ctx/a", "1"),
            row("/ctx/sub/b", "2"),
            row("/ctx2/c", "3"),
            row("/ctx-b/d", "4"),
            row("/ct/e", "5"),
        ])
        .unwrap();
        let mut got: Vec<String> = db.file_hashes_under("/ctx").unwrap().into_keys().collect();
        got.sort();
        assert_eq!(got, ["/ctx/a", "/ctx/sub/b"]);
        assert_eq!(db.file_hashes_under("/ctx/").unwrap().len(), 2);
        // Re-recording replaces; the table keeps the newest rows.
        db.put_file_hashes(&[row("/ctx/a", "9")]).unwrap();
        assert_eq!(db.file_hashes_under("/ctx").unwrap()["/ctx/a"].1, "9");
    }

    #[test]
    fn children_counts_and_lru_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db.sqlite")).unwrap();
        db.add("base", None, "2026-01-01 00:00:00.000").unwrap();
        db.add("a", Some("base"), "2026-01-01 00:00:01.000")
            .unwrap();
        db.add("b", Some("a"), "2026-01-01 00:00:02.000").unwrap();
        db.add("b", Some("a"), "2026-01-01 00:00:03.000").unwrap(); // re-add keeps counts
        assert_eq!(db.get("a").unwrap().unwrap().children, 1);
        assert_eq!(
            db.lru(Some(time::macros::datetime!(2027-01-01 00:00 UTC)), 10)
                .unwrap(),
            ["b"]
        );
        assert!(
            db.delete("a").is_err(),
            "foreign keys forbid removing a parent"
        );
        db.delete("b").unwrap();
        assert_eq!(db.get("a").unwrap().unwrap().children, 0);
        assert_eq!(
            db.lru(Some(time::macros::datetime!(2027-01-01 00:00 UTC)), 10)
                .unwrap(),
            ["a"]
        );
        assert_eq!(
            db.lru(Some(time::macros::datetime!(2026-01-01 00:00:00.5 UTC)), 10)
                .unwrap(),
            Vec::<String>::new()
        );
        // Hits are pending in `db/touches` (no transaction), yet counted at once.
        db.touch(
            &["a".into(), "gone".into()],
            "2026-06-01 00:00:00.000",
            1,
            2,
        )
        .unwrap();
        db.touch(&[], "2026-06-01 00:00:00.000", 0, 0).unwrap();
        assert_eq!(db.hit_miss().unwrap(), (1, 2));
        assert_eq!(
            db.get("a").unwrap().unwrap().used,
            "2026-06-01 00:00:00.000"
        );
        assert_eq!(db.count().unwrap(), 2);
        assert_eq!(db.lru(None, 10).unwrap(), ["a"]);
        // Pruning folded them into the tables.
        assert_eq!(std::fs::read(dir.path().join("touches")).unwrap(), b"");
        assert_eq!(db.hit_miss().unwrap(), (1, 2));
        assert_eq!(
            db.get("a").unwrap().unwrap().used,
            "2026-06-01 00:00:00.000"
        );
    }

    #[test]
    fn torn_touch_lines_are_skipped() {
        let t = parse_touches("2026-06-01 00:00:00.000\t1\t0\tx y\ngarbage\n2026-06\t1");
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].ids, ["x", "y"]);
    }
}
