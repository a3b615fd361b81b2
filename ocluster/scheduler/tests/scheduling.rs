//! The scheduler as transcripts, with a fake clock: every case of the original's
//! `test/test_scheduling.ml` (same steps, costs 2 cached / 10 not, the clock starting at
//! 1.0), checked against the same `dump` output; `settle` stands where the original
//! yields to Lwt. Plus cases the original does not cover: cancel while queued on the
//! backlog, ticket release, a worker reconnecting under its name, and the database.

use std::borrow::Cow;
use std::collections::HashMap;

use ocluster_scheduler::db::Db;
use ocluster_scheduler::pool::{Event, Inactive, PopId, TicketId, WorkerId};
use ocluster_scheduler::{Costs, Item, Pool, PoolError};

#[derive(Debug)]
struct Job {
    name: String,
    hint: String,
}

impl Item for Job {
    fn cache_hint(&self) -> &str {
        &self.hint
    }
    fn label(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.name)
    }
}

fn job(name: &str, hint: &str) -> Job {
    Job {
        name: name.into(),
        hint: hint.into(),
    }
}

const COSTS: Costs = Costs {
    cached: 2,
    non_cached: 10,
};

struct T {
    pool: Pool<Job>,
    db: Db,
    now: f64,
    popped: HashMap<PopId, Result<String, String>>,
}

impl T {
    fn new(name: &str) -> T {
        let db = Db::in_memory().unwrap();
        T::with_db(name, db)
    }

    fn with_db(name: &str, db: Db) -> T {
        let state = db.load_pool(name).unwrap();
        T {
            pool: Pool::new(name, COSTS, state),
            db,
            now: 1.0,
            popped: HashMap::new(),
        }
    }

    /// Applies database writes and records answers to pops.
    fn collect(&mut self) {
        let writes = self.pool.take_writes();
        let name = self.pool.name().to_string();
        self.db.apply(&name, &writes).unwrap();
        for e in self.pool.take_events() {
            match e {
                Event::Assigned { pop, item, .. } => {
                    self.popped.insert(pop, Ok(item.name));
                }
                Event::PopFailed { pop } => {
                    self.popped.insert(pop, Err("finished".into()));
                }
            }
        }
    }

    fn register(&mut self, name: &str) -> WorkerId {
        let w = self.pool.register(name, 1).unwrap();
        self.collect();
        w
    }

    fn activate(&mut self, w: WorkerId) {
        self.pool.set_active(w, Inactive::WORKER, true);
        self.collect();
    }

    fn deactivate(&mut self, w: WorkerId) {
        self.pool.set_active(w, Inactive::WORKER, false);
        self.collect();
    }

    fn pop(&mut self, w: WorkerId) -> PopId {
        let p = self.pool.pop(w);
        self.collect();
        p
    }

    fn submit(&mut self, client: &str, name: &str, hint: &str, urgent: bool) -> TicketId {
        let (t, _) = self.pool.submit(client, job(name, hint), urgent, self.now);
        self.collect();
        t
    }

    fn set_rate(&mut self, client: &str, rate: f64) {
        self.pool.set_rate(client, rate, self.now).unwrap();
        self.collect();
    }

    fn release(&mut self, w: WorkerId) {
        self.pool.release(w);
        self.collect();
    }

    fn pause(&mut self) {
        self.pool.settle();
        self.collect();
    }

    fn state(&self, p: PopId) -> String {
        match self.popped.get(&p) {
            None => "pending".into(),
            Some(Ok(j)) => j.clone(),
            Some(Err(e)) => e.clone(),
        }
    }

    fn dump(&self) -> String {
        self.pool.dump(self.now)
    }

    /// Pops until nothing is left, then disconnects the worker (the original's
    /// `flush_queue`).
    fn flush(&mut self, w: WorkerId) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..1000 {
            let p = self.pop(w);
            self.pause();
            if !self.popped.contains_key(&p) {
                self.release(w);
                self.pause();
                return out;
            }
            out.push(format!("Flush {}", self.state(p)));
        }
        panic!("the queue never emptied");
    }
}

