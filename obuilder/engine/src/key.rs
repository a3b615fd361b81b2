//! Cache keys: everything that affects a step's result, in one struct per step kind.
//!
//! **Changing any of these structs, or how they print, invalidates every cache.** Keys are
//! the SHA-256 of the struct's S-expression in Sexplib's machine form, field for field as
//! OBuilder's `run_input` / `copy_details` records, so the same inputs give the original's
//! ids (pinned by `run_key_matches_obuilder` below). Key scheme version: [`KEY_SCHEME`].

use obuilder_spec::{Sexp, User};
use sha2::{Digest, Sha256};

/// The version of the key scheme. 0 is OBuilder's own (v0.4 to HEAD) for `run` and `copy`,
/// with one deliberate difference: an executable file appears in a `copy` manifest as
/// `(Executable (PATH SHA256))` instead of `(File (PATH SHA256))`, because its execute bit
/// decides the mode it is copied with (OBuilder ignored it, so a `chmod +x` alone reused a
/// stale result). Copies without executables keep OBuilder's ids.
pub const KEY_SCHEME: u32 = 0;

/// A build id: lowercase hex SHA-256.
pub type Id = String;

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// What a secret's value contributes to a `run` key: `hmac-sha256:HEX` of the value under
/// the store's secret key (see [`store_secret_key`]).
pub fn secret_digest(key: &[u8; 32], value: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(key).expect("any key length works");
    mac.update(value);
    format!("hmac-sha256:{}", hex::encode(mac.finalize().into_bytes()))
}

/// The store's secret key for [`secret_digest`], at `STATE/secret-key` (mode 0600): 32
/// random bytes made with the store. Created atomically (written aside, then linked into
/// place), so processes opening a new store at once all read the same key.
pub fn store_secret_key(state_dir: &std::path::Path) -> std::io::Result<[u8; 32]> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join("secret-key");
    let read = |p: &std::path::Path| -> std::io::Result<[u8; 32]> {
        let mut k = [0u8; 32];
        std::fs::File::open(p)?.read_exact(&mut k)?;
        Ok(k)
    };
    match read(&path) {
        Ok(k) => return Ok(k),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
    let tmp = state_dir.join(format!("secret-key.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&key)?;
    f.sync_all()?;
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(key),
        // Another process made it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read(&path),
        Err(e) => Err(e),
    }
}

/// The id of a base image `(from NAME)` as OBuilder computes it: the SHA-256 of the name.
/// Our fetchers key bases by content instead (see `Fetcher::resolve`); this is kept for
/// compatibility tests and for callers that want OBuilder's ids.
pub fn obuilder_base_id(name: &str) -> Id {
    sha256_hex(name.as_bytes())
}

/// A secret as it enters a `run` key. OBuilder puts the value in; we keep the same shape,
/// but `value` is [`secret_digest`] of it: an HMAC under the store's own random key, so a
/// changed secret still changes the id while the id (printed in every log) reveals
/// nothing about the value, not even to a dictionary of short secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretInput {
    pub value: String,
    pub target: String,
}

/// Inputs to a `run` step that affect its result (OBuilder's `run_input`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunInput {
    pub base: Id,
    pub workdir: String,
    pub user: User,
    pub env: Vec<(String, String)>,
    pub cmd: String,
    pub shell: Vec<String>,
    pub network: Vec<String>,
    pub mount_secrets: Vec<SecretInput>,
}

fn strings(v: &[String]) -> Sexp {
    Sexp::list(v.iter().map(|s| Sexp::atom(s.clone())))
}

impl RunInput {
    pub fn to_sexp(&self) -> Sexp {
        Sexp::list([
            Sexp::field("base", Sexp::atom(self.base.clone())),
            Sexp::field("workdir", Sexp::atom(self.workdir.clone())),
            Sexp::field("user", self.user.to_sexp()),
            Sexp::field(
                "env",
                Sexp::list(
                    self.env
                        .iter()
                        .map(|(k, v)| Sexp::list([Sexp::atom(k.clone()), Sexp::atom(v.clone())])),
                ),
            ),
            Sexp::field("cmd", Sexp::atom(self.cmd.clone())),
            Sexp::field("shell", strings(&self.shell)),
            Sexp::field("network", strings(&self.network)),
            Sexp::field(
                "mount_secrets",
                Sexp::list(self.mount_secrets.iter().map(|s| {
                    Sexp::list([
                        Sexp::field("value", Sexp::atom(s.value.clone())),
                        Sexp::field("target", Sexp::atom(s.target.clone())),
                    ])
                })),
            ),
        ])
    }

    pub fn id(&self) -> Id {
        sha256_hex(self.to_sexp().to_mach().as_bytes())
    }
}

/// One source item of a `copy`, as OBuilder's `Manifest.t`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manifest {
    /// A regular file: its path (relative to the source dir) and content SHA-256.
    File { path: String, sha256: String },
    /// A regular file with an execute bit set (copied with mode 0755).
    Executable { path: String, sha256: String },
    /// A symlink: its path and target (not followed).
    Symlink { path: String, target: String },
    /// A directory: its path and entries, sorted byte-wise.
    Dir {
        path: String,
        entries: Vec<Manifest>,
    },
}

impl Manifest {
    pub fn path(&self) -> &str {
        match self {
            Manifest::File { path, .. }
            | Manifest::Executable { path, .. }
            | Manifest::Symlink { path, .. }
            | Manifest::Dir { path, .. } => path,
        }
    }

