//! What comes after `Got: ID`: `obuilder log|inspect|run|export|push` on a result, named
//! by its id, a unique prefix of it (4 characters at least), or a name `build --tag` gave.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use obuilder_engine::fetch::ImageConfig;
use obuilder_engine::log::StepLog;
use obuilder_engine::sandbox::{RunConfig, SandboxError};
use obuilder_engine::Builder;
use obuilder_fetch::export::{export_tree, image_of, Destination};
use obuilder_fetch::images::{ImageRecord, ImageStore};
use obuilder_fetch::reference::Reference;
use obuilder_fetch::registry::{Progress, ProgressSink, Registry};
use serde_json::json;

use super::process::{exit, interrupt, interrupted_code, usage};
use super::setup::{builder_config, open, RegistryArgs, SandboxArgs, StoreArgs};

/// A result as the user named it.
pub struct Named {
    pub id: String,
    /// For a tag: the context its build ended in (else the result's own).
    pub config: Option<ImageConfig>,
}

/// Finds the result `name` stands for: a tag, a whole id, or a unique id prefix.
pub async fn find(builder: &Builder, images: &ImageStore, name: &str) -> anyhow::Result<Named> {
    if let Some(rec) = images.get(name)? {
        if let Some(id) = rec.result {
            return Ok(Named {
                id,
                config: Some(rec.config),
            });
        }
        return Err(usage(format!(
            "{name:?} is a base image, not a result; build on it with (from {name})"
        )));
    }
    let hex = !name.is_empty() && name.bytes().all(|b| b.is_ascii_hexdigit());
    if hex && builder.store().result(name).await?.is_some() {
        return Ok(Named {
            id: name.to_string(),
            config: ended_with(images, name),
        });
    }
    if hex && name.len() >= 4 {
        let all = builder.store().list().await?;
        let hits: Vec<&String> = all.iter().filter(|id| id.starts_with(name)).collect();
        match hits.as_slice() {
            [one] => {
                return Ok(Named {
                    id: (*one).clone(),
                    config: ended_with(images, one),
                })
            }
            [] => {}
            many => {
                return Err(usage(format!(
                    "{name:?} is the start of {} results; give more of the id",
                    many.len()
                )))
            }
        }
    }
    Err(usage(format!(
        "no result or tag {name:?} in {} (a build prints its result as `Got: \"ID\"`; `build --tag NAME` names one)",
        builder.store().describe()
    )))
}

fn ends_path(images: &ImageStore, id: &str) -> PathBuf {
    images.dir().join("ends").join(format!("{id}.json"))
}

/// The context the last build that ended at `id` ended in (a spec's `env` or `workdir`
/// after its last step is in no step's own `config.json`).
fn ended_with(images: &ImageStore, id: &str) -> Option<ImageConfig> {
    let b = std::fs::read(ends_path(images, id)).ok()?;
    serde_json::from_slice(&b).ok()
}

/// Records what a build of `id` ended with, for `run`, `export` and `push` by id.
pub fn record_end(images: &ImageStore, id: &str, config: &ImageConfig) -> anyhow::Result<()> {
    let p = ends_path(images, id);
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    let data = serde_json::to_vec(config)?;
    // A rebuild that ends where the last one did (every fully cached build) finds the same
    // record: reading it costs less than replacing it.
    if std::fs::read(&p).is_ok_and(|old| old == data) {
        return Ok(());
    }
    obuilder_fetch::images::write_replacing(&p, &data)?;
    Ok(())
}

/// Gives result `id` the name `name`, with the context its build ended in.
pub fn tag(images: &ImageStore, name: &str, id: &str, config: ImageConfig) -> anyhow::Result<()> {
    check_tag(name)?;
    if let Some(old) = images.get(name)? {
        if old.result.is_none() {
            return Err(usage(format!(
                "--tag {name}: a base image has that name; remove it first (obuilder image rm {name}) or choose another"
            )));
        }
    }
    images.put(&ImageRecord {
        name: name.to_string(),
        digest: format!(
            "sha256:{}",
            obuilder_engine::key::sha256_hex(format!("obuilder-result\0{id}").as_bytes())
        ),
        layers: Vec::new(),
        config,
        source: format!("result {id}"),
        imported: obuilder_engine::db::now(),
        registry: None,
        result: Some(id.to_string()),
        diff_ids: Vec::new(),
    })?;
    Ok(())
}