fn expect(actual: String, expected: &str) {
    let expected: Vec<&str> = expected
        .trim_start_matches('\n')
        .trim_end()
        .lines()
        .collect();
    let indent = expected
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let expected: Vec<String> = expected
        .iter()
        .map(|l| l.get(indent..).unwrap_or("").trim_end().to_string())
        .collect();
    let actual: Vec<String> = actual.lines().map(|l| l.trim_end().to_string()).collect();
    assert_eq!(
        actual.join("\n"),
        expected.join("\n"),
        "\n--- actual ---\n{}\n",
        actual.join("\n")
    );
}

#[test]
fn simple() {
    let mut t = T::new("simple");
    let w1 = t.register("worker-1");
    let w2 = t.register("worker-2");
    t.activate(w1);
    t.activate(w2);
    let w1a = t.pop(w1);
    let w2a = t.pop(w2);
    t.submit("u1", "job1", "", false);
    t.submit("u1", "job2", "", false);
    t.submit("u1", "job3", "", false);
    t.pause();
    assert_eq!(t.state(w1a), "job1");
    assert_eq!(t.state(w2a), "job2");
    t.release(w2);
    assert_eq!(t.flush(w1), ["Flush job3"]);
}

#[test]
fn cached_scheduling() {
    let mut t = T::new("cached_scheduling");
    let w1 = t.register("worker-1");
    let w2 = t.register("worker-2");
    t.activate(w1);
    t.activate(w2);
    let w1a = t.pop(w1);
    let w2a = t.pop(w2);
    expect(
        t.dump(),
        "
        capacity: 2
        queue: (ready) [worker-2 worker-1]
        registered:
          worker-1 (0): [] (0 running)
          worker-2 (0): [] (0 running)
        disconnected:
        clients:
        cached:
        ",
    );
    t.set_rate("u1", 2.0);
    t.submit("u1", "job1", "a", false);
    t.submit("u1", "job2", "b", false);
    t.submit("u1", "job3", "a", false);
    t.submit("u1", "job4", "a", false);
    t.submit("u1", "job5", "c", false);
    expect(
        t.dump(),
        "
        capacity: 2
        queue: (backlog) [u1:job5@12s u1:job4@11s u1:job3@10s]
        registered:
          worker-1 (10): [u1:job1@0s(10)] (0 running)
          worker-2 (10): [u1:job2@5s(10)] (0 running)
        disconnected:
        clients: u1(2)+17s
        cached: a: [worker-1], b: [worker-2]
        ",
    );
    t.pause();
    expect(
        t.dump(),
        "
        capacity: 2
        queue: (backlog) [u1:job5@12s u1:job4@11s u1:job3@10s]
        registered:
          worker-1 (0): [] (1 running)
          worker-2 (0): [] (1 running)
        disconnected:
        clients: u1(2)+17s
        cached: a: [worker-1], b: [worker-2]
        ",
    );
    assert_eq!(t.state(w1a), "job1");
    assert_eq!(t.state(w2a), "job2");
    // Worker 2 asks for another job, but the next two are better done on worker-1.
    t.pool.job_finished(w2);
    let w2b = t.pop(w2);
    expect(
        t.dump(),
        "
        capacity: 2
        queue: (backlog) []
        registered:
          worker-1 (4): [u1:job4@11s(2) u1:job3@10s(2)] (1 running)
          worker-2 (0): [] (1 running)
        disconnected:
        clients: u1(2)+17s
        cached: a: [worker-1], b: [worker-2], c: [worker-2]
        ",
    );
    assert_eq!(t.state(w2b), "job5");
    // Worker 1 leaves. Its two queued jobs get reassigned.
    t.pool.job_finished(w2);
    let w2c = t.pop(w2);
    assert_eq!(t.state(w2c), "pending");
    t.release(w1);
    t.pause();
    expect(
        t.dump(),
        "
        capacity: 1
        queue: (backlog) [u1:job4@11s]
        registered:
          worker-2 (0): [] (1 running)
        disconnected:
          worker-1
        clients: u1(2)+17s
        cached: a: [worker-1; worker-2], b: [worker-2], c: [worker-2]
        ",
    );
    assert_eq!(t.state(w2c), "job3");
    t.pool.job_finished(w2);
    let w2d = t.pop(w2);
    assert_eq!(t.state(w2d), "job4");
    t.now += 20.0;
    t.release(w2);
    expect(
        t.dump(),
        "
        capacity: 0
        queue: (backlog) []
        registered:
        disconnected:
          worker-1
          worker-2
        clients: u1(2)
        cached: a: [worker-1; worker-2], b: [worker-2], c: [worker-2]
        ",
    );
}

