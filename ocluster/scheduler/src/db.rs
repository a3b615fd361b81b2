//! The scheduler's state, `STATE_DIR/scheduler.db`, with the original's tables and columns
//! exactly (reference/ocluster.md §2.8), so that a scheduler started on an OCaml
//! scheduler's state directory keeps its clients, learned cache hints, rates and paused
//! workers, and the other way round.
//!
//! * `cached(pool, cache_hint, worker, created)`: workers given a job with that hint;
//! * `pool_user_rate(pool, user, rate)`: clients' shares;
//! * `workers(pool, id, paused)`: every known worker and its admin pause;
//! * `sturdy_refs(hash, type, args, created)`: clients' submission caps, by the SHA-256 of
//!   their secret id (type `ocluster-client`, args the client's name).
//!
//! Two tables are this implementation's own (an OCaml scheduler ignores them), so that a
//! restart loses no job and resets no share:
//!
//! * `job_queue(pool, seq, client, priority, fair_start, cache_hint, descr)`: every job
//!   submitted and not yet finished (queued or running), `descr` its `JobDescr` as a
//!   serialized message;
//! * `client_clock(pool, user, next_fair_start)`: each client's fair-share clock;
//! * `hint_cost(pool, cache_hint, cached, seconds)`: what a hint's jobs took, on workers
//!   with the hint cached or not (a moving average).

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

use crate::pool::{DbWrite, PoolState};

/// The `type` of a client's sturdy ref.
pub const CLIENT_TYPE: &str = "ocluster-client";
/// A worker's own registration capability (this implementation's; `args` is
/// `POOL\nNAME`).
pub const WORKER_TYPE: &str = "ocluster-worker";

#[derive(Debug, thiserror::Error)]
#[error("scheduler database {path}: {source}")]
pub struct DbError {
    path: String,
    #[source]
    source: rusqlite::Error,
}

