//! `docker:/PATH`: results are images of a Docker-compatible engine (`--docker-cli`:
//! `docker`, or `podman`), for Windows workers as the original's `docker_store.ml`; steps
//! run with the Docker sandbox (`obuilder-sandbox`'s `docker`), which leaves the step's
//! container for [`Store::commit`] to commit.
//!
//! ```text
//! ROOT/result/ID/{log, env, image.json, copy-dst, rootfs/}   a result (the image is PREFIX:ID)
//! ROOT/result-tmp/ID/{parent, rootfs/}                       a build: rootfs/ is a staging tree
//! ROOT/state/                                                the database, caches' locks
//! PREFIX:ID        a result's image          PREFIX-ID       a step's container
//! PREFIX-c-HEX     a cache's volume          PREFIX-ct-PID-N-HEX  a checked-out copy
//! ```
//!
//! PREFIX is `obuilder-` and 8 hex digits of the root's path, so stores on one engine stay
//! apart. What a step is made of decides its commit:
//! * a `run`: the sandbox's container, `commit`ted as `PREFIX:ID` and removed;
//! * a `copy`: the files written in the staging tree, below the destination only (the
//!   directories above it are the image's, owners and modes kept), untarred in a container
//!   of the parent image (`tar` must be in the image, as for the original) and committed;
//! * a base image: the tree the fetcher extracted, `import`ed (no `docker pull`: images
//!   come from registries or local files through obuilder's own fetcher).
//!
//! The result's directory is renamed into `result/` only after its image exists: a crash
//! leaves an image without a directory, removed at start-up with every container and cache
//! copy of this store. Shared caches are volumes, copied on the host through their mount
//! points (a local-driver engine on Linux); the master is replaced on release when nobody
//! published since the copy was taken (first release wins). Deleting a cache that a copy
//! is using is refused (the original's check was inverted: it deleted caches in use and
//! refused idle ones).
//!
//! **Windows engines** (`--docker-platform windows`, e.g. a Windows host's engine reached
//! through `DOCKER_HOST`): the engine's files are not this host's, so nothing is done on
//! the host's side. Base images are `pull`ed and tagged (Windows layers cannot be
//! `import`ed; [`DockerPull`]); copies and cache copies run Cygwin's `tar` in containers,
//! from a volume `PREFIX-libexec` made once from the servercore image that matches the
//! engine's Windows build (Windows' own `tar` does not keep symbolic links), as the
//! original's `docker_sandbox.ml` does:
//!
//! ```text
//! CLI version --format {{.Server.Os}}                       the engine is what was said
//! CLI volume inspect PREFIX-libexec                        made already?
//! CLI version --format {{.Server.KernelVersion}}           "10.0 20348 (…)": ltsc2022
//! CLI volume create PREFIX-libexec
//! CLI build --tag PREFIX-libexec-image DIR                 servercore + Cygwin's tar
//! CLI run --rm … --mount type=volume,src=PREFIX-libexec,dst=C:/obuilder-libexec
//!     --env DESTINATION=C:\obuilder-libexec --entrypoint cmd PREFIX-libexec-image /S /C C:\extract.cmd
//! CLI image rm PREFIX-libexec-image
//! ```
//!
//! A failed set-up removes the volume, so that the next start makes it again (the
//! original kept a half-made volume, and never made it again).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use obuilder_engine::exec::{Cmd, ExecError, SharedExec};
use obuilder_engine::store::{BuildDir, CacheCopy, CacheInfo, Store, StoreError};

use crate::cache::GenLock;
use crate::layout::{entries, path_str, remove_tree, Layout};

/// In a base step's build dir: the engine's image id of a pulled base image.
pub const PULLED: &str = "docker-image";

/// The name prefix of everything a store at `root` makes in the engine.
pub fn prefix(root: &Path) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(root.to_string_lossy().as_bytes());
    format!("obuilder-{}", &hex::encode(h)[..8])
}

/// The kind of containers the engine runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Platform {
    #[default]
    Linux,
    Windows,
}

impl std::str::FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> Result<Platform, String> {
        match s {
            "linux" => Ok(Platform::Linux),
            "windows" => Ok(Platform::Windows),
            _ => Err(format!("unknown Docker platform {s:?}: linux or windows")),
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Platform::Linux => "linux",
            Platform::Windows => "windows",
        })
    }
}

/// Where the libexec volume is mounted in Windows helper containers, and its path for
/// Cygwin's programs.
const LIBEXEC_DIR: &str = "C:/obuilder-libexec";
const LIBEXEC_TAR: &str = "C:/obuilder-libexec/tar.exe";
/// Cygwin makes symbolic links Windows' own (else they are Cygwin's files, which only
/// Cygwin's programs follow).
const CYGWIN_ENV: &str = "CYGWIN=winsymlinks:native";