#[test]
fn unbalanced() {
    let mut t = T::new("unbalanced");
    let w1 = t.register("worker-1");
    let w2 = t.register("worker-2");
    t.activate(w1);
    t.activate(w2);
    t.set_rate("u1", 2.0);
    for i in 1..=8 {
        t.submit("u1", &format!("job{i}"), "a", false);
    }
    let _ = t.pop(w1);
    let w2a = t.pop(w2);
    t.pause();
    expect(
        t.dump(),
        "
        capacity: 2
        queue: (backlog) []
        registered:
          worker-1 (12): [u1:job7@10s(2) u1:job6@9s(2) u1:job5@8s(2) u1:job4@7s(2)
                          u1:job3@6s(2) u1:job2@5s(2)] (1 running)
          worker-2 (0): [] (1 running)
        disconnected:
        clients: u1(2)+12s
        cached: a: [worker-1; worker-2]
        ",
    );
    assert_eq!(t.state(w2a), "job8");
    t.release(w1);
    assert_eq!(
        t.flush(w2),
        [
            "Flush job2",
            "Flush job3",
            "Flush job4",
            "Flush job5",
            "Flush job6",
            "Flush job7"
        ]
    );
}

#[test]
fn no_workers() {
    let mut t = T::new("no_workers");
    t.submit("u1", "job1", "a", false);
    t.submit("u1", "job2", "a", false);
    let w1 = t.register("worker-1");
    t.activate(w1);
    let _ = t.pop(w1);
    t.release(w1);
    t.pause();
    expect(
        t.dump(),
        "
        capacity: 0
        queue: (backlog) [u1:job2@10s]
        registered:
        disconnected:
          worker-1
        clients: u1(1)+12s
        cached: a: [worker-1]
        ",
    );
    let w1 = t.register("worker-1");
    t.activate(w1);
    assert_eq!(t.flush(w1), ["Flush job2"]);
}

/// Learned cache hints survive a restart of the scheduler (through the database).
#[test]
fn persist() {
    let mut t = T::new("persist");
    let w1 = t.register("worker-1");
    t.activate(w1);
    t.submit("u1", "job1", "a", false);
    let _ = t.pop(w1);
    t.release(w1);
    // A new scheduler on the same database.
    let mut t = T::with_db("persist", t.db);
    let w2 = t.register("worker-2");
    t.activate(w2);
    let w2a = t.pop(w2);
    let w1 = t.register("worker-1");
    t.activate(w1);
    let w1a = t.pop(w1);
    t.submit("u1", "job2", "a", false);
    t.pause();
    assert_eq!(t.state(w1a), "job2");
    assert_eq!(t.state(w2a), "pending");
    t.release(w1);
    t.release(w2);
    t.pause();
    assert_eq!(t.state(w2a), "finished");
}

#[test]
fn urgent() {
    let mut t = T::new("urgent");
    t.submit("u1", "job1", "a", false);
    t.submit("u1", "job2", "a", true);
    t.submit("u1", "job3", "a", true);
    t.submit("u1", "job4", "b", false);
    let w1 = t.register("worker-1");
    t.activate(w1);
    let w1a = t.pop(w1);
    assert_eq!(t.state(w1a), "job2");
    let w2 = t.register("worker-2");
    t.activate(w2);
    let w2a = t.pop(w2);
    assert_eq!(t.state(w2a), "job4");
    // Worker 1 leaves: jobs 1 and 3 are pushed back, keeping their urgency.
    t.release(w1);
    expect(
        t.dump(),
        "
        capacity: 1
        queue: (backlog) [u1:job1@0s u1:job3@12s+urgent]
        registered:
          worker-2 (0): [] (1 running)
        disconnected:
          worker-1
        clients: u1(1)+24s
        cached: a: [worker-1], b: [worker-2]
        ",
    );
    // Urgent job 5 goes ahead of job 1, but behind the older urgent job 3.
    t.submit("u1", "job5", "b", true);
    assert_eq!(t.flush(w2), ["Flush job3", "Flush job5", "Flush job1"]);
}