/// Why a client could not be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("Client {0:?} already registered!")]
    Exists(String),
    #[error("Unknown client {0:?}")]
    Unknown(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

pub struct Db {
    conn: Connection,
    path: String,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cached ( pool       TEXT NOT NULL, cache_hint TEXT NOT NULL, worker     TEXT NOT NULL, created    DATETIME NOT NULL, PRIMARY KEY (pool, cache_hint, worker));
CREATE TABLE IF NOT EXISTS pool_user_rate ( pool       TEXT NOT NULL, user       TEXT NOT NULL, rate       REAL NOT NULL, PRIMARY KEY (pool, user));
CREATE TABLE IF NOT EXISTS workers ( pool       TEXT NOT NULL, id         TEXT NOT NULL, paused     BOOLEAN DEFAULT 0, PRIMARY KEY (pool, id));
CREATE TABLE IF NOT EXISTS sturdy_refs ( hash       BLOB NOT NULL, type       TEXT NOT NULL, args       BLOB NOT NULL, created    DATETIME NOT NULL, PRIMARY KEY (hash));
CREATE INDEX IF NOT EXISTS sturdy_refs_rev ON sturdy_refs (type, args);
CREATE TABLE IF NOT EXISTS job_queue ( pool TEXT NOT NULL, seq INTEGER NOT NULL, client TEXT NOT NULL, priority INTEGER NOT NULL, fair_start REAL NOT NULL, cache_hint TEXT NOT NULL, descr BLOB NOT NULL, PRIMARY KEY (pool, seq));
CREATE TABLE IF NOT EXISTS client_clock ( pool TEXT NOT NULL, user TEXT NOT NULL, next_fair_start REAL NOT NULL, PRIMARY KEY (pool, user));
CREATE TABLE IF NOT EXISTS hint_cost ( pool TEXT NOT NULL, cache_hint TEXT NOT NULL, cached BOOLEAN NOT NULL, seconds REAL NOT NULL, PRIMARY KEY (pool, cache_hint, cached));
";

/// A job kept in `job_queue`.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredJob {
    /// Unique among the pool's jobs, in submission order.
    pub seq: u64,
    pub client: String,
    /// A [`crate::pool::Priority`] level.
    pub priority: u8,
    pub fair_start: f64,
    pub cache_hint: String,
    /// The `JobDescr`, as a serialized message.
    pub descr: Vec<u8>,
}

impl Db {
    /// Opens (creating if needed) `dir/scheduler.db`.
    pub fn open(dir: &Path) -> Result<Db, DbError> {
        Db::open_file(&dir.join("scheduler.db"))
    }

    pub fn open_file(path: &Path) -> Result<Db, DbError> {
        let name = path.display().to_string();
        let err = |source| DbError {
            path: name.clone(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        // Queued jobs' descriptions are in it: for the scheduler's user only.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        conn.busy_timeout(std::time::Duration::from_secs(1))
            .map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(Db { conn, path: name })
    }

    /// An in-memory database, for tests.
    pub fn in_memory() -> Result<Db, DbError> {
        let err = |source| DbError {
            path: ":memory:".into(),
            source,
        };
        let conn = Connection::open_in_memory().map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(Db {
            conn,
            path: ":memory:".into(),
        })
    }

    fn err(&self, source: rusqlite::Error) -> DbError {
        DbError {
            path: self.path.clone(),
            source,
        }
    }

    /// What the pool remembers.
    pub fn load_pool(&self, pool: &str) -> Result<PoolState, DbError> {
        let mut state = PoolState::default();
        let r: rusqlite::Result<()> = (|| {
            let mut st = self
                .conn
                .prepare("SELECT cache_hint, worker FROM cached WHERE pool = ?")?;
            let rows = st.query_map([pool], |r| Ok((r.get::<_, String>(0)?, r.get(1)?)))?;
            for row in rows {
                let (hint, worker) = row?;
                state.cached.entry(hint).or_default().insert(worker);
            }
            let mut st = self
                .conn
                .prepare("SELECT user, rate FROM pool_user_rate WHERE pool = ?")?;
            let rows = st.query_map([pool], |r| Ok((r.get::<_, String>(0)?, r.get(1)?)))?;
            for row in rows {
                let (user, rate) = row?;
                state.rates.insert(user, rate);
            }
            let mut st = self
                .conn
                .prepare("SELECT id, paused FROM workers WHERE pool = ?")?;
            let rows = st.query_map([pool], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?))
            })?;
            for row in rows {
                let (id, paused) = row?;
                state.workers.insert(id, paused.unwrap_or(0) != 0);
            }
            let mut st = self
                .conn
                .prepare("SELECT user, next_fair_start FROM client_clock WHERE pool = ?")?;
            let rows = st.query_map([pool], |r| Ok((r.get::<_, String>(0)?, r.get(1)?)))?;
            for row in rows {
                let (user, next) = row?;
                state.clocks.insert(user, next);
            }
            let mut st = self
                .conn
                .prepare("SELECT cache_hint, cached, seconds FROM hint_cost WHERE pool = ?")?;
            let rows = st.query_map([pool], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?, r.get(2)?))
            })?;
            for row in rows {
                let (hint, cached, secs) = row?;
                state.costs.entry(hint).or_default()[usize::from(cached)] = Some(secs);
            }
            Ok(())
        })();
        r.map_err(|e| self.err(e))?;
        Ok(state)
    }

    /// The pool's unfinished jobs, in submission order.
    pub fn load_jobs(&self, pool: &str) -> Result<Vec<StoredJob>, DbError> {
        let r: rusqlite::Result<Vec<StoredJob>> = (|| {
            let mut st = self.conn.prepare(
                "SELECT seq, client, priority, fair_start, cache_hint, descr FROM job_queue WHERE pool = ? ORDER BY seq",
            )?;
            let rows = st.query_map([pool], |r| {
                Ok(StoredJob {
                    seq: r.get::<_, i64>(0)? as u64,
                    client: r.get(1)?,
                    priority: r.get(2)?,
                    fair_start: r.get(3)?,
                    cache_hint: r.get(4)?,
                    descr: r.get(5)?,
                })
            })?;
            rows.collect()
        })();
        r.map_err(|e| self.err(e))
    }

    /// Applies a pool's changes, and its jobs' (`added` are new, `removed` the `seq`s of
    /// jobs that finished), in one transaction.
    pub fn apply_jobs(
        &mut self,
        pool: &str,
        writes: &[DbWrite],
        added: &[StoredJob],
        removed: &[u64],
    ) -> Result<(), DbError> {
        if writes.is_empty() && added.is_empty() && removed.is_empty() {
            return Ok(());
        }
        let r: rusqlite::Result<()> = (|| {
            let tx = self.conn.transaction()?;
            {
                let mut ins = tx.prepare_cached("INSERT OR REPLACE INTO job_queue (pool, seq, client, priority, fair_start, cache_hint, descr) VALUES (?, ?, ?, ?, ?, ?, ?)")?;
                for j in added {
                    ins.execute(params![
                        pool,
                        j.seq as i64,
                        j.client,
                        j.priority,
                        j.fair_start,
                        j.cache_hint,
                        j.descr
                    ])?;
                }
                let mut del =
                    tx.prepare_cached("DELETE FROM job_queue WHERE pool = ? AND seq = ?")?;
                for seq in removed {
                    del.execute(params![pool, *seq as i64])?;
                }
            }
            Self::write(&tx, pool, writes)?;
            tx.commit()
        })();
        r.map_err(|e| self.err(e))
    }

    /// Applies a pool's changes in one transaction.
    pub fn apply(&mut self, pool: &str, writes: &[DbWrite]) -> Result<(), DbError> {
        self.apply_jobs(pool, writes, &[], &[])
    }

    fn write(tx: &rusqlite::Transaction, pool: &str, writes: &[DbWrite]) -> rusqlite::Result<()> {
        // A client's clock moves at each of its submissions: only its last value counts.
        let mut clocks: Vec<(&str, f64)> = Vec::new();
        for w in writes {
            if let DbWrite::SetClock {
                client,
                next_fair_start,
            } = w
            {
                match clocks.iter_mut().find(|(c, _)| c == client) {
                    Some(e) => e.1 = *next_fair_start,
                    None => clocks.push((client, *next_fair_start)),
                }
            }
        }
        for (client, next) in clocks {
            tx.prepare_cached("INSERT OR REPLACE INTO client_clock (pool, user, next_fair_start) VALUES (?, ?, ?)")?
                .execute(params![pool, client, next])?;
        }
        {
            for w in writes {
                match w {
                    DbWrite::MarkCached { hint, worker } => tx
                        .prepare_cached("INSERT OR REPLACE INTO cached (pool, cache_hint, worker, created) VALUES (?, ?, ?, date('now'))")?
                        .execute(params![pool, hint, worker])?,
                    DbWrite::SetRate { client, rate } => tx
                        .prepare_cached("INSERT OR REPLACE INTO pool_user_rate (pool, user, rate) VALUES (?, ?, ?)")?
                        .execute(params![pool, client, rate])?,
                    DbWrite::RemoveRate { client } => {
                        tx.prepare_cached("DELETE FROM client_clock WHERE pool = ? AND user = ?")?
                            .execute(params![pool, client])?;
                        tx.prepare_cached("DELETE FROM pool_user_rate WHERE pool = ? AND user = ?")?
                            .execute(params![pool, client])?
                    }
                    DbWrite::SetClock { .. } => 0,
                    DbWrite::SetCost { hint, cached, seconds } => tx
                        .prepare_cached("INSERT OR REPLACE INTO hint_cost (pool, cache_hint, cached, seconds) VALUES (?, ?, ?, ?)")?
                        .execute(params![pool, hint, cached, seconds])?,
                    DbWrite::EnsureWorker { worker } => tx
                        .prepare_cached("INSERT OR IGNORE INTO workers (pool, id) VALUES (?, ?)")?
                        .execute(params![pool, worker])?,
                    DbWrite::ForgetWorker { worker } => tx
                        .prepare_cached("DELETE FROM workers WHERE pool = ? AND id = ?")?
                        .execute(params![pool, worker])?,
                    DbWrite::SetPaused { worker, paused } => tx
                        .prepare_cached("UPDATE workers SET paused = ? WHERE pool = ? AND id = ?")?
                        .execute(params![i64::from(*paused), pool, worker])?,
                };
            }
        }
        Ok(())
    }

    // ---- sturdy refs -----------------------------------------------------------------

    /// The (type, args) a service id's hash restores to.
    pub fn lookup_hash(&self, hash: &[u8]) -> Result<Option<(String, Vec<u8>)>, DbError> {
        self.conn
            .prepare_cached("SELECT type, args FROM sturdy_refs WHERE hash = ?")
            .and_then(|mut st| {
                st.query_row([hash], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(|e| self.err(e))
    }

    /// The client a secret service id belongs to, if it is (still) registered.
    pub fn client_of_id(&self, id: &[u8]) -> Result<Option<String>, DbError> {
        let hash = Sha256::digest(id);
        Ok(match self.lookup_hash(&hash)? {
            Some((ty, args)) if ty == CLIENT_TYPE => Some(String::from_utf8_lossy(&args).into()),
            _ => None,
        })
    }

    fn client_hashes(&self, name: &str) -> Result<Vec<Vec<u8>>, DbError> {
        let r: rusqlite::Result<Vec<Vec<u8>>> = (|| {
            let mut st = self
                .conn
                .prepare_cached("SELECT hash FROM sturdy_refs WHERE type = ? AND args = ?")?;
            let rows = st.query_map(params![CLIENT_TYPE, name.as_bytes()], |r| r.get(0))?;
            rows.collect()
        })();
        r.map_err(|e| self.err(e))
    }

    pub fn client_exists(&self, name: &str) -> Result<bool, DbError> {
        Ok(!self.client_hashes(name)?.is_empty())
    }

    /// Registers a client under the given secret id (20 random bytes); only its SHA-256
    /// is stored.
    pub fn add_client(&self, name: &str, secret: &[u8]) -> Result<(), ClientError> {
        if self.client_exists(name)? {
            return Err(ClientError::Exists(name.to_string()));
        }
        let hash = Sha256::digest(secret);
        self.conn
            .prepare_cached(
                "INSERT INTO sturdy_refs (hash, type, args, created) VALUES (?, ?, ?, date('now'))",
            )
            .and_then(|mut st| st.execute(params![&hash[..], CLIENT_TYPE, name.as_bytes()]))
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Revokes a client's sturdy ref.
    pub fn remove_client(&self, name: &str) -> Result<(), ClientError> {
        let hashes = self.client_hashes(name)?;
        if hashes.is_empty() {
            return Err(ClientError::Unknown(name.to_string()));
        }
        for h in hashes {
            self.conn
                .prepare_cached("DELETE FROM sturdy_refs WHERE hash = ?")
                .and_then(|mut st| st.execute([h]))
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// The (pool, worker name) a registration secret is for, if it is (still) valid.
    pub fn worker_of_id(&self, id: &[u8]) -> Result<Option<(String, String)>, DbError> {
        let hash = Sha256::digest(id);
        Ok(match self.lookup_hash(&hash)? {
            Some((ty, args)) if ty == WORKER_TYPE => String::from_utf8_lossy(&args)
                .split_once('\n')
                .map(|(p, n)| (p.to_string(), n.to_string())),
            _ => None,
        })
    }

    fn worker_hashes(&self, pool: &str, name: &str) -> Result<Vec<Vec<u8>>, DbError> {
        let args = format!("{pool}\n{name}");
        let r: rusqlite::Result<Vec<Vec<u8>>> = (|| {
            let mut st = self
                .conn
                .prepare_cached("SELECT hash FROM sturdy_refs WHERE type = ? AND args = ?")?;
            let rows = st.query_map(params![WORKER_TYPE, args.as_bytes()], |r| r.get(0))?;
            rows.collect()
        })();
        r.map_err(|e| self.err(e))
    }

    /// Gives worker `name` of `pool` its own registration secret (replacing any earlier
    /// one); only its SHA-256 is stored.
    pub fn add_worker_cap(&self, pool: &str, name: &str, secret: &[u8]) -> Result<(), DbError> {
        for h in self.worker_hashes(pool, name)? {
            self.delete_hash(&h)?;
        }
        let hash = Sha256::digest(secret);
        let args = format!("{pool}\n{name}");
        self.conn
            .prepare_cached(
                "INSERT INTO sturdy_refs (hash, type, args, created) VALUES (?, ?, ?, date('now'))",
            )
            .and_then(|mut st| st.execute(params![&hash[..], WORKER_TYPE, args.as_bytes()]))
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Revokes worker `name`'s registration secrets; the hashes that were revoked.
    pub fn remove_worker_cap(&self, pool: &str, name: &str) -> Result<Vec<Vec<u8>>, DbError> {
        let hashes = self.worker_hashes(pool, name)?;
        for h in &hashes {
            self.delete_hash(h)?;
        }
        Ok(hashes)
    }

    fn delete_hash(&self, hash: &[u8]) -> Result<(), DbError> {
        self.conn
            .prepare_cached("DELETE FROM sturdy_refs WHERE hash = ?")
            .and_then(|mut st| st.execute([hash]))
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Registered clients, sorted by name.
    pub fn list_clients(&self) -> Result<Vec<String>, DbError> {
        let r: rusqlite::Result<Vec<String>> = (|| {
            let mut st = self
                .conn
                .prepare_cached("SELECT args FROM sturdy_refs WHERE type = ? ORDER BY args")?;
            let rows = st.query_map([CLIENT_TYPE], |r| r.get::<_, Vec<u8>>(0))?;
            rows.map(|r| r.map(|b| String::from_utf8_lossy(&b).into_owned()))
                .collect()
        })();
        r.map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(seq: u64, client: &str) -> StoredJob {
        StoredJob {
            seq,
            client: client.into(),
            priority: seq as u8,
            fair_start: seq as f64 * 10.0,
            cache_hint: format!("h{seq}"),
            descr: vec![seq as u8; 3],
        }
    }

    /// Jobs and clocks come back as they were stored, per pool, in submission order; a
    /// revoked client's clock goes with its rate.
    #[test]
    fn jobs_and_clocks_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(dir.path()).unwrap();
        let clock = |c: &str, t| DbWrite::SetClock {
            client: c.into(),
            next_fair_start: t,
        };
        db.apply_jobs(
            "linux",
            &[clock("alice", 5.0), clock("alice", 7.0), clock("bob", 3.0)],
            &[job(3, "alice"), job(1, "alice"), job(2, "bob")],
            &[],
        )
        .unwrap();
        db.apply_jobs("mac", &[], &[job(1, "carol")], &[]).unwrap();
        db.apply_jobs("linux", &[], &[], &[3]).unwrap();
        drop(db);
        let db = Db::open(dir.path()).unwrap();
        assert_eq!(
            db.load_jobs("linux").unwrap(),
            [job(1, "alice"), job(2, "bob")]
        );
        assert_eq!(db.load_jobs("mac").unwrap(), [job(1, "carol")]);
        let state = db.load_pool("linux").unwrap();
        assert_eq!(state.clocks.get("alice"), Some(&7.0));
        assert_eq!(state.clocks.get("bob"), Some(&3.0));
        let mut db = db;
        db.apply(
            "linux",
            &[DbWrite::RemoveRate {
                client: "bob".into(),
            }],
        )
        .unwrap();
        assert_eq!(db.load_pool("linux").unwrap().clocks.get("bob"), None);
    }
}
