//! Per-phase timings of a build, as tracing events on target `obuilder::timing`
//! (`phase`, `ms`, `id`): fetch, hash, snapshot, sandbox, copy, publish (the store's
//! commit), record (the database's row of the new result), lookup. The CLI prints them to
//! stderr with `OBUILDER_TIMINGS=1`; `bench/compare.py` sums them to say where the time
//! goes.

use std::time::Instant;

/// Emits the phase's duration when dropped.
pub struct Phase {
    name: &'static str,
    id: String,
    start: Instant,
}

pub fn phase(name: &'static str, id: &str) -> Phase {
    Phase {
        name,
        id: id.to_string(),
        start: Instant::now(),
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        let ms = self.start.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(target: "obuilder::timing", phase = self.name, ms, id = %self.id);
    }
}