#[test]
fn urgent_worker() {
    let mut t = T::new("urgent-worker");
    t.submit("u1", "job1", "a", true);
    t.submit("u1", "job2", "a", false);
    t.submit("u1", "job3", "b", false);
    let w1 = t.register("worker-1");
    t.activate(w1);
    let w1a = t.pop(w1);
    assert_eq!(t.state(w1a), "job1");
    let w2 = t.register("worker-2");
    t.activate(w2);
    let w2a = t.pop(w2);
    assert_eq!(t.state(w2a), "job3");
    expect(
        t.dump(),
        "
        capacity: 2
        queue: (backlog) []
        registered:
          worker-1 (2): [u1:job2@10s(2)] (1 running)
          worker-2 (0): [] (1 running)
        disconnected:
        clients: u1(1)+22s
        cached: a: [worker-1], b: [worker-2]
        ",
    );
    t.set_rate("u1", 2.0);
    t.submit("u1", "job4", "a", true);
    t.submit("u1", "job5", "b", false);
    t.submit("u1", "job6", "a", true);
    let w2b = t.pop(w2);
    assert_eq!(t.state(w2b), "job5");
    expect(
        t.dump(),
        "
        capacity: 2
        queue: (backlog) []
        registered:
          worker-1 (6): [u1:job2@10s(2) u1:job6@24s(2+urgent) u1:job4@22s(2+urgent)] (1 running)
          worker-2 (0): [] (2 running)
        disconnected:
        clients: u1(2)+25s
        cached: a: [worker-1], b: [worker-2]
        ",
    );
    assert_eq!(t.flush(w1), ["Flush job4", "Flush job6", "Flush job2"]);
}

#[test]
fn inactive() {
    let mut t = T::new("inactive");
    let w1 = t.register("worker-1");
    t.activate(w1);
    let w1a = t.pop(w1);
    t.submit("u1", "job1", "a", false);
    t.submit("u1", "job2", "a", false);
    let w2 = t.register("worker-2");
    t.activate(w2);
    let w2a = t.pop(w2);
    t.pause();
    expect(
        t.dump(),
        "
        capacity: 2
        queue: (ready) [worker-2]
        registered:
          worker-1 (2): [u1:job2@10s(2)] (1 running)
          worker-2 (0): [] (0 running)
        disconnected:
        clients: u1(1)+12s
        cached: a: [worker-1]
        ",
    );
    // Deactivate worker-1: its queued job is reassigned.
    t.deactivate(w1);
    expect(
        t.dump(),
        "
        capacity: 2
        queue: (ready) []
        registered:
          worker-1 (0): (inactive: worker pause) (1 running)
          worker-2 (10): [u1:job2@10s(10)] (0 running)
        disconnected:
        clients: u1(1)+12s
        cached: a: [worker-1; worker-2]
        ",
    );
    t.pause();
    assert_eq!(t.state(w1a), "job1");
    assert_eq!(t.state(w2a), "job2");
    t.set_rate("u1", 2.0);
    t.submit("u1", "job3", "a", false);
    t.deactivate(w2);
    expect(
        t.dump(),
        "
        capacity: 2
        queue: (backlog) [u1:job3@12s]
        registered:
          worker-1 (0): (inactive: worker pause) (1 running)
          worker-2 (0): (inactive: worker pause) (1 running)
        disconnected:
        clients: u1(2)+13s
        cached: a: [worker-1; worker-2]
        ",
    );
    t.activate(w2);
    t.release(w1);
    assert_eq!(t.flush(w2), ["Flush job3"]);
}

