# OCluster's RPC schema, written from the declarations in
# ../shared/reference/ocluster-wire.md §1a. Cap'n Proto derives every id from the file id
# and the names, and every wire layout from the ordinals and types, so this file keeps the
# original's file id, names, nesting, ordinals and types exactly: a change to any of them
# breaks compatibility with OCaml clients, workers and schedulers. New features are added
# only as new methods or interfaces with new ordinals.
@0x8378b104cef5b2eb;

struct DockerBuild {
  dockerfile :union {
    contents @0 :Text;      # The Dockerfile itself.
    path @5 :Text;          # A Dockerfile inside the build context.
  }
  pushTarget @1 :Text;      # "repo:tag" to push the result to; empty: no push.
  pushUser @2 :Text;
  pushPassword @3 :Text;
  buildArgs @4 :List(Text);
  squash @6 :Bool;
  buildkit @7 :Bool;
  includeGit @8 :Bool;
}

struct OBuilder {
  spec @0 :Text;            # An OBuilder spec, as an S-expression.
}

struct Custom {
  kind @0 :Text;
  payload @1 :AnyPointer;
}

struct Secret {
  id @0 :Text;
  value @1 :Text;
}

struct JobDescr {
  action :union {
    dockerBuild @0 :DockerBuild;
    obuilder @4 :OBuilder;
    custom @6 :Custom;
  }
  cacheHint @1 :Text;       # Jobs with the same hint prefer the same workers; empty: none.
  repository @2 :Text;      # The Git repository the commits come from.
  commits @3 :List(Text);   # Merged in order to make the build context; empty: no context.
  secrets @5 :List(Secret);
}

interface Job {
  log @0 (start :Int64) -> (log :Data, next :Int64);
  result @1 () -> (output :Text);
  cancel @2 () -> ();
}

interface Queue {
  pop @0 (job :Job) -> (descr :JobDescr);
  setActive @1 (active :Bool) -> ();

  heartbeat @2 (time :Float64) -> ();
  # An extension of this implementation: a worker that sends heartbeats and then stops
  # for the scheduler's heartbeat timeout is taken as lost (its jobs run again
  # elsewhere). OCaml workers never send them; OCaml schedulers answer Unimplemented.
  # `time` is the worker's clock (seconds since the epoch; 0 if it does not say): a
  # worker whose clock is off by more than the scheduler allows is paused until it
  # is right again.
}

struct Metric {
  contentType @0 :Text;
  data @1 :Text;
}

struct AdditionalMetric {
  union {
    metric @0 :Metric;
    notReported @1 :Void;
  }
}

interface Worker {
  enum MetricsSource {
    agent @0;
    host @1;
  }
  metrics @0 (source :MetricsSource) -> (contentType :Text, data :Text);
  additionalMetric @2 (source :Text) -> (metric :AdditionalMetric);
  selfUpdate @1 () -> ();
}

interface Registration {
  register @0 (name :Text, worker :Worker, capacity :Int32) -> (queue :Queue);
}

interface Ticket {
  job @0 () -> (job :Job);
  cancel @1 () -> ();
}

interface Submission {
  submit @0 (pool :Text, descr :JobDescr, urgent :Bool) -> (ticket :Ticket);

  submitWithPriority @1 (pool :Text, descr :JobDescr, priority :UInt8) -> (ticket :Ticket);
  # An extension of this implementation: `submit` with one of five priority levels, 0
  # (background) to 4 (urgent); a higher level runs first. `submit`'s urgent is 4, and
  # its absence 2 (normal). An OCaml scheduler answers `unimplemented`: submit then
  # with urgent set for levels above 2.
}

struct WorkerInfo {
  name @0 :Text;
  active @1 :Bool;
  connected @2 :Bool;
}

interface Progress {
  report @0 (status :Text) -> ();
}

interface PoolAdmin {
  show @0 () -> (state :Text);
  workers @1 () -> (workers :List(WorkerInfo));
  worker @3 (worker :Text) -> (worker :Worker);
  setActive @2 (worker :Text, active :Bool, autoCreate :Bool) -> ();
  drain @7 (worker :Text, progress :Progress) -> ();
  update @4 (worker :Text, progress :Progress) -> ();
  setRate @5 (id :Text, rate :Float64) -> ();
  forget @6 (worker :Text) -> ();
}

interface Admin {
  pools @0 () -> (names :List(Text));
  pool @1 (name :Text) -> (pool :PoolAdmin);
  addClient @2 (id :Text) -> (cap :Submission);
  removeClient @3 (id :Text) -> (cap :Submission);
  listClients @4 () -> (clients :List(Text));

  # Extensions of this implementation (new ordinals: OCaml peers never call them, and
  # they answer Unimplemented if called).

  addWorker @5 (pool :Text, name :Text) -> (uri :Text);
  # A registration capability for one worker name in a pool; its URI (a cap file's
  # contents). Revoked by removeWorker.

  removeWorker @6 (pool :Text, name :Text) -> ();
  # Revokes the worker's registration capability and disconnects the worker if it
  # registered with it.
}
