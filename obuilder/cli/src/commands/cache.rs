//! `obuilder cache ls|rm`: the shared caches of `(run (cache (NAME (target PATH))) …)`.

use std::process::ExitCode;

use super::setup::{builder, SandboxArgs, StoreArgs};

#[derive(clap::Subcommand)]
pub enum Command {
    /// List shared caches and how many running steps use each.
    Ls {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        sandbox: SandboxArgs,
    },
    /// Delete a shared cache (refused while a step uses it).
    Rm {
        name: String,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        sandbox: SandboxArgs,
    },
}

pub async fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Ls { store, sandbox } => {
            let b = builder(&store, &sandbox).await?;
            println!("{:<40} IN USE", "NAME");
            for c in b.store().cache_list().await? {
                println!(
                    "{:<40} {}",
                    obuilder_spec::sexp::quote_if_needed(&c.name),
                    c.in_use
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Rm {
            name,
            store,
            sandbox,
        } => {
            let b = builder(&store, &sandbox).await?;
            match b.store().cache_delete(&name).await {
                Ok(()) => {
                    println!("Removed cache {name:?}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("obuilder: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}
