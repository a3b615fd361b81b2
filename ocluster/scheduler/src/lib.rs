//! OCluster's scheduler: pools of workers, cache-affinity placement and fair shares between
//! clients ([`pool`], a pure state machine), and the state the original keeps in SQLite
//! ([`db`]).

pub mod db;
pub mod pool;
pub mod service;
pub mod text;

pub use pool::{Costs, DbWrite, Event, Inactive, Item, Pool, PoolError, PoolState};
