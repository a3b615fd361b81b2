//! Links GCC's unwinder into `obuilder` (`libgcc_eh.a`, as `gcc -static-libgcc` does)
//! instead of loading `libgcc_s.so.1` at every start, on Linux with glibc.
//!
//! Why: a fully cached build is mostly the process's start (docs/performance.md), and
//! `libgcc_s.so.1` costs each start a library to map and bind, and its constructor
//! (`__cpu_indicator_init`), which asks the CPU what it is with `cpuid`: an exit to the
//! hypervisor each time in a VM, a twentieth of a fully cached build here. Statically, the
//! unwinder comes without that constructor. Rust's standard library asks the linker for
//! `-lgcc_s` by name (only a fully static build asks for `gcc_eh`), so a linker script of
//! that name, found first, points it at the archive. The unwinder then serves this
//! program's own code only, which is all that unwinds in it (the C libraries it links do
//! not). libgcc's runtime exception allows linking it so.
//!
//! Where the archive cannot be found (another C compiler, a cross build), nothing
//! changes: the shared library is linked as before.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CC");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let cross = std::env::var("HOST").ok() != std::env::var("TARGET").ok();
    if os != "linux" || env != "gnu" || cross {
        return;
    }
    let Some(out) = std::env::var_os("OUT_DIR").map(PathBuf::from) else {
        return;
    };
    let Some(archive) = gcc_eh() else { return };
    let dir = out.join("static-libgcc");
    let script = format!("INPUT({})\n", archive.display());
    if std::fs::create_dir_all(&dir).is_err()
        || std::fs::write(dir.join("libgcc_s.so"), script).is_err()
    {
        return;
    }
    println!("cargo:rustc-link-search=native={}", dir.display());
}

/// The C compiler's `libgcc_eh.a`, if it has one (it prints the bare name if not).
// A build script asks the compiler itself; the exec seam is for the programs.
#[allow(clippy::disallowed_methods)]
fn gcc_eh() -> Option<PathBuf> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = std::process::Command::new(cc)
        .arg("-print-file-name=libgcc_eh.a")
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    // A path with parentheses or spaces would not survive the linker script's syntax.
    let plain = path
        .to_str()
        .is_some_and(|p| !p.contains(['(', ')', ' ', '\n']));
    (out.status.success() && path.is_absolute() && Path::new(&path).is_file() && plain)
        .then_some(path)
}
