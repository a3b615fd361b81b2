//! Fuzzes the spec reader: any bytes must give a spec or an error, never a panic; a spec
//! read must print to forms that read back as itself, and `fmt` must be idempotent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use obuilder_spec::{format_source, Spec};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(spec) = Spec::parse(text) {
        assert_eq!(Spec::parse(&spec.to_mach()).as_ref(), Ok(&spec));
        assert_eq!(Spec::parse(&spec.to_pretty()).as_ref(), Ok(&spec));
    }
    if let Ok(formatted) = format_source("fuzz", text) {
        assert_eq!(format_source("fuzz", &formatted).as_deref(), Ok(formatted.as_str()));
    }
});
