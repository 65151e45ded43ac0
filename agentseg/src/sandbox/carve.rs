//! Where an agent may write, planned as Landlock grants: a pure function over a directory
//! lister, so it is tested on made-up trees without touching the real root.
//!
//! Landlock only grants (a rule allows writes *beneath* a directory); it cannot say "everywhere
//! except X". So "everywhere except the protected paths" is a carve-out: walk from each root
//! down to every protected path beneath it and grant the entries beside the way, never the
//! directories on the way themselves (granting one would grant everything under it, the
//! protected path included). New entries made later in a directory on the way stay
//! unwritable for the agent; symbolic links are never granted (a write through one is judged
//! at its target, which is planned on its own).
use std::{
    ffi::OsString,
    io,
    path::{Path, PathBuf},
};

/// What a directory entry is, read without following symbolic links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    /// A regular file, device, FIFO or socket: only the file rights apply to it.
    File,
    Symlink,
}

/// One Landlock rule to add: writes beneath `path` (a directory gets every handled right, any
/// other entry the file rights only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub path: PathBuf,
    pub kind: Kind,
}

/// The file system as the planner sees it.
pub trait Lister {
    /// What `path` is (not following a final symbolic link); `None` when it does not exist.
    fn kind(&self, path: &Path) -> Option<Kind>;
    /// The entries of a directory (names and kinds, `.` and `..` left out).
    fn list(&self, dir: &Path) -> io::Result<Vec<(OsString, Kind)>>;
}

/// Grants that allow writes beneath every `root` except beneath any `protected` path.
/// Paths must be absolute and canonical (no symbolic links, `.` or `..`): the caller resolves
/// them first. Entries that vanish (or cannot be listed) while walking are skipped, which only
/// ever grants less.
pub fn plan(roots: &[PathBuf], protected: &[PathBuf], fs: &dyn Lister) -> Vec<Grant> {
    let mut out = Vec::new();
    for root in roots {
        if protected.iter().any(|p| root.starts_with(p)) {
            continue;
        }
        match fs.kind(root) {
            None | Some(Kind::Symlink) => {}
            Some(kind) if !has_protected_below(root, protected) => out.push(Grant {
                path: root.clone(),
                kind,
            }),
            Some(Kind::Dir) => walk(root, protected, fs, &mut out),
            // A protected path "beneath" a file cannot exist: nothing to grant either way.
            Some(Kind::File) => {}
        }
    }
    out
}

fn has_protected_below(dir: &Path, protected: &[PathBuf]) -> bool {
    protected.iter().any(|p| p != dir && p.starts_with(dir))
}

fn walk(dir: &Path, protected: &[PathBuf], fs: &dyn Lister, out: &mut Vec<Grant>) {
    let Ok(mut entries) = fs.list(dir) else {
        return;
    };
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, kind) in entries {
        let path = dir.join(&name);
        if kind == Kind::Symlink || protected.iter().any(|p| path.starts_with(p)) {
            continue;
        }
        if has_protected_below(&path, protected) {
            if kind == Kind::Dir {
                walk(&path, protected, fs, out);
            }
        } else {
            out.push(Grant { path, kind });
        }
    }
}

/// The real file system.
pub struct RealFs;

impl Lister for RealFs {
    fn kind(&self, path: &Path) -> Option<Kind> {
        std::fs::symlink_metadata(path)
            .ok()
            .map(|m| kind_of(m.file_type()))
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<(OsString, Kind)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            // An entry that vanished between readdir and stat is skipped.
            let Ok(entry) = entry else { continue };
            let Ok(t) = entry.file_type() else { continue };
            out.push((entry.file_name(), kind_of(t)));
        }
        Ok(out)
    }
}

fn kind_of(t: std::fs::FileType) -> Kind {
    if t.is_symlink() {
        Kind::Symlink
    } else if t.is_dir() {
        Kind::Dir
    } else {
        Kind::File
    }
}

