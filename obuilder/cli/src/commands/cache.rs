//! `obuilder cache ls|rm`: the shared caches of `(run (cache (NAME (target PATH))) …)`.
//! Neither opens a sandbox; `ls` changes nothing and refuses a path with no store.

use std::process::ExitCode;

use super::process::exit;
use super::setup::{FormatArgs, StoreArgs};

#[derive(clap::Subcommand)]
pub enum Command {
    /// List shared caches and how many running steps use each.
    Ls {
        #[command(flatten)]
        format: FormatArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Delete a shared cache (refused while a step uses it).
    Rm {
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

pub async fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Ls { format, store } => {
            let s = store.config()?.open_existing_store()?;
            if format.json() {
                let v: Vec<serde_json::Value> = s
                    .cache_list()
                    .await?
                    .into_iter()
                    .map(|c| serde_json::json!({"name": c.name, "in_use": c.in_use}))
                    .collect();
                crate::outln!("{}", serde_json::to_string_pretty(&v)?)?;
                return Ok(ExitCode::SUCCESS);
            }
            crate::outln!("{:<40} IN USE", "NAME")?;
            for c in s.cache_list().await? {
                crate::outln!(
                    "{:<40} {}",
                    obuilder_spec::sexp::quote_if_needed(&c.name),
                    c.in_use
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Rm { name, store } => {
            let s = store.config()?.open_existing_store()?;
            match s.cache_delete(&name).await {
                Ok(()) => {
                    crate::outln!("Removed cache {name:?}")?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(e @ obuilder_engine::store::StoreError::NoCache { .. }) => {
                    eprintln!("obuilder: {e}");
                    Ok(ExitCode::from(exit::USAGE))
                }
                Err(e) => {
                    eprintln!("obuilder: {e}");
                    Ok(ExitCode::from(exit::FAILED))
                }
            }
        }
    }
}