#[test]
fn cancel_worker_queue() {
    let mut t = T::new("cancel_worker_queue");
    let w1 = t.register("worker-1");
    let w2 = t.register("worker-2");
    t.activate(w1);
    t.activate(w2);
    let w1a = t.pop(w1);
    let w2a = t.pop(w2);
    t.set_rate("u1", 2.0);
    t.submit("u1", "job1", "a", false);
    t.pause();
    let j2 = t.submit("u1", "job2", "a", false);
    let j3 = t.submit("u1", "job3", "a", false);
    let j4 = t.submit("u1", "job4", "b", false);
    assert!(t.pool.cancel(j4).is_ok());
    expect(
        t.dump(),
        "
        capacity: 2
        queue: (ready) []
        registered:
          worker-1 (4): [u1:job3@6s(2) u1:job2@5s(2)] (1 running)
          worker-2 (0): [] (0 running)
        disconnected:
        clients: u1(2)+12s
        cached: a: [worker-1], b: [worker-2]
        ",
    );
    assert!(t.pool.cancel(j2).is_ok());
    expect(
        t.dump(),
        "
        capacity: 2
        queue: (ready) []
        registered:
          worker-1 (2): [u1:job3@6s(2)] (1 running)
          worker-2 (0): [] (0 running)
        disconnected:
        clients: u1(2)+12s
        cached: a: [worker-1], b: [worker-2]
        ",
    );
    t.release(w2);
    t.deactivate(w1);
    expect(
        t.dump(),
        "
        capacity: 1
        queue: (backlog) [u1:job3@6s]
        registered:
          worker-1 (0): (inactive: worker pause) (1 running)
        disconnected:
          worker-2
        clients: u1(2)+12s
        cached: a: [worker-1], b: [worker-2]
        ",
    );
    assert!(t.pool.cancel(j3).is_ok());
    t.release(w1);
    expect(
        t.dump(),
        "
        capacity: 0
        queue: (backlog) []
        registered:
        disconnected:
          worker-1
          worker-2
        clients: u1(2)+12s
        cached: a: [worker-1], b: [worker-2]
        ",
    );
    assert_eq!(t.state(w1a), "job1");
    assert_eq!(t.state(w2a), "pending");
    assert_eq!(t.pool.cancel(j3).unwrap_err(), PoolError::NotQueued);
}

#[test]
fn push_back() {
    let mut t = T::new("push_back");
    let w1 = t.register("worker-1");
    let w2 = t.register("worker-2");
    t.activate(w1);
    let _ = t.pop(w1);
    let _ = t.pop(w2);
    t.set_rate("u1", 2.0);
    t.submit("u1", "job1", "a", false);
    t.pause();
    t.submit("u1", "job2", "a", false);
    t.submit("u1", "job3", "a", false);
    t.activate(w2);
    t.pause();
    expect(
        t.dump(),
        "
        capacity: 2
        queue: (ready) [worker-2]
        registered:
          worker-1 (4): [u1:job3@6s(2) u1:job2@5s(2)] (1 running)
          worker-2 (0): [] (0 running)
        disconnected:
        clients: u1(2)+7s
        cached: a: [worker-1]
        ",
    );
    t.release(w2);
    t.deactivate(w1);
    expect(
        t.dump(),
        "
        capacity: 1
        queue: (backlog) [u1:job3@6s u1:job2@5s]
        registered:
          worker-1 (0): (inactive: worker pause) (1 running)
        disconnected:
          worker-2
        clients: u1(2)+7s
        cached: a: [worker-1]
        ",
    );
    t.activate(w1);
    assert_eq!(t.flush(w1), ["Flush job2", "Flush job3"]);
}

#[test]
fn fairness() {
    let mut t = T::new("fairness");
    let w1 = t.register("worker-1");
    let w2 = t.register("worker-2");
    t.pool.touch_client("alice", t.now);
    t.pool.touch_client("bob", t.now);
    t.set_rate("alice", 2.0);
    t.set_rate("bob", 2.0);
    t.activate(w1);
    t.activate(w2);
    let w1a = t.pop(w1);
    let w2a = t.pop(w2);
    for j in ["a1", "a2", "a3"] {
        t.submit("alice", j, "", false);
    }
    for j in ["b1", "b2", "b3"] {
        t.submit("bob", j, "", false);
    }
    t.pause();
    assert_eq!(t.state(w1a), "a1");
    assert_eq!(t.state(w2a), "a2");
    // Bob's jobs are not all last.
    expect(
        t.dump(),
        "
        capacity: 2
        queue: (backlog) [bob:b3@10s alice:a3@10s bob:b2@5s bob:b1@0s]
        registered:
          worker-1 (0): [] (1 running)
          worker-2 (0): [] (1 running)
        disconnected:
        clients: alice(2)+15s bob(2)+15s
        cached: : [worker-1; worker-2]
        ",
    );
    t.release(w2);
    assert_eq!(
        t.flush(w1),
        ["Flush b1", "Flush b2", "Flush a3", "Flush b3"]
    );
}

