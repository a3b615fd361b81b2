//! Property tests: every spec prints to text that reads back as the same spec, in both
//! forms, and the reader never panics on any input.

use obuilder_spec::sexp::parse_document;
use obuilder_spec::{format_source, Base, Copy, DataSource, Mount, Op, Run, Spec, User};
use proptest::prelude::*;

/// Any text an atom may hold: plain words, the empty string, quotes, escapes, control
/// characters, comment markers and non-ASCII.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9_./:-]{0,12}",
        Just(String::new()),
        "[ -~]{0,20}",
        "[\\x00-\\x1f\"\\\\#|;() a-zé€]{0,12}",
        any::<String>().prop_map(|s| s.chars().take(16).collect()),
    ]
}

fn mount() -> impl Strategy<Value = Mount> {
    (
        text(),
        text(),
        prop::collection::vec((text(), text()), 0..2),
    )
        .prop_map(|(id, target, buildkit_options)| Mount {
            id,
            target,
            buildkit_options,
        })
}

fn op(builds: Vec<String>) -> impl Strategy<Value = Op> {
    let source = if builds.is_empty() {
        Just(DataSource::Context).boxed()
    } else {
        prop_oneof![
            Just(DataSource::Context),
            prop::sample::select(builds).prop_map(DataSource::Build)
        ]
        .boxed()
    };
    prop_oneof![
        text().prop_map(Op::Comment),
        text().prop_map(Op::Workdir),
        prop::collection::vec(text(), 0..4).prop_map(Op::Shell),
        (
            prop::collection::vec(mount(), 0..3),
            prop::collection::vec(text(), 0..3),
            prop::collection::vec(mount(), 0..3),
            text()
        )
            .prop_map(|(cache, network, secrets, shell)| Op::Run(Run {
                cache,
                network,
                secrets,
                shell
            })),
        (
            source,
            // (What `check` refuses is not generated: no source, `..`, several sources
            // into a destination without a trailing `/`.)
            prop::collection::vec(
                text().prop_filter("no ..", |t| !t.split('/').any(|c| c == "..")),
                1..4
            ),
            text(),
            prop::collection::vec(text(), 0..3)
        )
            .prop_map(|(from, src, mut dst, exclude)| {
                if src.len() > 1 && !dst.ends_with('/') {
                    dst.push('/');
                }
                Op::Copy(Copy {
                    from,
                    src,
                    dst,
                    exclude,
                })
            }),
        (any::<u32>(), any::<u32>()).prop_map(|(uid, gid)| Op::User(User::Unix { uid, gid })),
        text().prop_map(|n| Op::User(User::Name(n))),
        (text(), text()).prop_map(|(k, v)| Op::Env(k, v)),
    ]
}

/// A valid spec: stage references only name stages in scope.
fn spec_in(scope: Vec<String>, depth: u32) -> BoxedStrategy<Spec> {
    let children = if depth == 0 {
        Just(Vec::new()).boxed()
    } else {
        prop::collection::vec(text(), 0..3).boxed()
    };
    children
        .prop_flat_map(move |names| {
            // Each child sees the enclosing scope plus its earlier siblings.
            let mut child_strats = Vec::new();
            let mut inner = scope.clone();
            for name in &names {
                let n = name.clone();
                child_strats
                    .push(spec_in(inner.clone(), depth - 1).prop_map(move |s| (n.clone(), s)));
                inner.push(name.clone());
            }
            let base = if inner.is_empty() {
                text().prop_map(Base::Image).boxed()
            } else {
                prop_oneof![
                    text().prop_map(Base::Image),
                    prop::sample::select(inner.clone()).prop_map(Base::Build)
                ]
                .boxed()
            };
            (child_strats, base, prop::collection::vec(op(inner), 0..6)).prop_map(
                |(child_builds, from, ops)| Spec {
                    child_builds,
                    from,
                    ops,
                },
            )
        })
        .boxed()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn machine_form_round_trips(spec in spec_in(Vec::new(), 2)) {
        prop_assert_eq!(Spec::parse(&spec.to_mach()).unwrap(), spec);
    }

    #[test]
    fn pretty_form_round_trips_and_is_formatted(spec in spec_in(Vec::new(), 2)) {
        let pretty = spec.to_pretty();
        prop_assert_eq!(&Spec::parse(&pretty).unwrap(), &spec);
        prop_assert_eq!(format_source("p", &pretty).unwrap(), pretty);
        prop_assert!(spec.validate().is_ok());
    }

    #[test]
    fn reader_never_panics_on_bytes(s in any::<String>()) {
        let _ = Spec::parse(&s);
        let _ = format_source("f", &s);
    }

    #[test]
    fn reader_never_panics_on_spec_like_text(s in "[()\"\\\\;#| \n\ta-z0-9]{0,80}") {
        let _ = parse_document(&s);
        if let Ok(f) = format_source("f", &s) {
            prop_assert_eq!(format_source("f", &f).unwrap(), f);
        }
    }

    #[test]
    fn reader_never_panics_on_mutated_examples(cut in 0usize..2000, insert in "[()\";#| a\\\\]{0,3}") {
        let text = include_str!("../../../examples/self-build.spec");
        let mut at = cut.min(text.len());
        while !text.is_char_boundary(at) { at -= 1; }
        let mutated = format!("{}{}{}", &text[..at], insert, &text[at..]);
        let _ = Spec::parse(&mutated);
        if let Ok(f) = format_source("f", &mutated) {
            prop_assert_eq!(format_source("f", &f).unwrap(), f);
        }
    }
}
