#![cfg(target_os = "linux")]
//! The btrfs operations on every step's path, as ioctls instead of `btrfs` processes (a
//! process start costs more than the snapshot itself): snapshots (writable, or read-only
//! to publish), the read-only flag, and the delete of a published build's subvolume.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags};

/// `struct btrfs_ioctl_vol_args_v2` (linux/btrfs.h): 4096 bytes.
#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; 4040],
}

const BTRFS_IOCTL_MAGIC: u64 = 0x94;
const fn iow(nr: u64, size: u64) -> u64 {
    (1 << 30) | (size << 16) | (BTRFS_IOCTL_MAGIC << 8) | nr
}
const BTRFS_IOC_SNAP_CREATE_V2: u64 = iow(23, 4096);
const BTRFS_IOC_SNAP_DESTROY_V2: u64 = iow(63, 4096);
const BTRFS_IOC_SUBVOL_GETFLAGS: u64 = (2 << 30) | (8 << 16) | (BTRFS_IOCTL_MAGIC << 8) | 25;
const BTRFS_IOC_SUBVOL_SETFLAGS: u64 = iow(26, 8);
const BTRFS_SUBVOL_RDONLY: u64 = 1 << 1;
const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (BTRFS_IOCTL_MAGIC << 8) | nr
}
const BTRFS_IOC_GET_SUBVOL_INFO: u64 = (2 << 30) | (504 << 16) | (BTRFS_IOCTL_MAGIC << 8) | 60;
const BTRFS_IOC_GET_SUBVOL_ROOTREF: u64 = iowr(61, 4096);
const BTRFS_IOC_SYNC: u64 = (BTRFS_IOCTL_MAGIC << 8) | 8;

/// `struct btrfs_ioctl_get_subvol_info_args` (linux/btrfs.h): 504 bytes.
#[repr(C)]
#[allow(dead_code)] // (the kernel's layout: only the UUIDs are read)
struct SubvolInfoArgs {
    treeid: u64,
    name: [u8; 256],
    parent_id: u64,
    dirid: u64,
    generation: u64,
    flags: u64,
    uuid: [u8; 16],
    parent_uuid: [u8; 16],
    received_uuid: [u8; 16],
    transids: [u64; 4],
    /// Four `btrfs_ioctl_timespec` (a u64 and a u32, padded to 16 bytes each).
    times: [u64; 8],
    reserved: [u64; 8],
}

/// `struct btrfs_ioctl_get_subvol_rootref_args` (linux/btrfs.h): 4096 bytes.
#[repr(C)]
#[allow(dead_code)] // (the kernel's layout: only the count is read)
struct RootrefArgs {
    min_treeid: u64,
    rootref: [[u64; 2]; 255],
    num_items: u8,
    align: [u8; 7],
}

fn open_dir(p: &Path) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        p,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// `btrfs subvolume snapshot SRC DST` (writable).
pub fn snapshot(src: &Path, dst: &Path) -> std::io::Result<()> {
    snapshot_with(src, dst, 0)
}

/// `btrfs subvolume snapshot -r SRC DST`. The kernel first writes SRC's data to the disk
/// and waits for it (delayed allocation included), then makes the snapshot in one
/// transaction commit: DST is on the disk, data and all, when this returns.
pub fn snapshot_readonly(src: &Path, dst: &Path) -> std::io::Result<()> {
    snapshot_with(src, dst, BTRFS_SUBVOL_RDONLY)
}

/// The name in `dst`'s parent, as `btrfs_ioctl_vol_args_v2` takes it.
fn vol_args(dst: &Path, fd: i64, flags: u64) -> std::io::Result<(OwnedFd, Box<VolArgsV2>)> {
    let parent = dst
        .parent()
        .ok_or_else(|| std::io::Error::other("snapshot destination has no parent"))?;
    let name = dst
        .file_name()
        .ok_or_else(|| std::io::Error::other("snapshot destination has no name"))?;
    let name = CString::new(name.as_encoded_bytes()).map_err(std::io::Error::other)?;
    if name.as_bytes().len() >= 4040 {
        return Err(std::io::Error::other("subvolume name too long"));
    }
    let parent_fd = open_dir(parent)?;
    let mut args = Box::new(VolArgsV2 {
        fd,
        transid: 0,
        flags,
        unused: [0; 4],
        name: [0; 4040],
    });
    args.name[..name.as_bytes().len()].copy_from_slice(name.as_bytes());
    Ok((parent_fd, args))
}

fn snapshot_with(src: &Path, dst: &Path, flags: u64) -> std::io::Result<()> {
    let src_fd = open_dir(src)?;
    let (parent_fd, mut args) = vol_args(dst, src_fd.as_raw_fd() as i64, flags)?;
    vol_ioctl(&parent_fd, BTRFS_IOC_SNAP_CREATE_V2, &mut args)
}

