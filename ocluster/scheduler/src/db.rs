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
";

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
            Ok(())
        })();
        r.map_err(|e| self.err(e))?;
        Ok(state)
    }

    /// Applies a pool's changes in one transaction.
    pub fn apply(&mut self, pool: &str, writes: &[DbWrite]) -> Result<(), DbError> {
        if writes.is_empty() {
            return Ok(());
        }
        let r: rusqlite::Result<()> = (|| {
            let tx = self.conn.transaction()?;
            for w in writes {
                match w {
                    DbWrite::MarkCached { hint, worker } => tx
                        .prepare_cached("INSERT OR REPLACE INTO cached (pool, cache_hint, worker, created) VALUES (?, ?, ?, date('now'))")?
                        .execute(params![pool, hint, worker])?,
                    DbWrite::SetRate { client, rate } => tx
                        .prepare_cached("INSERT OR REPLACE INTO pool_user_rate (pool, user, rate) VALUES (?, ?, ?)")?
                        .execute(params![pool, client, rate])?,
                    DbWrite::RemoveRate { client } => tx
                        .prepare_cached("DELETE FROM pool_user_rate WHERE pool = ? AND user = ?")?
                        .execute(params![pool, client])?,
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
            tx.commit()
        })();
        r.map_err(|e| self.err(e))
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