#[test]
fn fairness_rates() {
    let mut t = T::new("fairness_rates");
    let w1 = t.register("worker-1");
    let w2 = t.register("worker-2");
    t.set_rate("alice", 5.0);
    t.set_rate("bob", 1.0);
    t.activate(w1);
    t.activate(w2);
    let w1a = t.pop(w1);
    let w2a = t.pop(w2);
    for j in ["a1", "a2", "a3"] {
        t.submit("alice", j, "", false);
    }
    for j in ["b1", "b2", "b3"] {
        t.submit("bob", j, "", false);
    }
    t.pause();
    assert_eq!(t.state(w1a), "a1");
    assert_eq!(t.state(w2a), "a2");
    expect(
        t.dump(),
        "
        capacity: 2
        queue: (backlog) [bob:b3@20s bob:b2@10s alice:a3@4s bob:b1@0s]
        registered:
          worker-1 (0): [] (1 running)
          worker-2 (0): [] (1 running)
        disconnected:
        clients: alice(5)+6s bob(1)+30s
        cached: : [worker-1; worker-2]
        ",
    );
    t.release(w2);
    assert_eq!(
        t.flush(w1),
        ["Flush b1", "Flush a3", "Flush b2", "Flush b3"]
    );
}

#[test]
fn inactive_reasons() {
    let mut t = T::new("simple");
    let w1 = t.register("worker-1");
    let head = |reg: &str| {
        format!(
            "
            capacity: 1
            queue: (backlog) []
            registered:
              worker-1 (0): {reg} (0 running)
            disconnected:
            clients:
            cached:
            "
        )
    };
    // Workers start paused.
    expect(t.dump(), &head("(inactive: worker pause)"));
    t.pool.set_active(w1, Inactive::ADMIN_PAUSE, false);
    expect(t.dump(), &head("(inactive: worker pause, admin pause)"));
    t.pool.set_active(w1, Inactive::WORKER, true);
    expect(t.dump(), &head("(inactive: admin pause)"));
    t.pool.set_active(w1, Inactive::ADMIN_PAUSE, true);
    expect(t.dump(), &head("[]"));
    t.pool.shutdown(w1);
    expect(t.dump(), &head("(inactive: shutting down)"));
}

/// An admin pause survives the worker reconnecting; a self-pause does not.
#[test]
fn persist_pause() {
    let mut t = T::new("simple");
    let w1 = t.register("worker-1");
    t.pool.set_active(w1, Inactive::ADMIN_PAUSE, false);
    t.pool.shutdown(w1);
    let head = |reg: &str| {
        format!(
            "
            capacity: 1
            queue: (backlog) []
            registered:
              worker-1 (0): {reg} (0 running)
            disconnected:
            clients:
            cached:
            "
        )
    };
    expect(
        t.dump(),
        &head("(inactive: worker pause, admin pause, shutting down)"),
    );
    t.activate(w1);
    t.release(w1);
    let w1 = t.register("worker-1");
    expect(t.dump(), &head("(inactive: worker pause, admin pause)"));
    t.pool.set_active(w1, Inactive::ADMIN_PAUSE, true);
    t.release(w1);
    let w1 = t.register("worker-1");
    t.activate(w1);
    expect(t.dump(), &head("[]"));
    t.release(w1);
    // And through the database, as after a scheduler restart.
    t.collect();
    let mut t = T::with_db("simple", t.db);
    assert!(t.pool.admin_set_active("worker-1", false, false).is_ok());
    t.collect();
    let mut t = T::with_db("simple", t.db);
    let w1 = t.register("worker-1");
    t.activate(w1);
    expect(t.dump(), &head("(inactive: admin pause)"));
}

#[test]
fn forget() {
    let mut t = T::new("simple");
    let w1 = t.register("worker-1");
    assert_eq!(
        t.pool.forget("worker-1"),
        Err(PoolError::StillConnected("worker-1".into()))
    );
    t.release(w1);
    assert_eq!(t.pool.forget("worker-1"), Ok(()));
    assert_eq!(
        t.pool.forget("worker-1"),
        Err(PoolError::UnknownWorker("worker-1".into()))
    );
    t.collect();
    expect(
        t.dump(),
        "
        capacity: 0
        queue: (backlog) []
        registered:
        disconnected:
        clients:
        cached:
        ",
    );
    // Forgotten in the database too.
    let t = T::with_db("simple", t.db);
    assert!(!t.pool.is_known("worker-1"));
}

