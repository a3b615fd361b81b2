//! `zfs` and `zpool` for end-to-end tests of the ZFS store (a fake: no ZFS on this
//! machine's kernel). Installed as both names (symlinks); the state of the fake pool is in
//! `$FAKE_ZFS_DIR/state.json`, made by the test with `testkit::fakezfs::FakeZfs::save`,
//! and every command runs under a lock on that directory, as the real ones are atomic.
//! Every command is appended to `$FAKE_ZFS_DIR/calls`.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;

use testkit::fakezfs::FakeZfs;

fn main() -> ExitCode {
    let Some(dir) = std::env::var_os("FAKE_ZFS_DIR").map(PathBuf::from) else {
        eprintln!("fake-zfs: FAKE_ZFS_DIR is not set");
        return ExitCode::from(2);
    };
    let mut args: Vec<String> = std::env::args().collect();
    let tool = PathBuf::from(args.remove(0))
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tool = if tool == "zpool" { "zpool" } else { "zfs" };
    args.insert(0, tool.to_string());
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .expect("lock file");
    rustix::fs::flock(lock.as_fd(), rustix::fs::FlockOperation::LockExclusive).expect("flock");
    let fake = FakeZfs::load(&dir).expect("the fake's state");
    let r = fake.run_argv(&args);
    fake.save(&dir).expect("save the fake's state");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("calls"))
    {
        let _ = writeln!(f, "{}", args.join(" "));
    }
    match r {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