/// The servercore tag for a Windows engine's `KernelVersion` (`10.0 20348 (20348.1.amd64fre…)`):
/// before Windows 11 and Server 2022, a container's build had to be the host's.
pub fn servercore_tag(kernel_version: &str) -> Result<&'static str, String> {
    let build = kernel_version
        .split_whitespace()
        .nth(1)
        .and_then(|b| b.parse::<u32>().ok())
        .ok_or_else(|| {
            format!(
                "cannot read a Windows build number from the engine's kernel version \
                 {kernel_version:?} (expected e.g. \"10.0 20348 (20348.1.amd64fre…)\")"
            )
        })?;
    Ok(match build {
        14393 => "ltsc2016",
        16299 => "1709",
        17134 => "1803",
        17763 => "ltsc2019",
        18362 => "1903",
        18363 => "1909",
        19041 => "2004",
        19042 => "20H2",
        20348 => "ltsc2022",
        _ => "ltsc2025",
    })
}

/// The PowerShell command that extracts a copy step's tar (on its stdin) in a Windows
/// container: Cygwin's `tar` from `C:/`, keeping the ACL of the directory copied into
/// (extracting there leaves it writable by its new owner alone).
pub fn windows_untar_script(dst: &str) -> String {
    let dir = dst.trim_end_matches('/');
    let dir = if dst.ends_with('/') || dst.is_empty() {
        dir
    } else {
        dir.rsplit_once('/').map_or("", |(d, _)| d)
    };
    let path = format!("C:{}", if dir.is_empty() { "/" } else { dir });
    format!(
        "$path = '{}'; if (Test-Path -Path $path -PathType Container) {{ $acl = Get-Acl \
         -Path $path }}; & {LIBEXEC_TAR} -xpf - -C /cygdrive/c; if (-not $?) {{ exit 1 }}; \
         if ($acl -ne $null) {{ Set-Acl -Path $path $acl }}",
        ps_single_quoted(&path)
    )
}

/// The members of a Windows view's tar, relative to `C:/`: `/src/x`, `C:\\src\\x` and
/// `src/x` are `src/x`; `..` is refused.
pub fn windows_members(paths: &[String]) -> Result<Vec<String>, String> {
    paths
        .iter()
        .map(|p| {
            let bad = || {
                format!("copy from a build: {p:?} is not a path on a Windows container's C: drive")
            };
            let p = obuilder_spec::portability::windows_path_on_c(p).map_err(|_| bad())?;
            let parts: Vec<&str> = p
                .split('/')
                .filter(|c| !c.is_empty() && *c != ".")
                .collect();
            if parts.contains(&"..") || parts.iter().any(|c| c.contains(':')) {
                return Err(bad());
            }
            Ok(if parts.is_empty() {
                ".".to_string()
            } else {
                parts.join("/")
            })
        })
        .collect()
}

/// `s` inside a PowerShell single-quoted string: every character PowerShell takes as a
/// single quote (the ASCII one and the four typographic ones) doubled.
fn ps_single_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '\'' | '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}') {
            out.push(c);
        }
        out.push(c);
    }
    out
}

/// The Dockerfile of the image the libexec volume is filled from: servercore with Cygwin's
/// `tar` (its setup program, from cygwin.com, installs it).
pub fn libexec_dockerfile(servercore: &str) -> String {
    format!(
        "# escape=`\n\
         FROM {servercore}\n\
         ADD [\"https://www.cygwin.com/setup-x86_64.exe\", \"C:\\\\cygwin-setup.exe\"]\n\
         RUN C:\\cygwin-setup.exe --quiet-mode --no-shortcuts --no-startmenu --no-desktop `\n\
         \x20   --only-site --site https://mirrors.kernel.org/sourceware/cygwin/ `\n\
         \x20   --local-package-dir C:\\cygwin-packages --root C:\\cygwin64 --packages tar\n\
         COPY [\"extract.cmd\", \"C:\\\\extract.cmd\"]\n"
    )
}

/// Run in a container of that image with the volume at `%DESTINATION%`: copies `tar` and
/// the Cygwin DLLs it loads into the volume.
pub const LIBEXEC_EXTRACT: &str = "@echo off\r\n\
rem Copies Cygwin's tar and its DLLs into the volume at %DESTINATION%.\r\n\
copy /Y C:\\cygwin64\\bin\\tar.exe \"%DESTINATION%\\\" >NUL || exit /b 1\r\n\
copy /Y C:\\cygwin64\\bin\\cyg*.dll \"%DESTINATION%\\\" >NUL || exit /b 1\r\n";

pub struct DockerStore {
    layout: Layout,
    cli: String,
    exec: SharedExec,
    prefix: String,
    next: AtomicU64,
    platform: Platform,
    /// Windows: the servercore image that runs the helpers (known once libexec is made).
    servercore: std::sync::OnceLock<String>,
    /// The `--isolation` of helper containers: the steps' (`--docker-isolation`).
    isolation: Option<String>,
}