// ---- beyond the original's cases ------------------------------------------------------

/// A ticket cancelled (or released) while on the backlog leaves no trace, and the
/// counters say so.
#[test]
fn cancel_on_the_backlog() {
    let mut t = T::new("p");
    let a = t.submit("u1", "a", "h", false);
    let b = t.submit("u1", "b", "h", false);
    assert_eq!(t.pool.queued(), 2);
    assert_eq!(t.pool.cancel(a).unwrap().name, "a");
    assert_eq!(t.pool.cancel(a).unwrap_err(), PoolError::NotQueued);
    let w = t.register("w");
    t.activate(w);
    let p = t.pop(w);
    assert_eq!(t.state(p), "b");
    assert_eq!(t.pool.cancel(b).unwrap_err(), PoolError::NotQueued);
    let c = t.pool.counters();
    assert_eq!((c.submitted, c.cancelled, c.accepted), (2, 1, 1));
}

/// A second registration under a connected name is refused; once the first has gone,
/// the name may come back, and its jobs still finish on the old registration.
#[test]
fn duplicate_and_reconnect() {
    let mut t = T::new("p");
    let w = t.register("w");
    assert_eq!(t.pool.register("w", 1), Err(PoolError::NameTaken));
    t.activate(w);
    t.submit("u1", "a", "", false);
    let p = t.pop(w);
    assert_eq!(t.state(p), "a");
    let p2 = t.pop(w);
    t.release(w);
    t.pause();
    assert_eq!(t.state(p2), "finished");
    assert_eq!(t.pool.running(w), 1);
    let w2 = t.register("w");
    assert_ne!(w, w2);
    t.pool.job_finished(w);
    assert_eq!(t.pool.running(w), 0);
    assert_eq!(t.pool.running(w2), 0);
}

/// Rates must be positive and finite; revoking a client forgets its rate.
#[test]
fn rates_and_revocation() {
    let mut t = T::new("p");
    assert_eq!(t.pool.set_rate("c", 0.0, 1.0), Err(PoolError::BadRate));
    assert_eq!(t.pool.set_rate("c", f64::NAN, 1.0), Err(PoolError::BadRate));
    assert_eq!(t.pool.set_rate("c", -1.0, 1.0), Err(PoolError::BadRate));
    t.set_rate("c", 2.5);
    assert!(t.dump().contains("clients: c(2)"), "{}", t.dump());
    t.pool.remove_client("c");
    t.collect();
    assert_eq!(t.pool.rate("c"), 1.0);
    assert!(t.db.load_pool("p").unwrap().rates.is_empty());
}

// ---- issue 14: priorities, learned costs, capacity, stealing --------------------------------

use ocluster_scheduler::pool::Priority;

/// Five levels, the highest first; OCaml's urgent is the top one and its absence the
/// middle one, so that the original's transcripts hold.
#[test]
fn priority_levels() {
    let mut t = T::new("priority");
    let w = t.register("worker-1");
    t.activate(w);
    for (name, level) in [
        ("bg", Priority::BACKGROUND),
        ("normal", Priority::NORMAL),
        ("low", Priority::LOW),
        ("urgent", Priority::URGENT),
        ("high", Priority::HIGH),
    ] {
        t.pool.submit("u1", job(name, ""), level, t.now);
        t.collect();
    }
    let show = t.dump();
    for item in [
        "u1:bg@0s+background ",
        "u1:normal@10s\n",
        "u1:low@20s+low ",
        "u1:urgent@30s+urgent]",
        "u1:high@40s+high ",
    ] {
        assert!(show.contains(item), "{item} in {show}");
    }
    assert_eq!(
        t.flush(w),
        [
            "Flush urgent",
            "Flush high",
            "Flush normal",
            "Flush low",
            "Flush bg"
        ]
    );
    assert_eq!(Priority::from(true), Priority::URGENT);
    assert_eq!(Priority::from(false), Priority::NORMAL);
    assert_eq!(Priority::parse("high"), Some(Priority::HIGH));
    assert_eq!(Priority::parse("0"), Some(Priority::BACKGROUND));
    assert_eq!(Priority::parse("5"), None);
}

