//! `obuilder fmt [--check] SPEC…`: rewrite specs in their pretty form, comments kept.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

#[derive(clap::Args)]
pub struct Args {
    /// Do not write; list the files that are not formatted and exit 1 if there are any.
    #[arg(long)]
    check: bool,
    /// Spec files to format in place; `-` reads standard input and prints the result.
    #[arg(required = true, value_name = "SPEC")]
    specs: Vec<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut bad = 0;
    for path in &args.specs {
        let text = super::read_spec_text(path)?;
        let stdin = path.as_os_str() == "-";
        let name = if stdin {
            "<stdin>".to_string()
        } else {
            path.display().to_string()
        };
        let formatted = match obuilder_spec::format_source(&name, &text) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("{e}\n");
                bad += 1;
                continue;
            }
        };
        if stdin && !args.check {
            super::process::out(format_args!("{formatted}"))?;
            continue;
        }
        if formatted == text {
            continue;
        }
        if args.check {
            crate::outln!("{name}: not formatted")?;
            bad += 1;
        } else {
            // Write beside and rename, so a crash never leaves a half-written spec.
            let tmp = path.with_file_name(format!(
                ".{}.fmt-tmp",
                path.file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default()
            ));
            std::fs::write(&tmp, &formatted)
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            if let Ok(meta) = std::fs::metadata(path) {
                let _ = std::fs::set_permissions(&tmp, meta.permissions());
            }
            std::fs::rename(&tmp, path)
                .with_context(|| format!("cannot replace {}", path.display()))?;
            crate::outln!("{}: formatted", path.display())?;
        }
    }
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