/// `ioctl(dir, request, args)` for the requests that take a `btrfs_ioctl_vol_args_v2`.
fn vol_ioctl(dir: &OwnedFd, request: u64, args: &mut VolArgsV2) -> std::io::Result<()> {
    // SAFETY: the argument is a properly sized and initialised btrfs_ioctl_vol_args_v2,
    // which both requests used here take.
    let r = unsafe { libc::ioctl(dir.as_raw_fd(), request as _, args as *mut VolArgsV2) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `btrfs subvolume delete PATH` (no commit: the kernel frees the space later, as the
/// command does without `-c`).
pub fn delete_subvolume(path: &Path) -> std::io::Result<()> {
    // (With no flags the kernel takes the subvolume by `name`.)
    let (parent_fd, mut args) = vol_args(path, 0, 0)?;
    vol_ioctl(&parent_fd, BTRFS_IOC_SNAP_DESTROY_V2, &mut args)
}

/// `btrfs property set -ts PATH ro true`.
pub fn set_readonly(subvol: &Path) -> std::io::Result<()> {
    set_readonly_to(subvol, true)
}

/// `btrfs property set -ts PATH ro VALUE`.
pub fn set_readonly_to(subvol: &Path, readonly: bool) -> std::io::Result<()> {
    let fd = open_dir(subvol)?;
    let mut flags: u64 = 0;
    // SAFETY: both ioctls take a pointer to a u64.
    unsafe {
        if libc::ioctl(
            fd.as_raw_fd(),
            BTRFS_IOC_SUBVOL_GETFLAGS as _,
            &mut flags as *mut u64,
        ) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        if readonly {
            flags |= BTRFS_SUBVOL_RDONLY;
        } else {
            flags &= !BTRFS_SUBVOL_RDONLY;
        }
        if libc::ioctl(
            fd.as_raw_fd(),
            BTRFS_IOC_SUBVOL_SETFLAGS as _,
            &flags as *const u64,
        ) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `btrfs filesystem sync PATH`: a transaction commit, after which the kernel's cleaner
/// is woken to free deleted subvolumes (otherwise it waits for the next periodic commit,
/// up to 30 s later).
pub fn sync(path: &Path) -> std::io::Result<()> {
    let fd = open_dir(path)?;
    // SAFETY: BTRFS_IOC_SYNC takes no argument.
    if unsafe { libc::ioctl(fd.as_raw_fd(), BTRFS_IOC_SYNC as _) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A subvolume's identity: its own UUID and, for a snapshot, its source's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubvolIds {
    pub uuid: [u8; 16],
    pub parent_uuid: [u8; 16],
}

/// `btrfs subvolume show PATH`, the UUIDs only (needs no privilege).
pub fn subvolume_ids(subvol: &Path) -> std::io::Result<SubvolIds> {
    // SAFETY: SubvolInfoArgs is btrfs_ioctl_get_subvol_info_args, all integers.
    let args: Box<SubvolInfoArgs> = unsafe { query(subvol, BTRFS_IOC_GET_SUBVOL_INFO)? };
    Ok(SubvolIds {
        uuid: args.uuid,
        parent_uuid: args.parent_uuid,
    })
}

/// Whether subvolume `subvol` holds another subvolume (made by a step: the ioctl needs no
/// privilege). An error reads as yes (EOVERFLOW: more than fit in one answer).
pub fn holds_subvolumes(subvol: &Path) -> bool {
    // SAFETY: RootrefArgs is btrfs_ioctl_get_subvol_rootref_args, all integers (its
    // min_treeid 0: from the first).
    let args: std::io::Result<Box<RootrefArgs>> =
        unsafe { query(subvol, BTRFS_IOC_GET_SUBVOL_ROOTREF) };
    args.map_or(true, |a| a.num_items > 0)
}

/// `ioctl(open(dir), request, &args)` with `args` zeroed first, returned as filled.
///
/// # Safety
/// `T` must be the struct `request` takes, made of integers only (all-zero is a value).
unsafe fn query<T>(dir: &Path, request: u64) -> std::io::Result<Box<T>> {
    let fd = open_dir(dir)?;
    let mut args: Box<T> = Box::new(std::mem::zeroed());
    if libc::ioctl(fd.as_raw_fd(), request as _, &mut *args as *mut T) < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_btrfs_h() {
        assert_eq!(BTRFS_IOC_SNAP_CREATE_V2, 0x5000_9417);
        assert_eq!(BTRFS_IOC_SNAP_DESTROY_V2, 0x5000_943f);
        assert_eq!(BTRFS_IOC_SUBVOL_GETFLAGS, 0x8008_9419);
        assert_eq!(BTRFS_IOC_SUBVOL_SETFLAGS, 0x4008_941a);
        assert_eq!(std::mem::size_of::<VolArgsV2>(), 4096);
        assert_eq!(BTRFS_IOC_GET_SUBVOL_INFO, 0x81f8_943c);
        assert_eq!(BTRFS_IOC_SYNC, 0x9408);
        assert_eq!(BTRFS_IOC_GET_SUBVOL_ROOTREF, 0xd000_943d);
        assert_eq!(std::mem::size_of::<SubvolInfoArgs>(), 504);
        assert_eq!(std::mem::offset_of!(SubvolInfoArgs, uuid), 296);
        assert_eq!(std::mem::size_of::<RootrefArgs>(), 4096);
    }
}
