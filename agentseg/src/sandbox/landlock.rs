//! The agent's Landlock ruleset: where it may write, and what it may signal or reach over
//! abstract AF_UNIX sockets. Built in the launcher before the fork; the child only calls
//! `landlock_restrict_self` on its descriptor (after `no_new_privs`).
//!
//! Only writes are handled (reads stay allowed). A non-root agent may write everywhere its
//! file permissions let it except beneath the protected paths, `/proc`, `/sys` and `/dev`
//! (a few device nodes excepted); a root agent, which file permissions no longer hold, only
//! beneath the temporary directories and the segment's `writable` list.
use std::{
    ffi::CString,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use landlock::{
    AccessFs, BitFlags, CompatLevel, Compatible as _, PathBeneath, Ruleset, RulesetAttr as _,
    RulesetCreatedAttr as _, Scope, make_bitflags,
};

use super::{
    SandboxError,
    carve::{self, Grant, Kind},
};
use crate::control::LaunchSpec;

/// Device nodes and directories under `/dev` every agent may write to when present.
pub const DEV_WRITABLE: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
    "/dev/ptmx",
    "/dev/pts",
    "/dev/shm",
];

/// Where a root agent may write besides `/dev` above and the segment's `writable`.
pub const ROOT_WRITABLE: &[&str] = &["/tmp", "/var/tmp"];

/// Never writable by a non-root agent, besides the daemon's protected paths.
pub const NEVER_WRITABLE: &[&str] = &["/proc", "/sys", "/dev"];

/// The rights this ruleset handles: every write-type file system right (reads stay allowed).
fn handled() -> BitFlags<AccessFs> {
    make_bitflags!(AccessFs::{
        WriteFile | Truncate | RemoveDir | RemoveFile | MakeChar | MakeDir | MakeReg
            | MakeSock | MakeFifo | MakeBlock | MakeSym | Refer
    })
}

/// The handled rights that apply to a file that is not a directory.
fn file_rights() -> BitFlags<AccessFs> {
    handled() & AccessFs::from_file(landlock::ABI::V6)
}

/// Where the agent of `spec` may write (canonical paths; nothing walked for paths that do not
/// exist).
pub fn grants(spec: &LaunchSpec) -> Vec<Grant> {
    let protected: Vec<PathBuf> = spec
        .protected
        .iter()
        .map(|p| carve::canonical_lenient(p))
        .collect();
    let canon = |p: &str| carve::canonical_lenient(Path::new(p));
    let dev: Vec<PathBuf> = DEV_WRITABLE.iter().map(|p| canon(p)).collect();
    if spec.uid == 0 {
        let mut roots: Vec<PathBuf> = ROOT_WRITABLE.iter().map(|p| canon(p)).collect();
        roots.extend(
            spec.sandbox
                .writable
                .iter()
                .map(|p| carve::canonical_lenient(p)),
        );
        roots.extend(dev);
        carve::plan(&roots, &protected, &carve::RealFs)
    } else {
        let mut everywhere_but = protected.clone();
        everywhere_but.extend(NEVER_WRITABLE.iter().map(|p| canon(p)));
        let mut out = carve::plan(&[PathBuf::from("/")], &everywhere_but, &carve::RealFs);
        out.extend(carve::plan(&dev, &protected, &carve::RealFs));
        out
    }
}

/// The ruleset's descriptor, or `None` when the kernel has no Landlock (the caller decides
/// whether the agent may start without it). `allow_abstract_unix`: the segment's `[[unix]]`
/// names abstract sockets, so abstract AF_UNIX connections are left to the cgroup hooks
/// instead of being scoped to the agent's own domain.
pub fn ruleset(
    grants: &[Grant],
    allow_abstract_unix: bool,
) -> Result<Option<OwnedFd>, SandboxError> {
    let err = |e: landlock::RulesetError| SandboxError::Landlock(e.to_string());
    let mut scopes: BitFlags<Scope> = Scope::Signal.into();
    if !allow_abstract_unix {
        scopes |= Scope::AbstractUnixSocket;
    }
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(handled())
        .map_err(err)?
        .scope(scopes)
        .map_err(err)?
        .create()
        .map_err(err)?;
    for grant in grants {
        let Some(fd) = open_path(&grant.path, grant.kind) else {
            continue; // vanished or replaced since it was planned: grant less
        };
        let rights = match grant.kind {
            Kind::Dir => handled(),
            Kind::File | Kind::Symlink => file_rights(),
        };
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, rights))
            .map_err(err)?;
    }
    Ok(ruleset.into())
}

/// `O_PATH | O_NOFOLLOW` on a planned entry, checked to still be of the planned kind (an
/// entry swapped for a symbolic link after planning must not grant its target).
fn open_path(path: &Path, kind: Kind) -> Option<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: a valid C string; the result is checked.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let meta = std::fs::File::from(fd.try_clone().ok()?).metadata().ok()?;
    let now = if meta.file_type().is_symlink() {
        Kind::Symlink
    } else if meta.is_dir() {
        Kind::Dir
    } else {
        Kind::File
    };
    (now == kind && now != Kind::Symlink).then_some(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_get_only_file_rights() {
        assert_eq!(
            file_rights(),
            make_bitflags!(AccessFs::{WriteFile | Truncate})
        );
        assert!(!handled().intersects(AccessFs::from_read(landlock::ABI::V6)));
        assert!(!handled().contains(AccessFs::IoctlDev));
    }

    #[test]
    fn root_agents_write_only_beneath_temporary_dirs_and_their_list() {
        let mut spec = LaunchSpec {
            uid: 0,
            gid: 0,
            sandbox: Default::default(),
            protected: vec![],
            allow_abstract_unix: false,
        };
        spec.sandbox
            .writable
            .push("/nonexistent-agentseg-test".into());
        let g: Vec<PathBuf> = grants(&spec).into_iter().map(|g| g.path).collect();
        assert!(
            g.contains(&carve::canonical_lenient(Path::new("/tmp"))),
            "{g:?}"
        );
        assert!(g.contains(&PathBuf::from("/dev/null")), "{g:?}");
        assert!(
            !g.iter()
                .any(|p| p.starts_with("/etc") || p.starts_with("/usr"))
        );
    }

    #[test]
    fn non_root_agents_never_write_proc_sys_or_most_of_dev() {
        let spec = LaunchSpec {
            uid: 1000,
            gid: 1000,
            sandbox: Default::default(),
            protected: vec!["/etc".into()],
            allow_abstract_unix: false,
        };
        let g: Vec<PathBuf> = grants(&spec).into_iter().map(|g| g.path).collect();
        assert!(g.contains(&PathBuf::from("/dev/null")), "{g:?}");
        for p in &g {
            assert!(!p.starts_with("/proc") && !p.starts_with("/sys") && !p.starts_with("/etc"));
            assert!(
                !p.starts_with("/dev")
                    || DEV_WRITABLE
                        .iter()
                        .any(|d| p.starts_with(carve::canonical_lenient(Path::new(d)))),
                "{p:?}"
            );
            assert_ne!(p, Path::new("/"));
        }
    }
}