/// An absolute path with every symbolic link of its existing part resolved; the part that
/// does not exist yet is appended as written (a protected directory the daemon has not made
/// yet is still protected where it will appear).
pub fn canonical_lenient(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(c) = std::fs::canonicalize(&existing) {
            let mut out = c;
            out.extend(rest.iter().rev());
            return out;
        }
        match (existing.file_name().map(OsString::from), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return path.to_path_buf(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A made-up tree: path → kind; a directory's entries are the paths one level below it.
    struct Fake(BTreeMap<PathBuf, Kind>);

    impl Fake {
        fn new(entries: &[(&str, Kind)]) -> Self {
            let mut m: BTreeMap<PathBuf, Kind> = entries
                .iter()
                .map(|(p, k)| (PathBuf::from(p), *k))
                .collect();
            m.insert("/".into(), Kind::Dir);
            Self(m)
        }
    }

    impl Lister for Fake {
        fn kind(&self, path: &Path) -> Option<Kind> {
            self.0.get(path).copied()
        }
        fn list(&self, dir: &Path) -> io::Result<Vec<(OsString, Kind)>> {
            if self.0.get(dir) != Some(&Kind::Dir) {
                return Err(io::Error::from_raw_os_error(libc::ENOENT));
            }
            Ok(self
                .0
                .iter()
                .filter(|(p, _)| p.parent() == Some(dir))
                .map(|(p, k)| (p.file_name().unwrap().to_owned(), *k))
                .collect())
        }
    }

    use Kind::*;

    fn show(grants: &[Grant]) -> Vec<String> {
        grants
            .iter()
            .map(|g| {
                format!(
                    "{}{}",
                    g.path.display(),
                    if g.kind == Dir { "/" } else { "" }
                )
            })
            .collect()
    }

    fn paths(p: &[&str]) -> Vec<PathBuf> {
        p.iter().map(PathBuf::from).collect()
    }

    fn tree() -> Fake {
        Fake::new(&[
            ("/bin", Symlink),
            ("/etc", Dir),
            ("/etc/agentseg", Dir),
            ("/etc/agentseg/agentseg.toml", File),
            ("/etc/agentseg/policies", Dir),
            ("/etc/hosts", File),
            ("/etc/cron.d", Dir),
            ("/home", Dir),
            ("/proc", Dir),
            ("/sys", Dir),
            ("/sys/fs", Dir),
            ("/dev", Dir),
            ("/dev/null", File),
            ("/dev/sda", File),
            ("/dev/shm", Dir),
            ("/tmp", Dir),
            ("/tmp/.tmpAB", Dir),
            ("/tmp/.tmpAB/policies", Dir),
            ("/tmp/.tmpAB/state", Dir),
            ("/tmp/other", File),
            ("/usr", Dir),
            ("/usr/bin", Dir),
            ("/usr/bin/agentseg", File),
            ("/usr/bin/sh", File),
            ("/usr/lib", Dir),
            ("/var", Dir),
            ("/var/lib", Dir),
            ("/var/lib/dpkg", Dir),
            ("/var/log", Dir),
        ])
    }

    #[test]
    fn everywhere_but_the_protected_paths_and_the_way_to_them() {
        let protected = paths(&[
            "/etc/agentseg",
            "/usr/bin/agentseg",
            "/var/lib/agentseg", // not made yet
            "/proc",
            "/sys",
            "/dev",
        ]);
        let grants = plan(&paths(&["/"]), &protected, &tree());
        assert_eq!(
            show(&grants),
            [
                "/etc/cron.d/",
                "/etc/hosts",
                "/home/",
                "/tmp/",
                "/usr/bin/sh",
                "/usr/lib/",
                "/var/lib/dpkg/",
                "/var/log/",
            ]
        );
    }

    #[test]
    fn a_protected_path_under_a_root_is_carved_out_of_it() {
        // A root agent may write beneath /tmp, but not into a daemon's files kept there.
        let protected = paths(&["/tmp/.tmpAB/policies"]);
        let roots = paths(&["/tmp", "/var/tmp", "/dev/shm", "/dev/null"]);
        let grants = plan(&roots, &protected, &tree());
        assert_eq!(
            show(&grants),
            ["/tmp/.tmpAB/state/", "/tmp/other", "/dev/shm/", "/dev/null"]
        );
    }

    #[test]
    fn roots_inside_protected_paths_and_symlinks_get_nothing() {
        let protected = paths(&["/etc/agentseg"]);
        let roots = paths(&["/etc/agentseg/policies", "/bin", "/nonexistent"]);
        assert!(plan(&roots, &protected, &tree()).is_empty());
        // Protecting a root itself grants nothing beneath it.
        assert!(plan(&paths(&["/tmp"]), &paths(&["/tmp"]), &tree()).is_empty());
        // Protecting "/" grants nothing at all.
        assert!(plan(&paths(&["/"]), &paths(&["/"]), &tree()).is_empty());
    }

    #[test]
    fn unlistable_directories_on_the_way_grant_nothing_beneath() {
        struct Broken(Fake);
        impl Lister for Broken {
            fn kind(&self, p: &Path) -> Option<Kind> {
                self.0.kind(p)
            }
            fn list(&self, dir: &Path) -> io::Result<Vec<(OsString, Kind)>> {
                if dir == Path::new("/usr") {
                    return Err(io::Error::from_raw_os_error(libc::ENOENT));
                }
                self.0.list(dir)
            }
        }
        let grants = plan(
            &paths(&["/"]),
            &paths(&["/usr/bin/agentseg"]),
            &Broken(tree()),
        );
        assert!(!show(&grants).iter().any(|g| g.starts_with("/usr")));
        assert!(show(&grants).contains(&"/etc/".to_owned()));
    }

    #[test]
    fn lenient_canonical_paths_keep_the_missing_tail() {
        let dir = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(dir.path()).unwrap();
        std::os::unix::fs::symlink(&real, real.join("link")).unwrap();
        assert_eq!(
            canonical_lenient(&real.join("link/not/yet")),
            real.join("not/yet")
        );
        assert_eq!(canonical_lenient(&real.join("link")), real);
    }
}
