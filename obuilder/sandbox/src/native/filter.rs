#![cfg(target_os = "linux")]
//! The seccomp profile of a step's OCI config ([`crate::seccomp::profile`]) compiled to a
//! BPF program with libseccomp, the library runc compiles the same profile with: the same
//! names resolve to the same numbers on every architecture listed (x86_64's i386 and x32
//! entry points included, which a filter of the native numbers alone would leave open).

use serde_json::Value;

use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};

fn arch(name: &str) -> Option<ScmpArch> {
    Some(match name {
        "SCMP_ARCH_X86_64" => ScmpArch::X8664,
        "SCMP_ARCH_X86" => ScmpArch::X86,
        "SCMP_ARCH_X32" => ScmpArch::X32,
        "SCMP_ARCH_AARCH64" => ScmpArch::Aarch64,
        "SCMP_ARCH_ARM" => ScmpArch::Arm,
        _ => return None,
    })
}

fn err(e: impl std::fmt::Display) -> String {
    format!("cannot compile the seccomp filter: {e}")
}

/// Compiles `profile` (the `linux.seccomp` object) to `struct sock_filter`s.
pub fn compile(profile: &Value) -> Result<Vec<libc::sock_filter>, String> {
    if profile["defaultAction"] != "SCMP_ACT_ALLOW" {
        return Err(err("only an allow-by-default profile is supported"));
    }
    let mut ctx = ScmpFilterContext::new(ScmpAction::Allow).map_err(err)?;
    // A binary tree of the syscall numbers instead of libseccomp's default list: the same
    // decisions, but the kernel checks the program against every syscall number when it is
    // loaded (to cache the ones always allowed), and walking a tree costs each a few
    // comparisons instead of the whole list: 60 instead of 210 µs a step here. (libseccomp
    // 2.5 and later; an older one keeps the list.)
    let _ = ctx.set_ctl_optimize(2);
    for a in profile["architectures"].as_array().into_iter().flatten() {
        if let Some(a) = a.as_str().and_then(arch) {
            ctx.add_arch(a).map_err(err)?;
        }
    }
    for rule in profile["syscalls"].as_array().into_iter().flatten() {
        let action = match rule["action"].as_str() {
            Some("SCMP_ACT_ERRNO") => {
                ScmpAction::Errno(rule["errnoRet"].as_i64().unwrap_or(1) as i32)
            }
            Some("SCMP_ACT_ALLOW") => continue,
            other => return Err(err(format!("unsupported action {other:?}"))),
        };
        let mut conds = Vec::new();
        for a in rule["args"].as_array().into_iter().flatten() {
            let index = a["index"].as_u64().unwrap_or(0) as u32;
            let value = a["value"].as_u64().unwrap_or(0);
            let op = match a["op"].as_str() {
                Some("SCMP_CMP_MASKED_EQ") => ScmpCompareOp::MaskedEqual(value),
                Some("SCMP_CMP_EQ") => ScmpCompareOp::Equal,
                other => return Err(err(format!("unsupported comparison {other:?}"))),
            };
            let datum = a["valueTwo"].as_u64().unwrap_or(value);
            conds.push(ScmpArgCompare::new(index, op, datum));
        }
        for name in rule["names"].as_array().into_iter().flatten() {
            let Some(name) = name.as_str() else { continue };
            // Calls this libseccomp does not know are skipped, as runc skips them.
            let Ok(sys) = ScmpSyscall::from_name(name) else {
                continue;
            };
            // A call missing on one of the architectures is added where it exists.
            let _ = ctx.add_rule_conditional(action, sys, &conds);
        }
    }
    // libseccomp writes the program to a descriptor: a memory file, read back.
    let fd = rustix::fs::memfd_create("obuilder-seccomp", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(err)?;
    ctx.export_bpf(&fd).map_err(err)?;
    let mut file = std::fs::File::from(fd);
    std::io::Seek::rewind(&mut file).map_err(err)?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes).map_err(err)?;
    decode(&bytes)
}

/// [`compile`], remembered in `dir` across processes: libseccomp takes a millisecond or
/// two to generate a program, a good part of a step's set-up. The file is named by a hash
/// of the profile and the library's version, and holds the program as libseccomp wrote
/// it; anything unreadable is compiled again.
pub fn compile_cached(
    profile: &Value,
    dir: &std::path::Path,
) -> Result<Vec<libc::sock_filter>, String> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    profile.to_string().hash(&mut h);
    // The shape of the program (2: a binary tree, see `compile`).
    2u32.hash(&mut h);
    if let Ok(v) = libseccomp::ScmpVersion::current() {
        (v.major, v.minor, v.micro).hash(&mut h);
    }
    let path = dir.join(format!("seccomp-{:016x}.bpf", h.finish()));
    if let Ok(bytes) = std::fs::read(&path) {
        if let Ok(prog) = decode(&bytes) {
            return Ok(prog);
        }
    }
    let prog = compile(profile)?;
    let bytes: Vec<u8> = prog
        .iter()
        .flat_map(|f| {
            let mut b = Vec::with_capacity(8);
            b.extend_from_slice(&f.code.to_ne_bytes());
            b.push(f.jt);
            b.push(f.jf);
            b.extend_from_slice(&f.k.to_ne_bytes());
            b
        })
        .collect();
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::create_dir_all(dir).is_ok() && std::fs::write(&tmp, &bytes).is_ok() {
        let _ = std::fs::rename(&tmp, &path);
    }
    Ok(prog)
}

fn decode(bytes: &[u8]) -> Result<Vec<libc::sock_filter>, String> {
    const SIZE: usize = std::mem::size_of::<libc::sock_filter>();
    if bytes.is_empty() || !bytes.len().is_multiple_of(SIZE) {
        return Err(err(format!("unexpected program size {}", bytes.len())));
    }
    Ok(bytes
        .chunks_exact(SIZE)
        .map(|c| libc::sock_filter {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_profile_compiles_with_and_without_fast_sync() {
        let plain = compile(&crate::seccomp::profile(false, "x86_64")).unwrap();
        let fast = compile(&crate::seccomp::profile(true, "x86_64")).unwrap();
        assert!(plain.len() > 50, "{}", plain.len());
        assert!(fast.len() > plain.len());
    }

    #[test]
    fn a_cached_program_is_the_compiled_one() {
        let dir = tempfile::tempdir().unwrap();
        let profile = crate::seccomp::profile(true, "x86_64");
        let first = compile_cached(&profile, dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let again = compile_cached(&profile, dir.path()).unwrap();
        let fresh = compile(&profile).unwrap();
        let words = |v: &[libc::sock_filter]| -> Vec<(u16, u8, u8, u32)> {
            v.iter().map(|f| (f.code, f.jt, f.jf, f.k)).collect()
        };
        assert_eq!(words(&first), words(&fresh));
        assert_eq!(words(&again), words(&fresh));
        // A damaged file is compiled again.
        let f = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::write(&f, b"xyz").unwrap();
        assert_eq!(
            words(&compile_cached(&profile, dir.path()).unwrap()),
            words(&fresh)
        );
    }

    #[test]
    fn other_actions_are_refused() {
        let v = serde_json::json!({"defaultAction": "SCMP_ACT_KILL"});
        assert!(compile(&v).unwrap_err().contains("allow-by-default"));
    }
}