fn missing(e: &StoreError) -> bool {
    match e {
        StoreError::Exec(ExecError::Failed { stderr, .. }) => {
            let s = stderr.to_ascii_lowercase();
            s.contains("no such") || s.contains("not known") || s.contains("not found")
        }
        _ => false,
    }
}

impl DockerStore {
    /// A store at `root` whose images live in the engine `cli` talks to.
    pub fn new(root: impl Into<PathBuf>, cli: impl Into<String>, exec: SharedExec) -> DockerStore {
        let root = root.into();
        DockerStore {
            prefix: prefix(&root),
            layout: Layout::new(root),
            cli: cli.into(),
            exec,
            next: AtomicU64::new(0),
            platform: Platform::Linux,
            servercore: std::sync::OnceLock::new(),
            isolation: None,
        }
    }

    /// Helper containers (copies, cache copies, the libexec set-up) run with the steps'
    /// isolation: an image a step can run, a helper can too.
    pub fn with_isolation(mut self, isolation: Option<String>) -> DockerStore {
        self.isolation = isolation;
        self
    }

    /// `--isolation I`, if one is set.
    fn isolation_args(&self) -> Vec<&str> {
        match &self.isolation {
            Some(i) => vec!["--isolation", i.as_str()],
            None => vec![],
        }
    }

    /// For an engine of Windows containers.
    pub fn with_platform(mut self, platform: Platform) -> DockerStore {
        self.platform = platform;
        self
    }

    fn windows(&self) -> bool {
        self.platform == Platform::Windows
    }

    fn libexec(&self) -> String {
        format!("{}-libexec", self.prefix)
    }

    /// Fails unless the engine runs the containers this store was opened for.
    async fn check_engine(&self) -> Result<(), StoreError> {
        let os = self.cli(&["version", "--format", "{{.Server.Os}}"]).await?;
        let os = os.trim();
        if os == self.platform.to_string() {
            return Ok(());
        }
        Err(StoreError::Mismatch {
            store: self.describe(),
            what: format!(
                "the engine `{}` talks to runs {os} containers, not {} ones: give \
                 --docker-platform {os}",
                self.cli, self.platform
            ),
        })
    }

    /// Windows: the servercore image matching the engine's Windows build.
    async fn servercore(&self) -> Result<String, StoreError> {
        if let Some(s) = self.servercore.get() {
            return Ok(s.clone());
        }
        let kv = self
            .cli(&["version", "--format", "{{.Server.KernelVersion}}"])
            .await?;
        let tag = servercore_tag(kv.trim()).map_err(|what| StoreError::Mismatch {
            store: self.describe(),
            what,
        })?;
        let image = format!("mcr.microsoft.com/windows/servercore:{tag}");
        let _ = self.servercore.set(image.clone());
        Ok(image)
    }

    /// Commits `container` (run from `parent`'s image with an `--entrypoint` of its own)
    /// as result `id`, with the parent's ENTRYPOINT and CMD put back: a commit keeps the
    /// container's, which would make a step's command (or a copy's `tar`) the image's.
    /// The original did the same, except for a parent without one, whose image then took
    /// the step's.
    async fn commit_container(
        &self,
        container: &str,
        parent: &str,
        id: &str,
    ) -> Result<String, StoreError> {
        let format = "{{json .Config.Entrypoint}}\n{{json .Config.Cmd}}";
        let parent = self.image(parent);
        let config = self
            .cli(&["image", "inspect", "--format", format, &parent])
            .await?;
        let mut lines = config.lines().map(str::trim);
        let mut changes = Vec::new();
        for field in ["ENTRYPOINT", "CMD"] {
            let v = lines.next().unwrap_or("null");
            let v = if v == "null" || v.is_empty() { "[]" } else { v };
            changes.push(format!("--change={field} {v}"));
        }
        let mut args: Vec<&str> = vec!["commit"];
        args.extend(changes.iter().map(String::as_str));
        let image = self.image(id);
        args.extend([container, image.as_str()]);
        self.cli(&args).await
    }

