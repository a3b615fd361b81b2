//! Man pages and shell completions, generated from a program's own clap definition so
//! that they cannot drift from `--help`. Every program calls [`generate_if_asked`] first
//! thing in `main`; `packaging/build.sh` runs each with [`ENV`] set to an output
//! directory, and the program writes there and exits instead of running:
//!
//! - `man/man1/NAME.1`, and `NAME-SUB.1` for each subcommand (as git's pages);
//! - `completions/NAME.bash`, `completions/_NAME` (zsh), `completions/NAME.fish`.

use std::io;
use std::path::Path;

use clap::Command;
use clap_complete::Shell;

/// The variable naming the directory to write into.
pub const ENV: &str = "CLI_DOCS_OUT";

/// If [`ENV`] is set, writes the man pages and completions of `command()` under it and
/// exits (status 0, or 1 with the reason on stderr).
pub fn generate_if_asked(command: impl FnOnce() -> Command) {
    let Some(out) = std::env::var_os(ENV) else {
        return;
    };
    let cmd = command();
    let name = cmd.get_name().to_string();
    match generate(cmd, Path::new(&out)) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("{name}: cannot write man pages and completions to {out:?}: {e}");
            std::process::exit(1)
        }
    }
}

/// Writes `cmd`'s man pages under `out/man/man1` and its completions under
/// `out/completions`.
pub fn generate(mut cmd: Command, out: &Path) -> io::Result<()> {
    let man = out.join("man/man1");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    cmd.build();
    let name = cmd.get_name().to_string();
    write_man(&cmd, &name, &man)?;
    for (shell, file) in [
        (Shell::Bash, format!("{name}.bash")),
        (Shell::Zsh, format!("_{name}")),
        (Shell::Fish, format!("{name}.fish")),
    ] {
        let mut f = std::fs::File::create(completions.join(file))?;
        clap_complete::generate(shell, &mut cmd, name.clone(), &mut f);
    }
    Ok(())
}

/// `page` is the page's name: the program's, or `PROGRAM-SUB` for a subcommand.
fn write_man(cmd: &Command, page: &str, dir: &Path) -> io::Result<()> {
    let cmd = cmd.clone().name(page.to_string());
    let mut f = std::fs::File::create(dir.join(format!("{page}.1")))?;
    clap_mangen::Man::new(cmd.clone()).render(&mut f)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        write_man(sub, &format!("{page}-{}", sub.get_name()), dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_for_the_program_and_each_subcommand_and_three_shells() {
        let cmd = Command::new("prog")
            .about("Does things")
            .arg(
                clap::Arg::new("verbose")
                    .long("verbose")
                    .action(clap::ArgAction::SetTrue),
            )
            .subcommand(
                Command::new("run")
                    .about("Runs")
                    .arg(clap::Arg::new("file")),
            )
            .subcommand(Command::new("secret").hide(true));
        let dir = std::env::temp_dir().join(format!("cli-docs-{}", std::process::id()));
        generate(cmd, &dir).unwrap();
        let page = std::fs::read_to_string(dir.join("man/man1/prog.1")).unwrap();
        assert!(page.contains(".TH prog 1"), "{page}");
        assert!(page.contains("verbose"), "{page}");
        let sub = std::fs::read_to_string(dir.join("man/man1/prog-run.1")).unwrap();
        assert!(sub.contains("Runs"), "{sub}");
        assert!(!dir.join("man/man1/prog-secret.1").exists());
        assert!(!dir.join("man/man1/prog-help.1").exists());
        for f in ["prog.bash", "_prog", "prog.fish"] {
            let text = std::fs::read_to_string(dir.join("completions").join(f)).unwrap();
            assert!(text.contains("run"), "{f}: {text}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
