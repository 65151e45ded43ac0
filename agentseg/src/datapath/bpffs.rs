//! bpffs: mounted at /sys/fs/bpf when missing, root-only (a hand-mounted bpffs is 1777 and any
//! pin under it would be reachable by an agent).
use std::{fs, os::unix::fs::PermissionsExt as _, path::Path};

use super::DatapathError;
use crate::cgroup::mounts_of_type;

pub const BPFFS: &str = "/sys/fs/bpf";

/// Make sure a bpffs is mounted at [`BPFFS`]; returns whether this call mounted it.
pub fn ensure_bpffs() -> Result<bool, DatapathError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| DatapathError::Bpffs(format!("reading /proc/self/mountinfo: {e}")))?;
    if mounts_of_type(&mountinfo, "bpf")
        .iter()
        .any(|p| p == Path::new(BPFFS))
    {
        return Ok(false);
    }
    fs::create_dir_all(BPFFS)
        .map_err(|e| DatapathError::Bpffs(format!("creating {BPFFS}: {e}")))?;
    nix::mount::mount(
        Some("bpffs"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(|e| DatapathError::Bpffs(format!("mounting bpffs at {BPFFS}: {e}")))?;
    fs::set_permissions(BPFFS, fs::Permissions::from_mode(0o700))
        .map_err(|e| DatapathError::Bpffs(format!("chmod {BPFFS}: {e}")))?;
    Ok(true)
}
