//! `obuilder check SPEC…`: parse and scope-check every file, report every error.

use std::path::PathBuf;
use std::process::ExitCode;

use obuilder_spec::Spec;

#[derive(clap::Args)]
pub struct Args {
    /// Spec files to check (`-`: standard input).
    #[arg(required = true, value_name = "SPEC")]
    specs: Vec<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut failed = 0;
    for path in &args.specs {
        let name = if path.as_os_str() == "-" {
            "<stdin>".to_string()
        } else {
            path.display().to_string()
        };
        let text = match super::read_spec_text(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{e:#}");
                failed += 1;
                continue;
            }
        };
        if let Err(e) = Spec::parse_named(&name, &text) {
            eprintln!("{e}\n");
            failed += 1;
        }
    }
    if failed == 0 {
        let n = args.specs.len();
        eprintln!("{n} spec{} OK", if n == 1 { "" } else { "s" });
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{failed} of {} spec file(s) have errors", args.specs.len());
        Ok(ExitCode::FAILURE)
    }
}