/// A tag is what `(from NAME)` can say: lowercase letters, digits, `._-/:`, not a bare id.
pub fn check_tag(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/:".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if !ok {
        return Err(usage(format!(
            "{name:?} is not a valid name: use lowercase letters, digits and . _ - / :, starting with a letter or digit"
        )));
    }
    if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(usage(format!(
            "{name:?} looks like a result id; choose a name"
        )));
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct LogArgs {
    /// The result: its id (or a unique prefix) or a --tag name.
    #[arg(value_name = "ID|TAG")]
    id: String,
    #[command(flatten)]
    store: StoreArgs,
}

/// `obuilder log ID`: the step's stored log.
pub async fn log(a: LogArgs) -> anyhow::Result<ExitCode> {
    let config = a.store.config()?;
    let b = open(&config).await?;
    let named = find(&b, &config.images(), &a.id).await?;
    let dir = b
        .store()
        .result(&named.id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("result {} has gone", named.id))?;
    let text = std::fs::read(dir.join("log")).unwrap_or_default();
    super::process::out(format_args!("{}", String::from_utf8_lossy(&text)))?;
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
pub struct InspectArgs {
    /// The result: its id (or a unique prefix) or a --tag name.
    #[arg(value_name = "ID|TAG")]
    id: String,
    /// `text` (default) or `json`.
    #[arg(long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
    format: String,
    #[command(flatten)]
    store: StoreArgs,
}

fn tree_size(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut n = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&p) else {
            continue;
        };
        for e in rd.flatten() {
            if let Ok(m) = e.metadata() {
                n += m.blocks() * 512;
                if m.is_dir() {
                    stack.push(e.path());
                }
            }
        }
    }
    n
}