    /// Windows: makes the libexec volume (Cygwin's `tar`) unless it is there.
    async fn ensure_libexec(&self) -> Result<(), StoreError> {
        let vol = self.libexec();
        match self
            .cli(&["volume", "inspect", "--format", "{{.Name}}", &vol])
            .await
        {
            Ok(_) => return self.servercore().await.map(|_| ()),
            Err(e) if missing(&e) => {}
            Err(e) => return Err(e),
        }
        let servercore = self.servercore().await?;
        tracing::info!("making the volume {vol} (Cygwin's tar, from {servercore})");
        let dir = self.tmp_file("libexec");
        let image = format!("{vol}-image");
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(StoreError::io("cannot write", &p))
        };
        std::fs::create_dir_all(&dir).map_err(StoreError::io("cannot create", &dir))?;
        let r = async {
            write("Dockerfile", &libexec_dockerfile(&servercore))?;
            write("extract.cmd", LIBEXEC_EXTRACT)?;
            self.cli(&["volume", "create", &vol]).await?;
            let dir_s = path_str(&dir);
            let mut build = vec!["build"];
            build.extend(self.isolation_args());
            build.extend(["--tag", &image, &dir_s]);
            self.cli(&build).await?;
            let mount = format!("type=volume,src={vol},dst={LIBEXEC_DIR}");
            let dest = format!("DESTINATION={}", LIBEXEC_DIR.replace('/', "\\"));
            let mut run = vec!["run", "--rm"];
            run.extend(self.isolation_args());
            run.extend([
                "--user",
                "ContainerAdministrator",
                "--network",
                "none",
                "--mount",
                &mount,
                "--env",
                &dest,
                "--entrypoint",
                "cmd",
                &image,
                "/S",
                "/C",
                "C:\\extract.cmd",
            ]);
            let r = self.cli(&run).await;
            let _ = self.cli_quiet(&["image", "rm", &image]).await;
            r.map(|_| ())
        }
        .await;
        let _ = std::fs::remove_dir_all(&dir);
        if r.is_err() {
            let _ = self.cli_quiet(&["volume", "rm", "-f", &vol]).await;
        }
        r
    }

    /// Windows: `run --rm` of a helper container (servercore, with Cygwin's `tar` mounted).
    async fn helper(
        &self,
        image: &str,
        mounts: &[String],
        entrypoint: &str,
        args: &[&str],
        stdin: Option<Vec<u8>>,
        name: Option<&str>,
    ) -> Result<Vec<u8>, StoreError> {
        let libexec = format!(
            "type=volume,src={},dst={LIBEXEC_DIR},readonly",
            self.libexec()
        );
        let mut argv: Vec<&str> = vec!["run"];
        match name {
            Some(n) => argv.extend(["--name", n]),
            None => argv.push("--rm"),
        }
        if stdin.is_some() {
            argv.push("-i");
        }
        argv.extend(self.isolation_args());
        argv.extend([
            "--user",
            "ContainerAdministrator",
            "--network",
            "none",
            "--env",
            CYGWIN_ENV,
            "--mount",
            &libexec,
        ]);
        for m in mounts {
            argv.extend(["--mount", m.as_str()]);
        }
        argv.extend(["--entrypoint", entrypoint, image]);
        argv.extend_from_slice(args);
        self.cli_bytes(&argv, stdin).await
    }

    /// Windows: copies volume `from` into volume `to` in a helper container (`tar` piped
    /// into `tar`, by `cmd`).
    async fn copy_volume_windows(&self, from: &str, to: &str) -> Result<(), StoreError> {
        let image = self.servercore().await?;
        let mounts = [
            format!("type=volume,src={from},dst=C:/obuilder-from,readonly"),
            format!("type=volume,src={to},dst=C:/obuilder-to"),
        ];
        let tar = LIBEXEC_TAR.replace('/', "\\");
        let script = format!(
            "{tar} -cf - -C /cygdrive/c/obuilder-from . | {tar} -xpf - -C /cygdrive/c/obuilder-to"
        );
        self.helper(&image, &mounts, "cmd", &["/S", "/C", &script], None, None)
            .await
            .map(|_| ())
    }

    /// A new temp dir for a view.
    fn view_dir(&self) -> Result<(u64, PathBuf), StoreError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .layout
            .root
            .join("state/docker-views")
            .join(format!("{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(StoreError::io("cannot create", &dir))?;
        Ok((n, dir))
    }

    /// Where a Windows cache copy is named: not a host path (the volume is the engine's),
    /// but its last component is the volume, as a local volume's mount point's is.
    fn volume_path(&self, volume: &str) -> PathBuf {
        self.layout.root.join("state/docker-volumes").join(volume)
    }

    /// Windows: a cache copy made in the engine (see `copy_volume_windows`); no owner is
    /// given to it (Windows containers have no uids).
    async fn checkout_windows(
        &self,
        name: &str,
        master: &str,
        copy: &str,
        generation: u64,
    ) -> Result<CacheCopy, StoreError> {
        match self.mountpoint(master).await {
            Ok(_) => {}
            Err(e) if missing(&e) => {
                self.cli(&["volume", "create", master]).await?;
            }
            Err(e) => return Err(e),
        }
        self.cli(&["volume", "create", copy]).await?;
        if let Err(e) = self.copy_volume_windows(master, copy).await {
            let _ = self.cli_quiet(&["volume", "rm", "-f", copy]).await;
            return Err(e);
        }
        Ok(CacheCopy {
            name: name.to_string(),
            path: self.volume_path(copy),
            generation,
        })
    }

    pub fn image(&self, id: &str) -> String {
        format!("{}:{id}", self.prefix)
    }

    pub fn container(&self, id: &str) -> String {
        format!("{}-{id}", self.prefix)
    }

    fn volume(&self, name: &str) -> String {
        format!("{}-c-{}", self.prefix, hex::encode(name))
    }

    async fn cli(&self, args: &[&str]) -> Result<String, StoreError> {
        self.cli_in(args, None).await
    }

    async fn cli_in(&self, args: &[&str], stdin: Option<Vec<u8>>) -> Result<String, StoreError> {
        let out = self.cli_bytes(args, stdin).await?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// The CLI's standard output as it is (a tar, say).
    async fn cli_bytes(
        &self,
        args: &[&str],
        stdin: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, StoreError> {
        let mut argv = vec![self.cli.as_str()];
        argv.extend_from_slice(args);
        let mut cmd = Cmd::new(argv);
        cmd.stdin = stdin;
        Ok(self.exec.output(&cmd).await?.stdout)
    }

    /// Runs a command whose "no such …" failure means there was nothing to do.
    async fn cli_quiet(&self, args: &[&str]) -> Result<(), StoreError> {
        match self.cli(args).await {
            Err(e) if missing(&e) => Ok(()),
            r => r.map(|_| ()),
        }
    }

    async fn container_exists(&self, name: &str) -> Result<bool, StoreError> {
        match self
            .cli(&["container", "inspect", "--format", "{{.Id}}", name])
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if missing(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn tmp_file(&self, what: &str) -> PathBuf {
        self.layout.root.join("state").join(format!(
            "docker-{what}-{}-{}",
            std::process::id(),
            self.next.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// `tar` of `members` (paths relative to `dir`), owners as numbers, to a temp file.
    async fn tar(&self, dir: &Path, members: &[String]) -> Result<PathBuf, StoreError> {
        let file = self.tmp_file("tar");
        let (dir_s, file_s) = (path_str(dir), path_str(&file));
        let mut argv = vec![
            "tar",
            "--numeric-owner",
            "--xattrs",
            "-C",
            &dir_s,
            "-cpf",
            &file_s,
            "--",
        ];
        argv.extend(members.iter().map(String::as_str));
        self.exec.output(&Cmd::new(argv)).await?;
        Ok(file)
    }

    /// A copy step's tree applied to its parent's image: what is at and below the
    /// destination, untarred over the image in a container, then committed.
    async fn commit_copy(&self, dir: &BuildDir, base: &str) -> Result<(), StoreError> {
        let dst = std::fs::read_to_string(dir.dir.join(obuilder_engine::build::COPY_DST))
            .unwrap_or_default();
        let rel = dst.trim_start_matches('/');
        let members: Vec<String> = if dst.ends_with('/') || dst.is_empty() {
            // Into a directory (which may exist in the image): its new entries only.
            let into = rel.trim_end_matches('/');
            entries(&dir.rootfs.join(into))?
                .iter()
                .filter_map(|p| p.file_name())
                .map(|n| path_str(&Path::new(".").join(into).join(n)))
                .collect()
        } else {
            vec![format!("./{rel}")]
        };
        if members.is_empty() {
            self.cli(&["tag", &self.image(base), &self.image(&dir.id)])
                .await?;
            return Ok(());
        }
        let tar = self.tar(&dir.rootfs, &members).await?;
        let data = std::fs::read(&tar).map_err(StoreError::io("cannot read", &tar));
        let _ = std::fs::remove_file(&tar);
        let c = self.container(&dir.id);
        let r = async {
            if self.windows() {
                // Cygwin's tar from C:/ (a spec's `/src` is `C:\\src` there), the ACL of the
                // directory copied into kept (see `windows_untar_script`).
                let script = windows_untar_script(&dst);
                self.helper(
                    &self.image(base),
                    &[],
                    "powershell",
                    &["-Command", &script],
                    Some(data?),
                    Some(&c),
                )
                .await?;
            } else {
                self.cli_in(
                    &[
                        "run",
                        "-i",
                        "--name",
                        &c,
                        "--user",
                        "0:0",
                        "--network",
                        "none",
                        "--workdir",
                        "/",
                        "--entrypoint",
                        "tar",
                        &self.image(base),
                        "-xpf",
                        "-",
                    ],
                    Some(data?),
                )
                .await?;
            }
            self.commit_container(&c, base, &dir.id).await
        }
        .await;
        let _ = self.cli_quiet(&["rm", "-f", &c]).await;
        r.map(|_| ())
    }

    /// A base image's extracted tree, imported.
    async fn commit_import(&self, dir: &BuildDir) -> Result<(), StoreError> {
        let tar = self.tar(&dir.rootfs, &[".".to_string()]).await?;
        let tar_s = path_str(&tar);
        let r = self.cli(&["import", &tar_s, &self.image(&dir.id)]).await;
        let _ = std::fs::remove_file(&tar);
        r.map(|_| ())
    }

    /// The host directory of volume `v` (a local-driver volume).
    async fn mountpoint(&self, v: &str) -> Result<PathBuf, StoreError> {
        let out = self
            .cli(&["volume", "inspect", "--format", "{{.Mountpoint}}", v])
            .await?;
        Ok(PathBuf::from(out.trim()))
    }

    async fn copy_volume(&self, from: &Path, to: &Path) -> Result<(), StoreError> {
        let (f, t) = (format!("{}/.", path_str(from)), path_str(to));
        self.exec.output(&Cmd::new(["cp", "-a", &f, &t])).await?;
        Ok(())
    }

    async fn cache_lock(&self, name: &str) -> Result<(GenLock, u64), StoreError> {
        let dir = self.layout.root.join("state/docker-caches");
        std::fs::create_dir_all(&dir).map_err(StoreError::io("cannot create", &dir))?;
        let mut lock = GenLock::take(&dir.join(format!("{}.gen", hex::encode(name)))).await?;
        let g = lock.read();
        Ok((lock, g))
    }

    /// Checked-out copies: `(volume, hex of the cache name)`.
    async fn copies(&self) -> Result<Vec<(String, String)>, StoreError> {
        let pre = format!("{}-ct-", self.prefix);
        let out = self
            .cli(&["volume", "ls", "-q", "--filter", &format!("name={pre}")])
            .await?;
        Ok(out
            .lines()
            .filter_map(|v| {
                let rest = v.trim().strip_prefix(&pre)?;
                let hexname = rest.splitn(3, '-').nth(2)?;
                Some((v.trim().to_string(), hexname.to_string()))
            })
            .collect())
    }
}

#[async_trait]
impl Store for DockerStore {
    fn root(&self) -> &Path {
        &self.layout.root
    }

    fn describe(&self) -> String {
        format!("docker:{}", self.layout.root.display())
    }

    /// Removes this store's containers and cache copies, builds left in `result-tmp`,
    /// images without a result directory (a crash between commit and publication) and
    /// result directories without an image (removed behind the store's back).
    async fn recover(&self) -> Result<(), StoreError> {
        self.layout.create()?;
        self.check_engine().await?;
        let names = self
            .cli(&[
                "ps",
                "-a",
                "--filter",
                &format!("name={}-", self.prefix),
                "--format",
                "{{.Names}}",
            ])
            .await?;
        let ours: Vec<&str> = names
            .lines()
            .map(str::trim)
            .filter(|n| n.starts_with(&format!("{}-", self.prefix)))
            .collect();
        if !ours.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ours.iter().copied());
            self.cli(&args).await?;
        }
        for (v, _) in self.copies().await? {
            tracing::info!("removing leftover cache copy {v}");
            self.cli_quiet(&["volume", "rm", "-f", &v]).await?;
        }
        for leftover in entries(&self.layout.tmp_dir())? {
            tracing::info!("removing leftover {}", leftover.display());
            remove_tree(&leftover)?;
        }
        for f in entries(&self.layout.root.join("state"))? {
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
            match name {
                Some(n) if n.starts_with("docker-tar-") => {
                    let _ = std::fs::remove_file(&f);
                }
                Some(n) if n.starts_with("docker-libexec-") => {
                    let _ = std::fs::remove_dir_all(&f);
                }
                _ => {}
            }
        }
        if self.windows() {
            self.ensure_libexec().await?;
        }
        let images = self
            .cli(&["images", "--format", "{{.Repository}}:{{.Tag}}"])
            .await?;
        let mut have = Vec::new();
        for line in images.lines().map(str::trim) {
            let Some((repo, tag)) = line.rsplit_once(':') else {
                continue;
            };
            // Podman shows local images as localhost/NAME.
            if repo.trim_start_matches("localhost/") != self.prefix {
                continue;
            }
            if self.layout.exists(tag).is_none() {
                tracing::info!("removing image {line}, which no result has");
                self.cli_quiet(&["rmi", &self.image(tag)]).await?;
            } else {
                have.push(tag.to_string());
            }
        }
        for id in self.layout.list()? {
            if !have.contains(&id) {
                tracing::info!("result {id} has lost its image; removing it");
                if let Some(moved) = self.layout.unpublish(&id)? {
                    remove_tree(&moved)?;
                }
            }
        }
        Ok(())
    }

    async fn result(&self, id: &str) -> Result<Option<PathBuf>, StoreError> {
        Ok(self.layout.exists(id))
    }

    async fn list(&self) -> Result<Vec<String>, StoreError> {
        self.layout.list()
    }

    async fn prepare(&self, id: &str, base: Option<&str>) -> Result<BuildDir, StoreError> {
        let dir = self.layout.make_tmp(id)?;
        let rootfs = dir.join("rootfs");
        let r = std::fs::create_dir(&rootfs).map_err(StoreError::io("cannot create", &rootfs));
        let r = r.and_then(|()| match base {
            Some(b) => {
                let p = dir.join("parent");
                std::fs::write(&p, b).map_err(StoreError::io("cannot write", &p))
            }
            None => Ok(()),
        });
        if let Err(e) = r {
            let _ = remove_tree(&dir);
            return Err(e);
        }
        Ok(BuildDir::at(id, dir))
    }

    async fn stale_build(&self, id: &str) -> Result<Option<BuildDir>, StoreError> {
        Ok(self.layout.stale_build(id))
    }

    async fn commit(&self, dir: &BuildDir) -> Result<PathBuf, StoreError> {
        let base = std::fs::read_to_string(dir.dir.join("parent")).ok();
        let c = self.container(&dir.id);
        match base.as_deref().map(str::trim) {
            // A run step: its container.
            Some(b) if self.container_exists(&c).await? => {
                self.commit_container(&c, b, &dir.id).await?;
                self.cli(&["rm", "-f", &c]).await?;
            }
            Some(b) => self.commit_copy(dir, b).await?,
            // A base image: pulled by the engine (DockerPull) and tagged, or imported.
            None => match std::fs::read_to_string(dir.dir.join(PULLED)) {
                Ok(image) => {
                    self.cli(&["tag", image.trim(), &self.image(&dir.id)])
                        .await?;
                }
                Err(_) => self.commit_import(dir).await?,
            },
        }
        // The staging tree is not the result (the image is): keep an empty rootfs.
        remove_tree(&dir.rootfs)?;
        std::fs::create_dir(&dir.rootfs).map_err(StoreError::io("cannot create", &dir.rootfs))?;
        self.layout.publish(&dir.id)
    }

    /// A failed `run` step kept (`build --keep-failed`): its container, committed as
    /// `PREFIX:ID`. A copy step or a base image leaves no container, and is not kept.
    async fn commit_as(&self, dir: &BuildDir, id: &str) -> Result<PathBuf, StoreError> {
        let c = self.container(&dir.id);
        if !self.container_exists(&c).await? {
            return Err(StoreError::Mismatch {
                store: self.describe(),
                what: "only a failed run step (a container) can be kept".into(),
            });
        }
        let base = std::fs::read_to_string(dir.dir.join("parent")).unwrap_or_default();
        self.commit_container(&c, base.trim(), id).await?;
        self.cli(&["rm", "-f", &c]).await?;
        remove_tree(&dir.rootfs)?;
        std::fs::create_dir(&dir.rootfs).map_err(StoreError::io("cannot create", &dir.rootfs))?;
        self.layout.publish_as(&dir.id, id)
    }

    async fn discard(&self, dir: &BuildDir) -> Result<(), StoreError> {
        self.cli_quiet(&["rm", "-f", &self.container(&dir.id)])
            .await?;
        remove_tree(&dir.dir)
    }

    async fn delete(&self, id: &str) -> Result<(), StoreError> {
        if let Some(moved) = self.layout.unpublish(id)? {
            self.cli_quiet(&["rmi", &self.image(id)]).await?;
            remove_tree(&moved)?;
        }
        Ok(())
    }

    /// Windows: the files at `paths` of result `id` (Windows containers cannot be
    /// exported), tarred by Cygwin's tar in a container of its image, into a temp dir.
    async fn view_paths(&self, id: &str, paths: &[String]) -> Result<PathBuf, StoreError> {
        if !self.windows() {
            return self.view(id).await;
        }
        let members = windows_members(paths).map_err(|what| StoreError::Mismatch {
            store: self.describe(),
            what,
        })?;
        let (_, dir) = self.view_dir()?;
        let tar = self.tmp_file("tar");
        let r = async {
            let mut args = vec!["-cf", "-", "-C", "/cygdrive/c", "--"];
            args.extend(members.iter().map(String::as_str));
            let data = self
                .helper(&self.image(id), &[], LIBEXEC_TAR, &args, None, None)
                .await?;
            std::fs::write(&tar, data).map_err(StoreError::io("cannot write", &tar))?;
            let (tar_s, dir_s) = (path_str(&tar), path_str(&dir));
            self.exec
                .output(&Cmd::new(["tar", "-xpf", &tar_s, "-C", &dir_s]))
                .await?;
            Ok::<(), StoreError>(())
        }
        .await;
        let _ = std::fs::remove_file(&tar);
        if let Err(e) = r {
            let _ = remove_tree(&dir);
            return Err(e);
        }
        Ok(dir)
    }

    /// The result's whole tree, exported from a container of its image into a temp dir.
    async fn view(&self, id: &str) -> Result<PathBuf, StoreError> {
        let (n, dir) = self.view_dir()?;
        let c = format!("{}-view-{}-{n}", self.prefix, std::process::id());
        let tar = self.tmp_file("tar");
        let (tar_s, dir_s) = (path_str(&tar), path_str(&dir));
        let r = async {
            self.cli(&["create", "--name", &c, &self.image(id), "obuilder-view"])
                .await?;
            self.cli(&["export", "-o", &tar_s, &c]).await?;
            self.exec
                .output(&Cmd::new([
                    "tar",
                    "--numeric-owner",
                    "-xpf",
                    &tar_s,
                    "-C",
                    &dir_s,
                ]))
                .await?;
            Ok::<(), StoreError>(())
        }
        .await;
        let _ = self.cli_quiet(&["rm", "-f", &c]).await;
        let _ = std::fs::remove_file(&tar);
        if let Err(e) = r {
            let _ = remove_tree(&dir);
            return Err(e);
        }
        Ok(dir)
    }

    async fn release_view(&self, view: &Path) -> Result<(), StoreError> {
        remove_tree(view)
    }

    async fn cache_checkout(
        &self,
        name: &str,
        uid: u32,
        gid: u32,
    ) -> Result<CacheCopy, StoreError> {
        let master = self.volume(name);
        let copy = format!(
            "{}-ct-{}-{}-{}",
            self.prefix,
            std::process::id(),
            self.next.fetch_add(1, Ordering::Relaxed),
            hex::encode(name)
        );
        let (_lock, generation) = self.cache_lock(name).await?;
        if self.windows() {
            return self
                .checkout_windows(name, &master, &copy, generation)
                .await;
        }
        let master_mp = match self.mountpoint(&master).await {
            Ok(p) => p,
            Err(e) if missing(&e) => {
                self.cli(&["volume", "create", &master]).await?;
                self.mountpoint(&master).await?
            }
            Err(e) => return Err(e),
        };
        self.cli(&["volume", "create", &copy]).await?;
        let r = async {
            let path = self.mountpoint(&copy).await?;
            self.copy_volume(&master_mp, &path).await?;
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .map_err(StoreError::io("cannot chown", &path))?;
            Ok::<PathBuf, StoreError>(path)
        }
        .await;
        match r {
            Ok(path) => Ok(CacheCopy {
                name: name.to_string(),
                path,
                generation,
            }),
            Err(e) => {
                let _ = self.cli_quiet(&["volume", "rm", "-f", &copy]).await;
                Err(e)
            }
        }
    }

    async fn cache_release(&self, copy: CacheCopy, keep: bool) -> Result<(), StoreError> {
        // The copy's volume, from its mount point (…/VOLUME/_data on a local driver).
        let volume = copy
            .path
            .ancestors()
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .find(|n| n.starts_with(&format!("{}-ct-", self.prefix)))
            .ok_or_else(|| StoreError::Mismatch {
                store: self.describe(),
                what: format!("{} is not a cache copy of this store", copy.path.display()),
            })?;
        if keep {
            let (mut lock, g) = self.cache_lock(&copy.name).await?;
            if g == copy.generation {
                let master = self.volume(&copy.name);
                // Replaced, not merged: deletions made in the copy survive.
                self.cli_quiet(&["volume", "rm", "-f", &master]).await?;
                self.cli(&["volume", "create", &master]).await?;
                if self.windows() {
                    self.copy_volume_windows(&volume, &master).await?;
                } else {
                    let mp = self.mountpoint(&master).await?;
                    self.copy_volume(&copy.path, &mp).await?;
                }
                lock.write(g + 1).map_err(StoreError::io(
                    "cannot write",
                    self.layout.root.join("state"),
                ))?;
            } else {
                tracing::info!(
                    "cache {:?}: a newer version was published first; discarding this copy",
                    copy.name
                );
            }
        }
        self.cli_quiet(&["volume", "rm", "-f", &volume]).await
    }

    async fn cache_list(&self) -> Result<Vec<CacheInfo>, StoreError> {
        let pre = format!("{}-c-", self.prefix);
        let out = self
            .cli(&["volume", "ls", "-q", "--filter", &format!("name={pre}")])
            .await?;
        let copies = self.copies().await?;
        let mut list: Vec<CacheInfo> = out
            .lines()
            .filter_map(|v| {
                let h = v.trim().strip_prefix(&pre)?;
                let name = String::from_utf8(hex::decode(h).ok()?).ok()?;
                Some(CacheInfo {
                    in_use: copies.iter().filter(|(_, c)| c == h).count(),
                    name,
                })
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(list)
    }

    async fn cache_delete(&self, name: &str) -> Result<(), StoreError> {
        let (_lock, _) = self.cache_lock(name).await?;
        let master = self.volume(name);
        if let Err(e) = self.mountpoint(&master).await {
            return if missing(&e) {
                Err(StoreError::NoCache {
                    name: name.to_string(),
                })
            } else {
                Err(e)
            };
        }
        let h = hex::encode(name);
        let users = self.copies().await?.iter().filter(|(_, c)| *c == h).count();
        if users > 0 {
            return Err(StoreError::CacheInUse {
                name: name.to_string(),
                users,
            });
        }
        self.cli(&["volume", "rm", &master]).await.map(|_| ())
    }
}
