//! Build contexts from Git: a mirror per repository in the worker's state directory,
//! fetched only when a commit is missing; the first commit checked out into a temporary
//! context, the others merged into it in order.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use obuilder_engine::exec::{Cmd, ExecError, SharedExec};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("repository {0:?}: only git://, http://, https:// and file:// URLs are accepted")]
    BadUrl(String),
    #[error("commit {0:?} is not a full hexadecimal commit hash")]
    BadCommit(String),
    #[error("commits were given without a repository")]
    NoRepository,
    #[error("cannot fetch {repo}: {source}")]
    Fetch {
        repo: String,
        #[source]
        source: ExecError,
    },
    #[error("commit {commit} is not in {repo} (fetched it; it is still missing)")]
    UnknownCommit { repo: String, commit: String },
    #[error("merge conflict merging {commit} into {base} of {repo}:\n{details}")]
    MergeConflict {
        repo: String,
        base: String,
        commit: String,
        details: String,
    },
    #[error("git failed: {0}")]
    Git(#[from] ExecError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The mirrors, one lock each so that two jobs on one repository fetch one at a time.
pub struct Mirrors {
    dir: PathBuf,
    exec: SharedExec,
    locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

fn check_url(url: &str) -> Result<(), GitError> {
    let ok = ["git://", "http://", "https://", "file://"]
        .iter()
        .any(|p| url.starts_with(p));
    if ok && !url.contains(char::is_whitespace) {
        Ok(())
    } else {
        Err(GitError::BadUrl(url.to_string()))
    }
}

fn check_commit(c: &str) -> Result<(), GitError> {
    if (c.len() == 40 || c.len() == 64) && c.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(GitError::BadCommit(c.to_string()))
    }
}

impl Mirrors {
    /// Mirrors live in `state_dir/git`.
    pub fn new(state_dir: &Path, exec: SharedExec) -> Mirrors {
        Mirrors {
            dir: state_dir.join("git"),
            exec,
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// `<basename>-<sha256(url)>`, as the original names its clones (with SHA-256).
    pub fn mirror_path(&self, url: &str) -> PathBuf {
        let base = url
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or("repo")
            .trim_end_matches(".git");
        let base: String = base
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let h = hex::encode(&Sha256::digest(url.as_bytes())[..8]);
        self.dir.join(format!("{base}-{h}"))
    }

    async fn git(&self, dir: &Path, args: &[&str]) -> Result<String, ExecError> {
        let mut argv = vec!["git", "-C", dir.to_str().unwrap_or(".")];
        argv.extend_from_slice(args);
        Ok(self.exec.output(&Cmd::new(argv)).await?.stdout_str())
    }

    async fn has_commit(&self, mirror: &Path, commit: &str) -> bool {
        self.git(mirror, &["cat-file", "-e", &format!("{commit}^{{commit}}")])
            .await
            .is_ok()
    }

    /// Makes `dest` (which must not exist) hold `commits[0]` of `repo` with the others
    /// merged into it in order, without `.git` unless `keep_git`.
    pub async fn checkout(
        &self,
        repo: &str,
        commits: &[String],
        dest: &Path,
        keep_git: bool,
    ) -> Result<(), GitError> {
        check_url(repo)?;
        for c in commits {
            check_commit(c)?;
        }
        let mirror = self.mirror_path(repo);
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(mirror.clone())
            .or_default()
            .clone();
        {
            let _held = lock.lock().await;
            if !mirror.join("HEAD").exists() {
                std::fs::create_dir_all(&mirror).map_err(|source| GitError::Io {
                    what: "cannot create",
                    path: mirror.clone(),
                    source,
                })?;
                self.git(&mirror, &["init", "--quiet", "--bare"]).await?;
                self.git(&mirror, &["remote", "add", "origin", repo])
                    .await?;
            }
            let mut missing = false;
            for c in commits {
                if !self.has_commit(&mirror, c).await {
                    missing = true;
                    break;
                }
            }
            if missing {
                let mut refspecs = vec!["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"];
                if repo.contains("github.com") {
                    refspecs.push("+refs/pull/*:refs/pull/*");
                } else if repo.contains("gitlab") {
                    refspecs.push("+refs/merge-requests/*/head:refs/merge-requests/*/head");
                }
                let mut args = vec!["fetch", "--quiet", "--no-recurse-submodules", "origin"];
                args.extend(refspecs);
                self.git(&mirror, &args)
                    .await
                    .map_err(|source| GitError::Fetch {
                        repo: repo.to_string(),
                        source,
                    })?;
                for c in commits {
                    if !self.has_commit(&mirror, c).await {
                        return Err(GitError::UnknownCommit {
                            repo: repo.to_string(),
                            commit: c.clone(),
                        });
                    }
                }
            }
        }
        let (first, rest) = commits.split_first().ok_or(GitError::NoRepository)?;
        let parent = dest.parent().unwrap_or(Path::new("/"));
        self.git(
            parent,
            &[
                "clone",
                "--quiet",
                "--shared",
                "--no-checkout",
                mirror.to_str().unwrap_or("."),
                dest.to_str().unwrap_or("."),
            ],
        )
        .await?;
        self.git(dest, &["checkout", "--quiet", "--detach", first])
            .await?;
        for c in rest {
            let r = self
                .git(
                    dest,
                    &[
                        "-c",
                        "user.name=ocluster",
                        "-c",
                        "user.email=ocluster@localhost",
                        "merge",
                        "--quiet",
                        "--no-edit",
                        c,
                    ],
                )
                .await;
            if let Err(e) = r {
                let details = match e {
                    ExecError::Failed { stderr, .. } => stderr.trim().to_string(),
                    other => other.to_string(),
                };
                return Err(GitError::MergeConflict {
                    repo: repo.to_string(),
                    base: first.clone(),
                    commit: c.clone(),
                    details,
                });
            }
        }
        if keep_git {
            return Ok(());
        }
        let dotgit = dest.join(".git");
        std::fs::remove_dir_all(&dotgit).map_err(|source| GitError::Io {
            what: "cannot remove",
            path: dotgit,
            source,
        })?;
        Ok(())
    }
}
