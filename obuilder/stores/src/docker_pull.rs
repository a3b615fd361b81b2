//! Base images pulled by the engine (`(from IMAGE)` on a docker: store of a Windows
//! engine), as the original's Docker fetcher: `CLI pull IMAGE`, then the base step's
//! result is the pulled image tagged with the store's name (see `docker::PULLED`).
//! Windows images cannot go through obuilder's own fetcher: their base layers are
//! "foreign" (the engine fetches them from Microsoft's servers), and `import` cannot
//! take a Windows tree.
//!
//! The base id comes from the image's id (the digest of its config), so a tag that moved
//! is a new base, as with the registry fetcher. When the pull fails (the registry cannot
//! be reached) an image already in the engine is used, with a note in the log.

use std::path::Path;

use async_trait::async_trait;
use obuilder_engine::exec::{Cmd, SharedExec};
use obuilder_engine::fetch::{FetchError, Fetcher, ImageConfig, ResolvedImage};
use obuilder_engine::log::{LogEvent, LogSink};

pub struct DockerPull {
    cli: String,
    exec: SharedExec,
}

impl DockerPull {
    pub fn new(cli: impl Into<String>, exec: SharedExec) -> DockerPull {
        DockerPull {
            cli: cli.into(),
            exec,
        }
    }

    async fn cli(&self, name: &str, args: &[&str]) -> Result<String, FetchError> {
        let mut argv = vec![self.cli.as_str()];
        argv.extend_from_slice(args);
        match self.exec.output(&Cmd::new(argv)).await {
            Ok(o) => Ok(o.stdout_str()),
            Err(e) => Err(FetchError::Bad {
                name: name.into(),
                message: e.to_string(),
            }),
        }
    }
}

/// What a build takes from `image inspect --format {{json .Config}}`.
pub fn config_of(name: &str, json: &str) -> Result<ImageConfig, FetchError> {
    let c: serde_json::Value = serde_json::from_str(json.trim()).map_err(|e| FetchError::Bad {
        name: name.into(),
        message: format!("the engine's image config is not JSON ({e}): {json:?}"),
    })?;
    let text = |k: &str| c[k].as_str().filter(|s| !s.is_empty()).map(String::from);
    let list = |k: &str| {
        c[k].as_array().map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect::<Vec<_>>()
        })
    };
    Ok(ImageConfig {
        env: list("Env")
            .unwrap_or_default()
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        workdir: text("WorkingDir"),
        user: text("User"),
        entrypoint: list("Entrypoint"),
        shell: None,
    })
}

#[async_trait]
impl Fetcher for DockerPull {
    async fn resolve(&self, name: &str, log: &LogSink) -> Result<ResolvedImage, FetchError> {
        if name.is_empty() || name.starts_with('-') || name.contains(char::is_whitespace) {
            return Err(FetchError::Bad {
                name: name.into(),
                message: "not an image reference the engine can pull".into(),
            });
        }
        if let Err(e) = self.cli(name, &["pull", name]).await {
            // Offline: an image the engine has already will do.
            match self
                .cli(name, &["image", "inspect", "--format", "{{.Id}}", name])
                .await
            {
                Ok(_) => log(&LogEvent::Note(format!(
                    "Cannot pull {name} ({e}); using the engine's copy"
                ))),
                Err(_) => return Err(e),
            }
        }
        let id = self
            .cli(name, &["image", "inspect", "--format", "{{.Id}}", name])
            .await?;
        let id = id.trim();
        // Docker says `sha256:HEX`, podman the bare HEX.
        let hex = id.strip_prefix("sha256:").unwrap_or(id);
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(FetchError::Bad {
                name: name.into(),
                message: format!("the engine gave the image id {id:?}, not sha256:HEX"),
            });
        }
        Ok(ResolvedImage {
            name: name.into(),
            digest: format!("sha256:{hex}"),
            source: serde_json::json!({ "docker_image": id }),
            result: None,
        })
    }

    async fn fetch(
        &self,
        image: &ResolvedImage,
        rootfs: &Path,
        log: &LogSink,
    ) -> Result<ImageConfig, FetchError> {
        let bad = |message: String| FetchError::Bad {
            name: image.name.clone(),
            message,
        };
        let id = image.source["docker_image"]
            .as_str()
            .ok_or_else(|| bad("not resolved by the engine".into()))?;
        let json = self
            .cli(
                &image.name,
                &["image", "inspect", "--format", "{{json .Config}}", id],
            )
            .await?;
        let config = config_of(&image.name, &json)?;
        // The store tags the image when it commits the base step.
        let dir = rootfs
            .parent()
            .ok_or_else(|| bad(format!("{} is not a build's tree", rootfs.display())))?;
        let marker = dir.join(crate::docker::PULLED);
        std::fs::write(&marker, id).map_err(|source| FetchError::Io {
            name: image.name.clone(),
            what: format!("cannot write {}", marker.display()),
            source,
        })?;
        log(&LogEvent::Note(format!("Pulled {} ({id})", image.name)));
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_config_gives_env_workdir_user_and_entrypoint() {
        let c = config_of(
            "x",
            r#"{"Env":["PATH=C:\\Windows\\system32;C:\\Windows","A=b=c"],"WorkingDir":"","User":"ContainerAdministrator","Entrypoint":null,"Cmd":["c:\\windows\\system32\\cmd.exe"]}"#,
        )
        .unwrap();
        assert_eq!(
            c.env,
            vec![
                (
                    "PATH".to_string(),
                    "C:\\Windows\\system32;C:\\Windows".to_string()
                ),
                ("A".to_string(), "b=c".to_string())
            ]
        );
        assert_eq!(c.workdir, None);
        assert_eq!(c.user.as_deref(), Some("ContainerAdministrator"));
        assert_eq!(c.entrypoint, None);
        assert!(config_of("x", "null").unwrap().env.is_empty());
        assert!(config_of("x", "not json").is_err());
    }
}
