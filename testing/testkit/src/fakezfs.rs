//! A fake `zfs`/`zpool`, for the ZFS store's tests on machines without ZFS (this one: no
//! module for its kernel). It is an [`Exec`] that models what the store relies on:
//! datasets with children, snapshots, clones and their origins, `promote`, `rename`,
//! deferred destroys, `canmount`/`mountpoint` and mounts. A mounted dataset's files are a
//! real directory at its mount point (moved there on mount and away on unmount), so the
//! store and its callers read and write real files, and an unmounted dataset is really not
//! there. Snapshots and clones are copies (`cp -a`).
//!
//! Every command is recorded. A test can make a dataset busy for a number of unmount
//! attempts, make a command fail, or [`FakeZfs::crash_after`] a number of commands: every
//! command after that fails, cleanups included, as if the machine had stopped there.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;

use async_trait::async_trait;
use obuilder_engine::exec::{Cmd, Exec, ExecError, Output};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Ds {
    /// `Some(snapshot)` for a clone.
    origin: Option<String>,
    /// An explicit `mountpoint` property (`none` or a path); inherited if `None`.
    mountpoint: Option<String>,
    canmount: String,
    mounted: bool,
    /// Where the files are while unmounted (a snapshot's files, always).
    backing: PathBuf,
    /// Creation order (snapshots are ordered by it).
    seq: u64,
    /// A snapshot marked by `destroy -d`: it goes with its last clone.
    deferred: bool,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct State {
    ds: BTreeMap<String, Ds>,
    seq: u64,
    /// Dataset → how many more unmounts (or destroys) find it busy.
    busy: BTreeMap<String, u32>,
    /// Argv prefix → stderr of its next failure.
    fail: Vec<(Vec<String>, String)>,
    /// Commands still allowed before the "crash"; `None`: no crash planned.
    crash_after: Option<usize>,
    /// Whether a command was refused because of the crash.
    refused: bool,
}

pub struct FakeZfs {
    /// Where commands other than `zfs` and `zpool` go (none: they fail).
    passthrough: Option<obuilder_engine::exec::SharedExec>,
    pool: String,
    root: PathBuf,
    store: PathBuf,
    state: Mutex<State>,
    calls: Mutex<Vec<String>>,
}

type R<T> = Result<T, String>;

fn copy_tree(from: &Path, to: &Path) -> R<()> {
    std::fs::create_dir_all(to).map_err(|e| e.to_string())?;
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn is_snap(name: &str) -> bool {
    name.contains('@')
}

fn fs_of(name: &str) -> &str {
    name.split('@').next().unwrap_or(name)
}

fn parent_of(name: &str) -> Option<&str> {
    name.rsplit_once('/').map(|(p, _)| p)
}

impl FakeZfs {
    /// A pool named `pool` mounted at `root` (made empty), with its files kept in `store`.
    pub fn new(pool: &str, root: &Path, store: &Path) -> FakeZfs {
        std::fs::create_dir_all(root).unwrap();
        std::fs::create_dir_all(store).unwrap();
        let mut st = State::default();
        st.ds.insert(
            pool.to_string(),
            Ds {
                origin: None,
                mountpoint: Some(root.to_string_lossy().into_owned()),
                canmount: "on".into(),
                mounted: true,
                backing: store.join("pool"),
                seq: 0,
                deferred: false,
            },
        );
        FakeZfs {
            passthrough: None,
            pool: pool.to_string(),
            root: root.to_path_buf(),
            store: store.to_path_buf(),
            state: Mutex::new(st),
            calls: Mutex::new(Vec::new()),
        }
    }

    /// Sends every command other than `zfs` and `zpool` (a sandbox's `runc`, …) to `exec`,
    /// unrecorded: a whole builder can run over the fake.
    pub fn with_passthrough(mut self, exec: obuilder_engine::exec::SharedExec) -> FakeZfs {
        self.passthrough = Some(exec);
        self
    }

    fn passes(&self, cmd: &Cmd) -> Option<&obuilder_engine::exec::SharedExec> {
        let tool = cmd.argv.first().map(String::as_str);
        self.passthrough
            .as_ref()
            .filter(|_| tool != Some("zfs") && tool != Some("zpool"))
    }

    /// Keeps the fake's whole state in `dir` (for the `fake-zfs` program: each command is a
    /// process of its own).
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let st = self.state.lock().unwrap();
        let v = serde_json::json!({
            "pool": self.pool,
            "root": self.root,
            "store": self.store,
            "state": &*st,
        });
        let tmp = dir.join("state.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&v)?)?;
        std::fs::rename(&tmp, dir.join("state.json"))
    }

    /// The fake saved in `dir` by [`FakeZfs::save`].
    pub fn load(dir: &Path) -> std::io::Result<FakeZfs> {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)?;
        let field = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        let state: State = serde_json::from_value(v["state"].clone())?;
        Ok(FakeZfs {
            passthrough: None,
            pool: field("pool"),
            root: PathBuf::from(field("root")),
            store: PathBuf::from(field("store")),
            state: Mutex::new(state),
            calls: Mutex::new(Vec::new()),
        })
    }

    /// Runs one `zfs`/`zpool` argv: its standard output, or its error message.
    pub fn run_argv(&self, argv: &[String]) -> Result<String, String> {
        self.calls.lock().unwrap().push(argv.join(" "));
        self.run(argv)
    }

    /// Every command so far, argv joined by spaces.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    /// Forgets the commands recorded so far.
    pub fn clear_calls(&self) {
        self.calls.lock().unwrap().clear();
    }

    /// The next `times` unmounts or destroys of `dataset` find it busy.
    pub fn make_busy(&self, dataset: &str, times: u32) {
        self.state
            .lock()
            .unwrap()
            .busy
            .insert(dataset.to_string(), times);
    }

    /// The next command starting with `prefix` fails with `stderr`.
    pub fn fail_next(&self, prefix: &[&str], stderr: &str) {
        self.state.lock().unwrap().fail.push((
            prefix.iter().map(|s| s.to_string()).collect(),
            stderr.to_string(),
        ));
    }

    /// After `n` more commands, every command fails (a machine that stopped there).
    pub fn crash_after(&self, n: usize) {
        self.state.lock().unwrap().crash_after = Some(n);
    }

    /// The machine is back: commands work again.
    pub fn restart(&self) {
        let mut st = self.state.lock().unwrap();
        st.crash_after = None;
        st.refused = false;
    }

    /// Whether the planned crash stopped a command.
    pub fn crashed(&self) -> bool {
        self.state.lock().unwrap().refused
    }

    /// Dataset and snapshot names (`zfs list -t all -r POOL`), sorted.
    pub fn names(&self) -> Vec<String> {
        self.state.lock().unwrap().ds.keys().cloned().collect()
    }

    /// Names of mounted datasets.
    pub fn mounted(&self) -> Vec<String> {
        let st = self.state.lock().unwrap();
        st.ds
            .iter()
            .filter(|(n, d)| d.mounted && **n != self.pool)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The origin of a clone.
    pub fn origin(&self, name: &str) -> Option<String> {
        self.state.lock().unwrap().ds.get(name)?.origin.clone()
    }

    /// The files of a snapshot, for checks.
    pub fn snapshot_dir(&self, name: &str) -> Option<PathBuf> {
        Some(self.state.lock().unwrap().ds.get(name)?.backing.clone())
    }

    fn mountpoint(&self, st: &State, name: &str) -> Option<PathBuf> {
        let d = st.ds.get(name)?;
        match d.mountpoint.as_deref() {
            Some("none") => None,
            Some(p) => Some(PathBuf::from(p)),
            None => {
                let (parent, last) = name.rsplit_once('/')?;
                Some(self.mountpoint(st, parent)?.join(last))
            }
        }
    }

    /// Where a filesystem's files are now.
    fn files(&self, st: &State, name: &str) -> PathBuf {
        let d = &st.ds[name];
        if d.mounted {
            self.mountpoint(st, name).unwrap()
        } else {
            d.backing.clone()
        }
    }

    fn next_backing(&self, st: &mut State) -> (PathBuf, u64) {
        st.seq += 1;
        (self.store.join(format!("d{}", st.seq)), st.seq)
    }

    /// Copies a filesystem's files without the files of datasets mounted inside it.
    fn copy_fs(&self, st: &State, name: &str, to: &Path) -> R<()> {
        let from = self.files(st, name);
        copy_tree(&from, to)?;
        if st.ds[name].mounted {
            for (other, d) in &st.ds {
                if other == name || !d.mounted {
                    continue;
                }
                if let Some(mp) = self.mountpoint(st, other) {
                    if let Ok(rel) = mp.strip_prefix(&from) {
                        if !rel.as_os_str().is_empty() {
                            let inside = to.join(rel);
                            let _ = std::fs::remove_dir_all(&inside);
                            std::fs::create_dir_all(&inside).map_err(|e| e.to_string())?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn mount(&self, st: &mut State, name: &str) -> R<()> {
        let Some(mp) = self.mountpoint(st, name) else {
            return Err(format!("cannot mount '{name}': no mountpoint set"));
        };
        if st.ds[name].mounted {
            return Err(format!("cannot mount '{name}': filesystem already mounted"));
        }
        if mp.exists() {
            std::fs::remove_dir(&mp)
                .map_err(|_| format!("cannot mount '{}': directory is not empty", mp.display()))?;
        }
        std::fs::create_dir_all(mp.parent().unwrap()).map_err(|e| e.to_string())?;
        std::fs::rename(&st.ds[name].backing, &mp).map_err(|e| e.to_string())?;
        st.ds.get_mut(name).unwrap().mounted = true;
        Ok(())
    }

    fn take_busy(&self, st: &mut State, name: &str) -> R<()> {
        if let Some(n) = st.busy.get_mut(name) {
            if *n > 0 {
                *n -= 1;
                return Err(format!("cannot unmount '{name}': pool or dataset is busy"));
            }
        }
        Ok(())
    }

    fn unmount(&self, st: &mut State, name: &str) -> R<()> {
        if !st.ds[name].mounted {
            return Err(format!("cannot unmount '{name}': not currently mounted"));
        }
        let mp = self.mountpoint(st, name).unwrap();
        let child_mounted = st.ds.iter().any(|(o, d)| {
            o != name
                && d.mounted
                && self
                    .mountpoint(st, o)
                    .is_some_and(|p| p != mp && p.starts_with(&mp))
        });
        if child_mounted {
            return Err(format!(
                "cannot unmount '{}': pool or dataset is busy",
                mp.display()
            ));
        }
        self.take_busy(st, name)?;
        std::fs::rename(&mp, &st.ds[name].backing).map_err(|e| e.to_string())?;
        st.ds.get_mut(name).unwrap().mounted = false;
        Ok(())
    }

    fn clones_of(st: &State, snap: &str) -> Vec<String> {
        st.ds
            .iter()
            .filter(|(_, d)| d.origin.as_deref() == Some(snap))
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn remove(&self, st: &mut State, name: &str) -> R<()> {
        if st.ds[name].mounted {
            self.unmount(st, name)?;
        }
        let d = st.ds.remove(name).unwrap();
        let _ = std::fs::remove_dir_all(&d.backing);
        // A deferred snapshot goes with its last clone.
        if let Some(o) = d.origin {
            if st.ds.get(&o).is_some_and(|s| s.deferred) && Self::clones_of(st, &o).is_empty() {
                let s = st.ds.remove(&o).unwrap();
                let _ = std::fs::remove_dir_all(&s.backing);
            }
        }
        Ok(())
    }

    fn destroy(&self, st: &mut State, name: &str, r: bool, rr: bool, defer: bool) -> R<()> {
        if is_snap(name) {
            let (fs, snap) = name.split_once('@').unwrap();
            let mut targets = vec![name.to_string()];
            if r {
                let prefix = format!("{fs}/");
                targets.extend(
                    st.ds
                        .keys()
                        .filter(|n| n.starts_with(&prefix) && n.ends_with(&format!("@{snap}")))
                        .cloned(),
                );
            }
            targets.retain(|t| st.ds.contains_key(t));
            if targets.is_empty() {
                return Err(
                    "could not find any snapshots to destroy; check snapshot names.".into(),
                );
            }
            for t in targets {
                let clones = Self::clones_of(st, &t);
                if !clones.is_empty() {
                    if rr {
                        for c in clones {
                            if st.ds.contains_key(&c) {
                                self.destroy(st, &c, true, true, false)?;
                            }
                        }
                    } else if defer {
                        st.ds.get_mut(&t).unwrap().deferred = true;
                        continue;
                    } else {
                        return Err(format!("cannot destroy '{t}': snapshot has dependent clones\nuse '-R' to destroy the following datasets:\n{}", clones.join("\n")));
                    }
                }
                if st.ds.contains_key(&t) {
                    self.remove(st, &t)?;
                }
            }
            return Ok(());
        }
        if !st.ds.contains_key(name) {
            return Err(format!("cannot open '{name}': dataset does not exist"));
        }
        let prefix_child = format!("{name}/");
        let prefix_snap = format!("{name}@");
        let below: Vec<String> = st
            .ds
            .keys()
            .filter(|n| n.starts_with(&prefix_child) || n.starts_with(&prefix_snap))
            .cloned()
            .collect();
        if !below.is_empty() && !r {
            return Err(format!(
                "cannot destroy '{name}': filesystem has children\nuse '-r' to destroy the following datasets:\n{}",
                below.join("\n")
            ));
        }
        // Children first (deepest first), then snapshots, then the dataset.
        let mut children: Vec<&String> = below.iter().filter(|n| !is_snap(n)).collect();
        children.sort_by_key(|n| std::cmp::Reverse(n.len()));
        for c in children {
            if st.ds.contains_key(c.as_str()) {
                self.destroy(st, c, true, rr, false)?;
            }
        }
        let snaps: Vec<String> = st
            .ds
            .keys()
            .filter(|n| n.starts_with(&prefix_snap))
            .cloned()
            .collect();
        for s in snaps {
            let clones = Self::clones_of(st, &s);
            if !clones.is_empty() && !rr {
                return Err(format!(
                    "cannot destroy '{name}': filesystem has dependent clones\nuse '-R' to destroy the following datasets:\n{}",
                    clones.join("\n")
                ));
            }
            self.destroy(st, &s, false, rr, false)?;
        }
        self.remove(st, name)
    }

    fn rename(&self, st: &mut State, from: &str, to: &str) -> R<()> {
        if !st.ds.contains_key(from) {
            return Err(format!("cannot open '{from}': dataset does not exist"));
        }
        if st.ds.contains_key(to) {
            return Err(format!("cannot rename to '{to}': dataset already exists"));
        }
        if !parent_of(to).is_some_and(|p| st.ds.contains_key(p)) {
            return Err(format!("cannot rename to '{to}': parent does not exist"));
        }
        let was_mounted = st.ds[from].mounted;
        if was_mounted {
            self.unmount(st, from)?;
        }
        let moved: Vec<String> = st
            .ds
            .keys()
            .filter(|n| {
                *n == from
                    || n.starts_with(&format!("{from}/"))
                    || n.starts_with(&format!("{from}@"))
            })
            .cloned()
            .collect();
        for old in moved {
            let new = format!("{to}{}", &old[from.len()..]);
            let d = st.ds.remove(&old).unwrap();
            st.ds.insert(new.clone(), d);
            for other in st.ds.values_mut() {
                if other.origin.as_deref() == Some(old.as_str()) {
                    other.origin = Some(new.clone());
                }
            }
        }
        if was_mounted {
            self.mount(st, to)?;
        }
        Ok(())
    }

    fn promote(&self, st: &mut State, name: &str) -> R<()> {
        let Some(origin) = st.ds.get(name).and_then(|d| d.origin.clone()) else {
            return Err(format!("cannot promote '{name}': not a cloned filesystem"));
        };
        let ofs = fs_of(&origin).to_string();
        let limit = st.ds[&origin].seq;
        let moved: Vec<String> = st
            .ds
            .iter()
            .filter(|(n, d)| n.starts_with(&format!("{ofs}@")) && d.seq <= limit)
            .map(|(n, _)| n.clone())
            .collect();
        for m in &moved {
            let snap = m.split_once('@').unwrap().1;
            if st.ds.contains_key(&format!("{name}@{snap}")) {
                return Err(format!(
                    "cannot promote '{name}': snapshot name conflict: {snap}"
                ));
            }
        }
        let old_origin = st.ds[&ofs].origin.clone();
        for m in moved {
            let snap = m.split_once('@').unwrap().1.to_string();
            let new = format!("{name}@{snap}");
            let d = st.ds.remove(&m).unwrap();
            st.ds.insert(new.clone(), d);
            for (n, other) in st.ds.iter_mut() {
                if *n != name && other.origin.as_deref() == Some(m.as_str()) {
                    other.origin = Some(new.clone());
                }
            }
        }
        st.ds.get_mut(&ofs).unwrap().origin =
            Some(format!("{name}@{}", origin.split_once('@').unwrap().1));
        st.ds.get_mut(name).unwrap().origin = old_origin;
        Ok(())
    }

    fn props(args: &mut Vec<String>) -> Vec<(String, String)> {
        let mut props = Vec::new();
        while args.first().map(String::as_str) == Some("-o") {
            args.remove(0);
            let kv = args.remove(0);
            let (k, v) = kv.split_once('=').unwrap();
            props.push((k.to_string(), v.to_string()));
        }
        props
    }

    fn new_fs(
        &self,
        st: &mut State,
        name: &str,
        origin: Option<&str>,
        props: &[(String, String)],
    ) -> R<()> {
        if st.ds.contains_key(name) {
            return Err(format!("cannot create '{name}': dataset already exists"));
        }
        if !parent_of(name).is_some_and(|p| st.ds.contains_key(p)) {
            return Err(format!("cannot create '{name}': parent does not exist"));
        }
        let (backing, seq) = self.next_backing(st);
        match origin {
            Some(o) => copy_tree(&st.ds[o].backing, &backing)?,
            None => std::fs::create_dir_all(&backing).map_err(|e| e.to_string())?,
        }
        let mut d = Ds {
            origin: origin.map(str::to_string),
            mountpoint: None,
            canmount: "on".into(),
            mounted: false,
            backing,
            seq,
            deferred: false,
        };
        for (k, v) in props {
            match k.as_str() {
                "mountpoint" => d.mountpoint = Some(v.clone()),
                "canmount" => d.canmount = v.clone(),
                _ => return Err(format!("fake zfs: property {k} not modelled")),
            }
        }
        let auto = d.canmount == "on" && d.mountpoint.as_deref() != Some("none");
        st.ds.insert(name.to_string(), d);
        if auto {
            self.mount(st, name)?;
        }
        Ok(())
    }

    fn list(&self, st: &State, mut args: Vec<String>) -> R<String> {
        let mut fields = vec!["name".to_string()];
        let mut types = vec!["filesystem".to_string()];
        let mut recursive = false;
        let mut depth = usize::MAX;
        let mut names = Vec::new();
        while !args.is_empty() {
            let a = args.remove(0);
            match a.as_str() {
                "-H" | "-p" => {}
                "-o" => fields = args.remove(0).split(',').map(str::to_string).collect(),
                "-t" => types = args.remove(0).split(',').map(str::to_string).collect(),
                "-r" => recursive = true,
                "-d" => {
                    recursive = true;
                    depth = args.remove(0).parse().unwrap();
                }
                _ => names.push(a),
            }
        }
        let mut out = String::new();
        for name in names {
            if !st.ds.contains_key(&name) {
                return Err(format!("cannot open '{name}': dataset does not exist"));
            }
            let base_depth = name.matches('/').count();
            let mut rows: Vec<(&String, &Ds)> = st
                .ds
                .iter()
                .filter(|(n, _)| {
                    if **n == name {
                        return true;
                    }
                    if !recursive {
                        return false;
                    }
                    let fs = fs_of(n);
                    let under = fs == name || fs.starts_with(&format!("{name}/"));
                    under && {
                        let d = fs.matches('/').count() - base_depth + usize::from(is_snap(n));
                        d <= depth
                    }
                })
                .filter(|(n, _)| {
                    **n == name
                        || types.iter().any(|t| match t.as_str() {
                            "all" => true,
                            "snapshot" => is_snap(n),
                            "filesystem" => !is_snap(n),
                            _ => false,
                        })
                })
                .collect();
            rows.sort_by(|a, b| (fs_of(a.0), a.1.seq).cmp(&(fs_of(b.0), b.1.seq)));
            for (n, d) in rows {
                let cols: Vec<String> = fields
                    .iter()
                    .map(|f| match f.as_str() {
                        "name" => n.clone(),
                        "origin" => d.origin.clone().unwrap_or_else(|| "-".into()),
                        // Unique per dataset or snapshot made, as a real guid.
                        "guid" => (1_000_000_007u64 * d.seq).to_string(),
                        "mounted" if is_snap(n) => "-".into(),
                        "mounted" => if d.mounted { "yes" } else { "no" }.into(),
                        "mountpoint" if is_snap(n) => "-".into(),
                        "mountpoint" => self
                            .mountpoint(st, n)
                            .map(|p| p.to_string_lossy().into_owned())
                            .unwrap_or_else(|| "none".into()),
                        other => format!("?{other}"),
                    })
                    .collect();
                out.push_str(&cols.join("\t"));
                out.push('\n');
            }
        }
        Ok(out)
    }

    fn run(&self, argv: &[String]) -> R<String> {
        let mut st = self.state.lock().unwrap();
        match st.crash_after {
            Some(0) => {
                st.refused = true;
                return Err("fake zfs: the machine has stopped".into());
            }
            Some(n) => st.crash_after = Some(n - 1),
            None => {}
        }
        if let Some(i) = st
            .fail
            .iter()
            .position(|(p, _)| argv.len() >= p.len() && argv[..p.len()] == p[..])
        {
            return Err(st.fail.remove(i).1);
        }
        let st = &mut *st;
        let (cmd, sub) = (argv[0].as_str(), argv.get(1).map(String::as_str));
        let mut args: Vec<String> = argv.iter().skip(2).cloned().collect();
        let flags = |args: &mut Vec<String>| {
            let mut f = String::new();
            while args
                .first()
                .is_some_and(|a| a.starts_with('-') && a != "-o")
            {
                f.push_str(&args.remove(0)[1..]);
            }
            f
        };
        match (cmd, sub) {
            ("zpool", Some("list")) => Ok("10737418240\t4294967296\n".into()),
            ("zpool", Some("wait")) => Ok(String::new()),
            ("zfs", Some("list")) => self.list(st, args),
            ("zfs", Some("create")) => {
                let props = Self::props(&mut args);
                self.new_fs(st, &args[0], None, &props)
                    .map(|_| String::new())
            }
            ("zfs", Some("clone")) => {
                let props = Self::props(&mut args);
                let (snap, name) = (&args[0], &args[1]);
                if !st.ds.contains_key(snap) {
                    return Err(format!("cannot open '{snap}': dataset does not exist"));
                }
                self.new_fs(st, name, Some(snap), &props)
                    .map(|_| String::new())
            }
            ("zfs", Some("mount")) => {
                let name = &args[0];
                if !st.ds.contains_key(name) {
                    return Err(format!("cannot open '{name}': dataset does not exist"));
                }
                self.mount(st, name).map(|_| String::new())
            }
            ("zfs", Some("unmount")) => {
                let f = flags(&mut args);
                let name = &args[0];
                if !st.ds.contains_key(name) {
                    return Err(format!("cannot open '{name}': dataset does not exist"));
                }
                // `-f` closes what is open there (macOS, FreeBSD): an injected busy
                // does not stop it.
                let busy = if f.contains('f') {
                    st.busy.remove(name)
                } else {
                    None
                };
                let r = self.unmount(st, name).map(|_| String::new());
                if let Some(n) = busy {
                    st.busy.insert(name.clone(), n);
                }
                r
            }
            ("zfs", Some("snapshot")) => {
                let f = flags(&mut args);
                let name = args[0].clone();
                let (fs, snap) = name.split_once('@').unwrap();
                if !st.ds.contains_key(fs) {
                    return Err(format!("cannot open '{fs}': dataset does not exist"));
                }
                let mut targets = vec![fs.to_string()];
                if f.contains('r') {
                    targets.extend(
                        st.ds
                            .keys()
                            .filter(|n| n.starts_with(&format!("{fs}/")) && !is_snap(n))
                            .cloned(),
                    );
                }
                for t in &targets {
                    if st.ds.contains_key(&format!("{t}@{snap}")) {
                        return Err(format!(
                            "cannot create snapshot '{t}@{snap}': dataset already exists"
                        ));
                    }
                }
                for t in targets {
                    let (backing, seq) = self.next_backing(st);
                    self.copy_fs(st, &t, &backing)?;
                    st.ds.insert(
                        format!("{t}@{snap}"),
                        Ds {
                            origin: None,
                            mountpoint: None,
                            canmount: "-".into(),
                            mounted: false,
                            backing,
                            seq,
                            deferred: false,
                        },
                    );
                }
                Ok(String::new())
            }
            ("zfs", Some("destroy")) => {
                let f = flags(&mut args);
                self.destroy(
                    st,
                    &args[0],
                    f.contains('r'),
                    f.contains('R'),
                    f.contains('d'),
                )
                .map(|_| String::new())
            }
            ("zfs", Some("set")) => {
                let (prop, name) = (&args[0], &args[1]);
                let Some((k, v)) = prop.split_once('=') else {
                    return Err(format!("bad property format: {prop}"));
                };
                if !st.ds.contains_key(name) {
                    return Err(format!("cannot open '{name}': dataset does not exist"));
                }
                // As zfs does, a mounted filesystem moves to its new mount point.
                let was_mounted = st.ds[name].mounted;
                if was_mounted && k == "mountpoint" {
                    self.unmount(st, name)?;
                }
                let d = st.ds.get_mut(name).unwrap();
                match k {
                    "mountpoint" => d.mountpoint = Some(v.to_string()),
                    "canmount" => d.canmount = v.to_string(),
                    _ => return Err(format!("fake zfs: property {k} not modelled")),
                }
                if was_mounted && k == "mountpoint" && v != "none" {
                    self.mount(st, name)?;
                }
                Ok(String::new())
            }
            ("zfs", Some("rename")) => self.rename(st, &args[0], &args[1]).map(|_| String::new()),
            ("zfs", Some("promote")) => self.promote(st, &args[0]).map(|_| String::new()),
            _ => Err(format!("fake zfs: {} is not modelled", argv.join(" "))),
        }
    }

    /// The pool's mount point.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

#[async_trait]
impl Exec for FakeZfs {
    async fn output(&self, cmd: &Cmd) -> Result<Output, ExecError> {
        if let Some(exec) = self.passes(cmd) {
            return exec.output(cmd).await;
        }
        match self.run_argv(&cmd.argv) {
            Ok(out) => Ok(Output {
                stdout: out.into_bytes(),
                stderr: vec![],
            }),
            Err(stderr) => Err(ExecError::Failed {
                cmd: cmd.display(),
                status: "exit status: 1".into(),
                stderr,
            }),
        }
    }

    fn spawn(
        &self,
        cmd: &Cmd,
        stdin: Stdio,
        stdout: Stdio,
        stderr: Stdio,
    ) -> Result<tokio::process::Child, ExecError> {
        if let Some(exec) = self.passes(cmd) {
            return exec.spawn(cmd, stdin, stdout, stderr);
        }
        Err(ExecError::Spawn {
            cmd: cmd.display(),
            source: std::io::Error::other("fake zfs runs no long-lived commands"),
        })
    }
}