    pub fn to_sexp(&self) -> Sexp {
        let pair = |tag: &str, a: &str, b: Sexp| {
            Sexp::list([Sexp::atom(tag), Sexp::list([Sexp::atom(a), b])])
        };
        match self {
            Manifest::File { path, sha256 } => pair("File", path, Sexp::atom(sha256.clone())),
            Manifest::Executable { path, sha256 } => {
                pair("Executable", path, Sexp::atom(sha256.clone()))
            }
            Manifest::Symlink { path, target } => pair("Symlink", path, Sexp::atom(target.clone())),
            Manifest::Dir { path, entries } => pair(
                "Dir",
                path,
                Sexp::list(entries.iter().map(Manifest::to_sexp)),
            ),
        }
    }
}

/// What a `copy` does once its sources are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyOp {
    /// `dst` ends in `/`: each item lands under it.
    Items(Vec<Manifest>, String),
    /// One item copied as `dst`.
    Item(Manifest, String),
}

/// Inputs to a `copy` step (OBuilder's `copy_details`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyInput {
    pub base: Id,
    pub user: User,
    pub op: CopyOp,
}

impl CopyInput {
    pub fn to_sexp(&self) -> Sexp {
        let op = match &self.op {
            CopyOp::Items(items, dst) => Sexp::list([
                Sexp::atom("Copy_items"),
                Sexp::list([
                    Sexp::list(items.iter().map(Manifest::to_sexp)),
                    Sexp::atom(dst.clone()),
                ]),
            ]),
            CopyOp::Item(item, dst) => Sexp::list([
                Sexp::atom("Copy_item"),
                Sexp::list([item.to_sexp(), Sexp::atom(dst.clone())]),
            ]),
        };
        Sexp::list([
            Sexp::field("base", Sexp::atom(self.base.clone())),
            Sexp::field("user", self.user.to_sexp()),
            Sexp::field("op", op),
        ])
    }

    pub fn id(&self) -> Id {
        sha256_hex(self.to_sexp().to_mach().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(base: &str, cmd: &str) -> RunInput {
        RunInput {
            base: base.into(),
            workdir: "/".into(),
            user: User::ROOT,
            env: vec![("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into())],
            cmd: cmd.into(),
            shell: vec!["/bin/sh".into(), "-c".into()],
            network: vec![],
            mount_secrets: vec![],
        }
    }

    /// The test vector: OCaml OBuilder v0.4 and HEAD give this id for the last step
    /// of the quick-start spec on `(from busybox)`. If this fails, every cache is invalid.
    #[test]
    fn run_key_matches_obuilder() {
        let mut id = obuilder_base_id("busybox");
        assert_eq!(
            id,
            "9d75f0d7c398df565d7ac04c6819b62d6d8f9560f5eb4672596ecd8f7e96ae91"
        );
        for cmd in [
            "mkdir -p /data && echo step1 > /data/1",
            "seq 1 10000 > /data/2",
            "wc -l /data/2 > /data/3",
            "dd if=/dev/zero of=/data/4 bs=1024 count=1024 2>/dev/null",
            "ls -l /data > /data/5 && echo last-step-v0",
        ] {
            id = run(&id, cmd).id();
        }
        assert_eq!(
            id,
            "de09a993c758fa86ba823e378ebf4d709ab7cc70a3ba8a59a337bb4063617006"
        );
    }

    #[test]
    fn secret_digests_depend_on_the_store_key_and_the_value() {
        let (k1, k2) = ([1u8; 32], [2u8; 32]);
        assert_eq!(secret_digest(&k1, b"1234"), secret_digest(&k1, b"1234"));
        assert_ne!(secret_digest(&k1, b"1234"), secret_digest(&k1, b"1235"));
        assert_ne!(secret_digest(&k1, b"1234"), secret_digest(&k2, b"1234"));
        // RFC 4231 test case 2, to pin the construction.
        use hmac::Mac;
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let dir = tempfile::tempdir().unwrap();
        let a = store_secret_key(dir.path()).unwrap();
        assert_eq!(store_secret_key(dir.path()).unwrap(), a);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("secret-key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn run_key_text_is_sexplib_machine_form() {
        assert_eq!(
            run("b", "echo hi").to_sexp().to_mach(),
            "((base b)(workdir /)(user((uid 0)(gid 0)))(env((PATH /usr/sbin:/usr/bin:/sbin:/bin)))\
             (cmd\"echo hi\")(shell(/bin/sh -c))(network())(mount_secrets()))"
        );
    }

    #[test]
    fn copy_key_text_is_sexplib_machine_form() {
        let input = CopyInput {
            base: "b".into(),
            user: User::Unix {
                uid: 1000,
                gid: 1000,
            },
            op: CopyOp::Items(
                vec![
                    Manifest::File {
                        path: "a.c".into(),
                        sha256: "h1".into(),
                    },
                    Manifest::Dir {
                        path: "d".into(),
                        entries: vec![Manifest::Symlink {
                            path: "d/l".into(),
                            target: "../a.c".into(),
                        }],
                    },
                ],
                "/src/".into(),
            ),
        };
        assert_eq!(
            input.to_sexp().to_mach(),
            "((base b)(user((uid 1000)(gid 1000)))(op(Copy_items(((File(a.c h1))(Dir(d((Symlink(d/l ../a.c))))))/src/))))"
        );
    }
}
