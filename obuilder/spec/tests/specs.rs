//! Every spec shape of the reference (rewritten as the files in `examples/` and
//! `tests/specs/`): read, printed, formatted and exported, with golden outputs.

mod golden;

use obuilder_spec::docker::{dockerfile, Escape};
use obuilder_spec::{format_source, Spec};

fn all_valid_specs() -> Vec<(String, String)> {
    let mut v = golden::specs(golden::dir().join("../../../examples"));
    v.extend(golden::specs(golden::dir().join("specs")));
    assert!(
        v.len() >= 10,
        "expected the example specs, found {}",
        v.len()
    );
    v
}

#[test]
fn every_example_reads_and_round_trips() {
    for (name, text) in all_valid_specs() {
        let spec = Spec::parse_named(&name, &text).unwrap_or_else(|e| panic!("{e}"));
        let mach = spec.to_mach();
        assert_eq!(Spec::parse(&mach).unwrap(), spec, "{name}: machine form");
        let pretty = spec.to_pretty();
        assert_eq!(Spec::parse(&pretty).unwrap(), spec, "{name}: pretty form");
        assert_eq!(
            format_source(&name, &pretty).unwrap(),
            pretty,
            "{name}: pretty form is formatted"
        );
        spec.validate().unwrap();
    }
}

#[test]
fn fmt_keeps_comments_and_is_idempotent() {
    let mut report = String::new();
    for (name, text) in all_valid_specs() {
        let once = format_source(&name, &text).unwrap();
        let twice = format_source(&name, &once).unwrap();
        assert_eq!(once, twice, "{name}: fmt is not idempotent");
        let comments = |s: &str| {
            s.lines()
                .filter(|l| l.contains(';') || l.contains("#|"))
                .count()
        };
        assert!(
            comments(&once) >= comments(&text).min(1),
            "{name}: comments lost"
        );
        report.push_str(&format!(";;;; {name}\n{once}"));
    }
    golden::check("fmt.txt", &report);
}

#[test]
fn machine_and_pretty_forms() {
    let mut report = String::new();
    for (name, text) in all_valid_specs() {
        let spec = Spec::parse(&text).unwrap();
        report.push_str(&format!(
            ";;;; {name}\n{}\n{}",
            spec.to_mach(),
            spec.to_pretty()
        ));
    }
    golden::check("printed.txt", &report);
}

#[test]
fn dockerfile_exports() {
    let mut report = String::new();
    for (name, text) in all_valid_specs() {
        let spec = Spec::parse(&text).unwrap();
        for (label, buildkit, escape) in [
            ("plain", false, Escape::Unix),
            ("buildkit", true, Escape::Unix),
            ("windows", false, Escape::Windows),
            ("windows buildkit", true, Escape::Windows),
        ] {
            let out = match dockerfile(&spec, buildkit, escape) {
                Ok(s) => s,
                Err(e) => format!("error: {e}\n"),
            };
            report.push_str(&format!("#### {name} ({label})\n{out}"));
        }
    }
    golden::check("dockerfile.txt", &report);
}

#[test]
fn error_messages() {
    let mut report = String::new();
    for (name, text) in golden::specs(golden::dir().join("errors")) {
        let err = Spec::parse_named(&name, &text).expect_err(&name);
        assert!(!err.diagnostics.is_empty());
        report.push_str(&format!("{err}\n\n"));
        // fmt refuses invalid specs with the same errors and never rewrites them.
        assert_eq!(format_source(&name, &text).unwrap_err(), err);
    }
    golden::check("errors.txt", &report);
}

#[test]
fn spec_errors_report_every_problem() {
    let err = Spec::parse_named(
        "x.spec",
        "((from busybox)\n (rn (shell \"a\"))\n (workdir))\n",
    )
    .unwrap_err();
    let lines: Vec<String> = err
        .diagnostics
        .iter()
        .map(|d| format!("{}:{}", d.pos.line, d.pos.col))
        .collect();
    assert_eq!(lines, ["2:3", "3:2"]);
    assert_eq!(err.first_line(), "x.spec:2:3: unknown operation `rn`; expected one of `comment`, `workdir`, `shell`, `run`, `copy`, `user`, `env`");
}

#[test]
fn validate_catches_scope_errors_in_code_built_specs() {
    let mut spec = Spec::parse("((from a) (copy (src x) (dst y)))").unwrap();
    if let obuilder_spec::Op::Copy(c) = &mut spec.ops[0] {
        c.from = obuilder_spec::DataSource::Build("missing".into());
    }
    let e = spec.validate().unwrap_err();
    assert!(e.contains("unknown build \"missing\""), "{e}");
}
