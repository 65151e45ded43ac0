//! cgroup v2 plumbing: find the mount, name and create cgroups, read their ids and members.
//!
//! The cgroup2 mount is read from `/proc/self/mountinfo`: hosts mount it at `/sys/fs/cgroup`,
//! hybrid hosts at `/sys/fs/cgroup/unified`, containers elsewhere.
use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Component, Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: io::Error },
    #[error("bad cgroup path {path:?}: {reason}")]
    BadPath { path: String, reason: &'static str },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |err| CgroupError::Io {
        path: path.to_owned(),
        err,
    }
}

/// Mount points of every mount of filesystem type `fstype` in a mountinfo text.
pub fn mounts_of_type(mountinfo: &str, fstype: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue"
            let (left, right) = line.split_once(" - ")?;
            let fs = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            (fs == fstype).then(|| PathBuf::from(unescape_mountinfo(mount_point)))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal `\NNN`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup2 mount point of this host.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    mounts_of_type(&text, "cgroup2")
        .into_iter()
        .next()
        .ok_or(CgroupError::NoCgroup2)
}

/// A relative cgroup path, checked: no absolute part, no `..`, no empty components.
pub fn check_relative(rel: &str) -> Result<PathBuf, CgroupError> {
    let trimmed = rel.trim_start_matches('/');
    if trimmed.is_empty() {
        return Err(CgroupError::BadPath {
            path: rel.into(),
            reason: "empty",
        });
    }
    let p = Path::new(trimmed);
    if p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(CgroupError::BadPath {
            path: rel.into(),
            reason: "only plain names allowed",
        });
    }
    Ok(p.to_owned())
}

/// The cgroup id the kernel uses (`bpf_get_current_cgroup_id`): the directory's inode number.
pub fn cgroup_id(dir: &Path) -> Result<u64, CgroupError> {
    Ok(fs::metadata(dir).map_err(io_err(dir))?.ino())
}

/// Create `dir` and its parents (like `mkdir -p`).
pub fn create(dir: &Path) -> Result<(), CgroupError> {
    fs::create_dir_all(dir).map_err(io_err(dir))
}

/// Pids of the processes directly in `dir`.
pub fn procs(dir: &Path) -> Result<Vec<u32>, CgroupError> {
    let path = dir.join("cgroup.procs");
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Whether any process lives in `dir` or below (`populated` in `cgroup.events`).
pub fn populated(dir: &Path) -> Result<bool, CgroupError> {
    let path = dir.join("cgroup.events");
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    Ok(text.lines().any(|l| l.trim() == "populated 1"))
}

/// Remove `dir` and its (empty) sub-cgroups, deepest first.
pub fn remove_tree(dir: &Path) -> Result<(), CgroupError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path())?;
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(dir)(e)),
    }
}

/// The cgroup2 path (relative to the mount) of a process, from `/proc/PID/cgroup` ("0::/path").
pub fn of_pid(pid: u32) -> Result<PathBuf, CgroupError> {
    let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    Ok(parse_proc_cgroup(&text).unwrap_or_default())
}

/// The unified-hierarchy line of a `/proc/PID/cgroup` text.
pub fn parse_proc_cgroup(text: &str) -> Option<PathBuf> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| PathBuf::from(p.trim_start_matches('/')))
}

/// Map a systemd unit name to its cgroup path (relative to the cgroup2 mount), following
/// systemd's layout: services and scopes live in `system.slice`, a slice `a-b.slice` nests in
/// `a.slice/a-b.slice`.
pub fn unit_cgroup(unit: &str) -> PathBuf {
    if let Some(stem) = unit.strip_suffix(".slice") {
        let mut path = PathBuf::new();
        let mut acc = String::new();
        for part in stem.split('-') {
            if !acc.is_empty() {
                acc.push('-');
            }
            acc.push_str(part);
            path.push(format!("{acc}.slice"));
        }
        path
    } else {
        Path::new("system.slice").join(unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        let hybrid = "25 1 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
            26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
            27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            mounts_of_type(hybrid, "cgroup2"),
            vec![PathBuf::from("/sys/fs/cgroup/unified")]
        );
        let unified =
            "30 1 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            mounts_of_type(unified, "cgroup2"),
            vec![PathBuf::from("/sys/fs/cgroup")]
        );
        assert!(mounts_of_type(unified, "bpf").is_empty());
    }

    #[test]
    fn unescapes_mount_points() {
        let line = "30 1 0:26 / /mnt/with\\040space rw - bpf bpf rw\n";
        assert_eq!(
            mounts_of_type(line, "bpf"),
            vec![PathBuf::from("/mnt/with space")]
        );
    }

    #[test]
    fn relative_paths_are_checked() {
        assert_eq!(check_relative("/a/b").unwrap(), PathBuf::from("a/b"));
        assert!(check_relative("a/../b").is_err());
        assert!(check_relative("").is_err());
        assert!(check_relative("./a").is_err());
    }

    #[test]
    fn unit_names_map_to_systemd_layout() {
        assert_eq!(
            unit_cgroup("web.service"),
            PathBuf::from("system.slice/web.service")
        );
        assert_eq!(unit_cgroup("a-b.slice"), PathBuf::from("a.slice/a-b.slice"));
    }

    #[test]
    fn proc_cgroup_unified_line() {
        let text = "12:cpu:/foo\n0::/agentseg/agents/x\n";
        assert_eq!(
            parse_proc_cgroup(text),
            Some(PathBuf::from("agentseg/agents/x"))
        );
    }
}
