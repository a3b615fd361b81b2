//! Subcommands whose arguments clap defines only when it needs them: when that subcommand
//! is the one given, or for its help, or for the generated man pages (which build every
//! subcommand). Defining the arguments of all twenty subcommands on every run was a third
//! of a fully cached build's instructions, and their allocations a quarter of its page
//! faults. `Lazy<T>` stands for `T` in a subcommand variant; everything else about the
//! subcommand (name, about, help) stays in the derive. Groups of subcommands (`image`,
//! `cache`, `base-image`) stay eager, so that `help GROUP SUB` and the completions know
//! their members; their members' arguments may be lazy.

use clap::{ArgMatches, Args, Command, FromArgMatches};

/// `T`'s arguments, deferred (see the module's doc).
pub struct Lazy<T>(pub T);

impl<T: FromArgMatches> FromArgMatches for Lazy<T> {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        T::from_arg_matches(m).map(Lazy)
    }

    fn from_arg_matches_mut(m: &mut ArgMatches) -> Result<Self, clap::Error> {
        T::from_arg_matches_mut(m).map(Lazy)
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        self.0.update_from_arg_matches(m)
    }

    fn update_from_arg_matches_mut(&mut self, m: &mut ArgMatches) -> Result<(), clap::Error> {
        self.0.update_from_arg_matches_mut(m)
    }
}

impl<T: Args> Args for Lazy<T> {
    fn group_id() -> Option<clap::Id> {
        T::group_id()
    }

    fn augment_args(cmd: Command) -> Command {
        cmd.defer(|c| keep_about(c, T::augment_args))
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        cmd.defer(|c| keep_about(c, T::augment_args_for_update))
    }
}

/// Adds arguments to `cmd` keeping its about texts: the derive sets a subcommand's from
/// its variant's doc comment after adding the arguments, over any that an argument
/// struct's doc comment sets; deferred, the arguments come last and must not win.
fn keep_about(cmd: Command, add: fn(Command) -> Command) -> Command {
    let (about, long) = (cmd.get_about().cloned(), cmd.get_long_about().cloned());
    let cmd = add(cmd);
    let cmd = match about {
        Some(a) => cmd.about(a),
        None => cmd.about(None::<&str>),
    };
    match long {
        Some(l) => cmd.long_about(l),
        None => cmd.long_about(None::<&str>),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser, Subcommand};

    #[derive(Parser, Debug)]
    struct Cli {
        #[arg(short, long, global = true, action = clap::ArgAction::Count)]
        verbose: u8,
        #[command(subcommand)]
        command: Sub,
    }

    #[derive(Subcommand, Debug)]
    enum Sub {
        /// The variant's about.
        Go(Lazy<GoArgs>),
        /// Another.
        Stay(Lazy<GoArgs>),
        /// The same arguments, not deferred.
        Eager(GoArgs),
    }

    /// The argument struct's own about, which the variant's must win over.
    #[derive(clap::Args, Debug)]
    struct GoArgs {
        /// A flag.
        #[arg(long)]
        fast: bool,
        name: String,
    }

    impl std::fmt::Debug for Lazy<GoArgs> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            self.0.fmt(f)
        }
    }

    #[test]
    fn arguments_are_defined_only_when_their_subcommand_is_built() {
        let cmd = Cli::command();
        let go = cmd.find_subcommand("go").unwrap();
        assert_eq!(
            go.get_arguments().count(),
            0,
            "defined before it was needed"
        );
        let mut cmd = Cli::command();
        cmd.build();
        let go = cmd.find_subcommand("go").unwrap();
        let ids: Vec<_> = go.get_arguments().map(|a| a.get_id().as_str()).collect();
        assert!(ids.contains(&"fast") && ids.contains(&"name"), "{ids:?}");
        assert_eq!(go.get_about().unwrap().to_string(), "The variant's about");
        Cli::command().debug_assert();
    }

    #[test]
    fn a_lazy_subcommand_parses_as_the_eager_one() {
        let mut verbose = Vec::new();
        for sub in ["eager", "go"] {
            let cli = Cli::try_parse_from(["p", "-v", sub, "--fast", "x", "-vv"]).unwrap();
            verbose.push(cli.verbose);
            match cli.command {
                Sub::Go(Lazy(a)) | Sub::Eager(a) => assert!(a.fast && a.name == "x"),
                Sub::Stay(_) => panic!("wrong subcommand"),
            }
        }
        // (clap keeps the global flag's count from the innermost level that has it)
        assert_eq!(verbose, [2, 2]);
        let e = Cli::try_parse_from(["p", "stay", "--bogus"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::UnknownArgument);
        let e = Cli::try_parse_from(["p", "go"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let help = Cli::try_parse_from(["p", "go", "--help"])
            .unwrap_err()
            .to_string();
        assert!(help.starts_with("The variant's about"), "{help}");
        assert!(help.contains("--fast") && help.contains("A flag"), "{help}");
    }
}