/// A hint's cost is what its runs took (a moving average, per cached or not), used to
/// price and place its next jobs, and kept in the database.
#[test]
fn costs_are_learned_and_kept() {
    let mut t = T::new("learn");
    assert_eq!(t.pool.cost_of("a", true), 2);
    assert_eq!(t.pool.cost_of("a", false), 10);
    t.pool.observe("a", true, 100.0);
    t.pool.observe("a", false, 400.0);
    t.pool.observe("a", true, 200.0);
    t.pool.observe("", true, 1000.0); // no hint: nothing to learn
    t.collect();
    assert_eq!(t.pool.cost_of("a", true), 130);
    assert_eq!(t.pool.cost_of("a", false), 400);
    assert_eq!(t.pool.cost_of("", true), 2);
    // The learned cost is what a worker's queue and the client's clock are charged.
    let w = t.register("worker-1");
    t.activate(w);
    let p = t.pop(w);
    t.submit("u1", "job1", "a", false);
    t.pause();
    assert_eq!(t.state(p), "job1");
    t.submit("u1", "job2", "a", false);
    // job1 was charged 400 s (not cached yet), job2 130 s (cached now).
    let show = t.dump();
    assert!(show.contains("[u1:job2@7m]"), "{show}");
    assert!(show.contains("clients: u1(1)+9m"), "{show}");
    // Kept across a restart.
    let T { db, .. } = t;
    let t = T::with_db("learn", db);
    assert_eq!(t.pool.cost_of("a", true), 130);
    assert_eq!(t.pool.cost_of("a", false), 400);
}

/// Of two workers with the hint, the one that would start it sooner per slot gets it:
/// capacity counts (the original compared queued work alone).
#[test]
fn capacity_counts_in_placement() {
    // Both have run "a" jobs before; both are busy; a third worker waits for work.
    let mut db = Db::in_memory().unwrap();
    let cached = |w: &str| ocluster_scheduler::pool::DbWrite::MarkCached {
        hint: "a".into(),
        worker: w.into(),
    };
    db.apply("capacity", &[cached("small"), cached("big")])
        .unwrap();
    let mut t = T::with_db("capacity", db);
    t.pool.register("small", 1).unwrap();
    t.pool.register("big", 4).unwrap();
    let other = t.pool.register("other", 1).unwrap();
    for w in t.pool.known_workers() {
        let id = t.pool.connected(&w.0).unwrap();
        t.pool.set_active(id, Inactive::WORKER, true);
    }
    t.collect();
    t.pop(other);
    // Per slot, big's queue stays the shorter until it holds 4 jobs to small's 1, where
    // the original (queued work alone) shares them 3 and 3.
    for i in 0..6 {
        t.submit("u1", &format!("j{i}"), "a", false);
    }
    let show = t.dump();
    let queued = |name: &str| {
        let line = show
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{name} (")))
            .unwrap();
        line.matches("u1:").count()
    };
    assert_eq!((queued("small"), queued("big")), (2, 4), "{show}");
}

/// Work that waited in a busy worker's queue longer than it was expected to take there
/// goes to an idle worker.
#[test]
fn idle_workers_steal_overdue_work() {
    let mut t = T::new("steal");
    let w1 = t.register("worker-1");
    t.activate(w1);
    let p = t.pop(w1);
    t.submit("u1", "job1", "a", false);
    t.pause();
    assert_eq!(t.state(p), "job1");
    // worker-1 is busy; more "a" jobs queue on it, at the cached cost (2).
    t.submit("u1", "job2", "a", false);
    t.submit("u1", "job3", "a", false);
    let w2 = t.register("worker-2");
    t.activate(w2);
    let idle = t.pop(w2);
    t.pause();
    assert_eq!(t.state(idle), "pending");
    t.pool.steal(t.now + 1.0);
    t.pause();
    assert_eq!(t.state(idle), "pending", "not overdue yet");
    t.pool.steal(t.now + 2.5);
    t.pause();
    assert_eq!(t.state(idle), "job2");
    assert_eq!(t.pool.counters().stolen, 1);
    let show = t.dump();
    assert!(show.contains("worker-1 (2): [u1:job3@"), "{show}");
    assert!(show.contains("a: [worker-1; worker-2]"), "{show}");
}