/// `obuilder inspect ID`: parents, times, size, config.
pub async fn inspect(a: InspectArgs) -> anyhow::Result<ExitCode> {
    let config = a.store.config()?;
    let b = open(&config).await?;
    let named = find(&b, &config.images(), &a.id).await?;
    let info = b
        .info(&named.id)?
        .ok_or_else(|| anyhow::anyhow!("result {} is not in the database", named.id))?;
    let mut chain = Vec::new();
    let mut at = info.parent.clone();
    while let Some(p) = at {
        at = b.info(&p)?.and_then(|i| i.parent);
        chain.push(p);
    }
    let dir = b.store().result(&named.id).await?;
    // The step, as its heading said (results from before steps recorded it: none).
    let step = dir
        .as_ref()
        .and_then(|d| std::fs::read_to_string(d.join("step")).ok())
        .map(|s| s.trim_end().to_string())
        .or_else(|| {
            dir.as_ref()
                .filter(|d| d.join("image.json").exists())
                .map(|_| "(from …): a base image".to_string())
        })
        .unwrap_or_default();
    let size = dir
        .as_ref()
        .map(|d| tree_size(&d.join("rootfs")))
        .unwrap_or(0);
    let image_config = match named.config.clone() {
        Some(c) => c,
        None => b.result_config(&named.id).await?.unwrap_or_default(),
    };
    let tags: Vec<String> = config
        .images()
        .list()?
        .into_iter()
        .filter(|r| r.result.as_deref() == Some(named.id.as_str()))
        .map(|r| r.name)
        .collect();
    if a.format == "json" {
        let v = json!({
            "id": named.id,
            "parent": info.parent,
            "parents": chain,
            "created": info.created,
            "last_used": info.used,
            "children": info.children,
            "size": size,
            "step": step,
            "tags": tags,
            "config": {
                "env": image_config.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
                "workdir": image_config.workdir,
                "user": image_config.user,
                "shell": image_config.shell,
            },
            "path": dir,
        });
        crate::outln!("{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    crate::outln!("id:        {}", named.id)?;
    if !tags.is_empty() {
        crate::outln!("tags:      {}", tags.join(", "))?;
    }
    crate::outln!("created:   {}", info.created)?;
    crate::outln!("last used: {}", info.used)?;
    crate::outln!(
        "size:      {} (this step's tree as stored)",
        obuilder_engine::log::human_bytes(size)
    )?;
    crate::outln!("children:  {}", info.children)?;
    if !step.is_empty() {
        crate::outln!("step:      {step}")?;
    }
    crate::outln!("parents:   {} (nearest first)", chain.len())?;
    for p in &chain {
        crate::outln!("  {p}")?;
    }
    crate::outln!(
        "workdir:   {}",
        image_config.workdir.as_deref().unwrap_or("/")
    )?;
    crate::outln!(
        "user:      {}",
        image_config.user.as_deref().unwrap_or("0:0")
    )?;
    if let Some(s) = &image_config.shell {
        crate::outln!("shell:     {}", s.join(" "))?;
    }
    crate::outln!("env:")?;
    for (k, v) in &image_config.env {
        crate::outln!("  {k}={v}")?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// The result: its id (or a unique prefix) or a --tag name.
    #[arg(value_name = "ID|TAG")]
    id: String,
    /// The command and its arguments, after `--` (e.g. `-- /bin/sh -c 'ls /'`). Its
    /// standard input is empty.
    #[arg(value_name = "CMD", last = true, required = true)]
    cmd: Vec<String>,
    /// Give the command this process's standard input (default: empty).
    #[arg(short, long)]
    interactive: bool,
    /// Give the command the host's network (default: loopback only, as steps).
    #[arg(long)]
    network_host: bool,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

#[derive(clap::Args)]
pub struct ShellArgs {
    /// The result: its id (or a unique prefix) or a --tag name.
    #[arg(value_name = "ID|TAG")]
    id: String,
    /// Give the shell the host's network (default: loopback only, as steps).
    #[arg(long)]
    network_host: bool,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

/// `obuilder shell ID`: the result's shell (`/bin/sh` if it has none recorded), reading
/// this terminal, in a throw-away snapshot. On a terminal, runc gives the shell a terminal
/// of its own and the user sandbox this one. What the shell changes is thrown away.
pub async fn shell(a: ShellArgs) -> anyhow::Result<ExitCode> {
    run(RunArgs {
        id: a.id,
        cmd: Vec::new(),
        interactive: true,
        network_host: a.network_host,
        store: a.store,
        sandbox: a.sandbox,
    })
    .await
}

/// A fresh id for a throw-away snapshot (never a result's: results are hashes of inputs).
fn scratch_id() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    obuilder_engine::key::sha256_hex(
        format!("obuilder-run\0{}\0{t}", std::process::id()).as_bytes(),
    )
}

/// `obuilder run ID -- CMD…`: the command in a throw-away snapshot of the result, in the
/// sandbox steps use, with the result's env, workdir and user. Exits as the command did.
pub async fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let config = builder_config(&a.store, &a.sandbox, None, None)?;
    let b = open(&config).await?;
    let named = find(&b, &config.images(), &a.id).await?;
    let ctx = match named.config {
        Some(c) => c,
        None => b.result_config(&named.id).await?.unwrap_or_default(),
    };
    let user = match ctx.user.as_deref().unwrap_or("0:0").split_once(':') {
        Some((u, g)) => obuilder_spec::User::Unix {
            uid: u.parse().unwrap_or(0),
            gid: g.parse().unwrap_or(0),
        },
        None => obuilder_spec::User::Name(ctx.user.clone().unwrap_or_default()),
    };
    let user_name = user.name().map(String::from);
    let user = b.sandbox().user(&user)?;
    let argv = if a.cmd.is_empty() {
        // `shell`: the shell steps ran with (its `-c` dropped), interactive.
        let sh = ctx
            .shell
            .as_ref()
            .and_then(|s| s.first().cloned())
            .unwrap_or_else(|| "/bin/sh".into());
        vec![sh, "-i".into()]
    } else {
        a.cmd.clone()
    };
    let store = b.store().clone();
    let scratch = scratch_id();
    let dir = store.prepare(&scratch, Some(&named.id)).await?;
    let run = async {
        let steplog = StepLog::create(&dir.dir.join("log"))?;
        let follow = {
            let l = steplog.clone();
            tokio::spawn(async move {
                let _ = l
                    .follow(|b| {
                        let _ = super::process::out(format_args!("{}", String::from_utf8_lossy(b)));
                    })
                    .await;
            })
        };
        let rc = RunConfig {
            argv,
            env: ctx.env.clone(),
            cwd: ctx.workdir.clone().unwrap_or_else(|| "/".into()),
            user,
            user_name,
            network: if a.network_host {
                vec!["host".into()]
            } else {
                Vec::new()
            },
            caches: Vec::new(),
            secrets: Vec::new(),
            stdin: a.interactive,
        };
        let cancel = interrupt().child_token();
        let r = b.sandbox().run(&rc, &dir.rootfs, &steplog, &cancel).await;
        steplog.finish();
        let _ = follow.await;
        anyhow::Ok(r)
    }
    .await;
    if let Err(e) = store.discard(&dir).await {
        tracing::warn!("discarding the throw-away snapshot {}: {e}", dir.id);
    }
    match run? {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(SandboxError::Failed { status, .. }) => Ok(ExitCode::from(status.clamp(1, 255) as u8)),
        Err(SandboxError::Signalled { signal, .. }) => Ok(ExitCode::from(exit::signal(signal))),
        Err(SandboxError::Cancelled) => {
            Ok(interrupted_code().unwrap_or(ExitCode::from(exit::signal(2))))
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The result: its id (or a unique prefix) or a --tag name.
    #[arg(value_name = "ID|TAG")]
    pub(crate) id: String,
    /// oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:NAME:TAG] or tar:FILE
    /// (the whole tree, no image metadata).
    #[arg(value_name = "DEST")]
    pub(crate) dest: String,
    /// Compress the steps' layers: gzip, or none (auto = none for files).
    #[arg(long, value_enum, value_name = "HOW", default_value_t = Compress::Auto)]
    pub(crate) compress: Compress,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
}

/// How layers made from steps are compressed (a base image's layers stay as pulled).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compress {
    /// gzip for a registry that is not on this machine, none otherwise.
    Auto,
    Gzip,
    None,
}

fn layer_progress() -> impl Fn(usize, usize, &str) + Sync {
    |n, total, id| {
        eprintln!("Layer {n}/{total}: step {}", &id[..id.len().min(12)]);
    }
}

/// `obuilder export ID DEST`: the result as an image (a layer per step) or a tar.
pub async fn export(a: ExportArgs) -> anyhow::Result<ExitCode> {
    let dest: Destination = a.dest.parse().map_err(usage)?;
    let config = a.store.config()?;
    let b = open(&config).await?;
    let images = config.images();
    let named = find(&b, &images, &a.id).await?;
    if let Destination::Tar { file } = &dest {
        export_tree(&b, &named.id, file)
            .await
            .map_err(anyhow::Error::msg)?;
        crate::outln!("Wrote {} ({})", file.display(), named.id)?;
        return Ok(ExitCode::SUCCESS);
    }
    let gzip = a.compress == Compress::Gzip;
    let image = image_of(
        &b,
        &images,
        &named.id,
        named.config,
        gzip,
        &layer_progress(),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    match &dest {
        Destination::Oci { dir, tag } => image.write_oci_dir(&images, dir, tag.as_deref())?,
        Destination::OciArchive { file, tag } => {
            image.write_oci_archive(&images, file, tag.as_deref())?
        }
        Destination::DockerArchive { file, tag } => {
            image.write_docker_archive(&images, file, tag.as_deref())?
        }
        Destination::Tar { .. } => unreachable!("handled above"),
    }
    crate::outln!(
        "Exported {} to {}: {} ({} layer{})",
        named.id,
        a.dest,
        image.manifest_digest(),
        image.layers.len(),
        if image.layers.len() == 1 { "" } else { "s" }
    )?;
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
pub struct PushArgs {
    /// The result: its id (or a unique prefix) or a --tag name.
    #[arg(value_name = "ID|TAG")]
    pub(crate) id: String,
    /// Where to: `HOST[:PORT]/REPO[:TAG]` (credentials as for pulls: ~/.docker/config.json).
    #[arg(value_name = "REF")]
    pub(crate) reference: String,
    /// Compress the steps' layers: auto (gzip unless the registry is on loopback), gzip,
    /// or none.
    #[arg(long, value_enum, value_name = "HOW", default_value_t = Compress::Auto)]
    pub(crate) compress: Compress,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    #[command(flatten)]
    pub(crate) registry: RegistryArgs,
}

/// `obuilder push ID REF`: export to a registry, sending only the blobs it lacks.
pub async fn push(a: PushArgs) -> anyhow::Result<ExitCode> {
    let reference: Reference = a.reference.parse().map_err(usage)?;
    if reference.digest.is_some() {
        return Err(usage(format!(
            "{}: push to a tag, not a digest (the digest is what the push prints)",
            a.reference
        )));
    }
    let config = a.store.config()?;
    let b = open(&config).await?;
    let images = config.images();
    let named = find(&b, &images, &a.id).await?;
    // Loopback registries take the tars as they are (compressing costs more than sending);
    // others get gzip.
    let gzip = match a.compress {
        Compress::Auto => !reference.is_loopback(),
        c => c == Compress::Gzip,
    };
    let image = image_of(
        &b,
        &images,
        &named.id,
        named.config,
        gzip,
        &layer_progress(),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let opts = a.registry.fetch()?.registry.unwrap_or_default();
    let registry = Registry::new(opts);
    let bars = super::setup::progress_bars();
    let progress: ProgressSink = Arc::new(move |p: &Progress| {
        bars(p);
        match p {
            Progress::Cached { digest } => eprintln!("Already there: {digest}"),
            Progress::Done { digest } => eprintln!("Uploaded {digest}"),
            _ => {}
        }
    });
    let stats = registry
        .push(&reference, &images, &image, &progress)
        .await?;
    crate::outln!(
        "Pushed {} as {reference}@{} ({} blob{} uploaded, {}; {} already there)",
        named.id,
        stats.digest,
        stats.uploaded,
        if stats.uploaded == 1 { "" } else { "s" },
        obuilder_engine::log::human_bytes(stats.bytes),
        stats.skipped
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Where `--iidfile` writes, through a temp file.
pub fn write_iidfile(path: &Path, id: &str) -> anyhow::Result<()> {
    obuilder_fetch::images::write_replacing(path, id.as_bytes())
        .map_err(|e| anyhow::anyhow!("--iidfile {}: {e}", path.display()))
}

/// After results are deleted (`delete`, `clean`, `prune`, which have the store to
/// themselves): forgets what was kept beside them (the context a build ended in, the
/// memo of their export layers), then deletes the blobs nothing refers to any more (layers
/// exported from deleted results, image configs and manifests of exports; an export makes
/// them again). Blobs of local images stay. Returns how many bytes were freed.
pub async fn sweep(b: &Builder, images: &ImageStore) -> anyhow::Result<u64> {
    let live: std::collections::HashSet<String> = b.store().list().await?.into_iter().collect();
    let side = |dir: &str| images.dir().join(dir);
    for (dir, suffix) in [("ends", ".json"), ("layers", "")] {
        let Ok(rd) = std::fs::read_dir(side(dir)) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.strip_suffix(suffix).unwrap_or(&name);
            let id = id.strip_suffix(".gz").unwrap_or(id);
            if !live.contains(id) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let mut keep: std::collections::HashSet<String> = std::collections::HashSet::new();
    for rec in images.list()? {
        keep.extend(rec.layers);
    }
    if let Ok(rd) = std::fs::read_dir(side("layers")) {
        for e in rd.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            match serde_json::from_str::<Vec<obuilder_fetch::export::Layer>>(&text) {
                Ok(layers) => keep.extend(layers.into_iter().map(|l| l.digest)),
                // A memo that cannot be read keeps nothing alive; it is made again.
                Err(_) => {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    let mut freed = 0;
    let blobs = images.dir().join("blobs/sha256");
    if let Ok(rd) = std::fs::read_dir(&blobs) {
        for e in rd.flatten() {
            let digest = format!("sha256:{}", e.file_name().to_string_lossy());
            if !keep.contains(&digest) {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                if std::fs::remove_file(e.path()).is_ok() {
                    freed += len;
                }
            }
        }
    }
    Ok(freed)
}
