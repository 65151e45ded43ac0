//! Attachments as pinned `bpf_link`s, one per (cgroup, program): they outlive the daemon
//! (an unpinned link detaches when its last descriptor closes: fail-open on a crash).
use std::{
    collections::BTreeSet,
    fs::{self, File},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use agentseg_common::PIN_LAYOUT;
use aya::programs::{
    CgroupAttachMode,
    links::{FdLink, PinnedLink},
};
use tracing::{debug, warn};

use super::{Datapath, DatapathError, PROGRAMS, PinDirs, Prog, program, sys};

fn link_pin(pins: &PinDirs, cgroup_id: u64, prog: &str) -> PathBuf {
    pins.links.join(format!("{cgroup_id}_{prog}"))
}

fn parse_pin_name(name: &str) -> Option<u64> {
    let (id, prog) = name.split_once('_')?;
    PROGRAMS.contains(&prog).then_some(())?;
    id.parse().ok()
}

impl Datapath {
    /// Cgroup ids that have pinned links (from an earlier daemon or this one).
    pub fn pinned_cgroups(&self) -> BTreeSet<u64> {
        fs::read_dir(&self.pins.links)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|e| parse_pin_name(&e.file_name().to_string_lossy()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Attach every program to the cgroup `dir` (id `cgroup_id`) and pin the links. A link
    /// already pinned for it is switched to this daemon's program in place (BPF_LINK_UPDATE):
    /// adoption without a detached instant and without a duplicate attachment.
    pub fn attach(&mut self, cgroup_id: u64, dir: &Path) -> Result<(), DatapathError> {
        for name in PROGRAMS {
            let pin = link_pin(&self.pins, cgroup_id, name);
            if pin.exists() {
                match self.update_link(&pin, name) {
                    Ok(()) => continue,
                    Err(e) => {
                        warn!(link = %pin.display(), "pinned link not reusable, replacing it: {e}");
                        let _ = fs::remove_file(&pin);
                    }
                }
            }
            let file = File::open(dir).map_err(|source| DatapathError::Io {
                what: "opening cgroup",
                path: dir.to_owned(),
                source,
            })?;
            let err = |source| DatapathError::Program { name, source };
            let link_err = |source| DatapathError::Link {
                path: pin.clone(),
                source,
            };
            // aya uses bpf_link (kernel >= 5.7): link attachments always coexist with other
            // programs on the cgroup (all must allow), and the kernel refuses flags with them.
            let mode = CgroupAttachMode::Single;
            let link = match program(&mut self.ebpf, name)? {
                Prog::SockAddr(p) => {
                    let id = p.attach(&file, mode).map_err(err)?;
                    FdLink::try_from(p.take_link(id).map_err(err)?).map_err(link_err)?
                }
                Prog::Skb(p, attach_type) => {
                    let id = p.attach(&file, attach_type, mode).map_err(err)?;
                    FdLink::try_from(p.take_link(id).map_err(err)?).map_err(link_err)?
                }
            };
            link.pin(&pin).map_err(|source| DatapathError::Pin {
                path: pin.clone(),
                source,
            })?;
            debug!(cgroup = %dir.display(), program = name, "attached and pinned");
        }
        Ok(())
    }

    fn update_link(&mut self, pin: &Path, name: &'static str) -> Result<(), DatapathError> {
        let link = sys::obj_get(pin).map_err(|source| DatapathError::Io {
            what: "opening pinned link",
            path: pin.to_owned(),
            source,
        })?;
        let err = |source| DatapathError::Program { name, source };
        let fd = match program(&mut self.ebpf, name)? {
            Prog::SockAddr(p) => p.fd().map_err(err)?.as_fd(),
            Prog::Skb(p, _) => p.fd().map_err(err)?.as_fd(),
        };
        sys::link_update(link.as_fd(), fd).map_err(|source| DatapathError::Io {
            what: "updating pinned link",
            path: pin.to_owned(),
            source,
        })
    }

    /// Detach every program from cgroup `cgroup_id` by unpinning its links.
    pub fn detach(&mut self, cgroup_id: u64) -> Result<(), DatapathError> {
        for name in PROGRAMS {
            unpin_link(&link_pin(&self.pins, cgroup_id, name))?;
        }
        Ok(())
    }
}

fn unpin_link(pin: &Path) -> Result<(), DatapathError> {
    if !pin.exists() {
        return Ok(());
    }
    let link = PinnedLink::from_pin(pin).map_err(|source| DatapathError::Link {
        path: pin.to_owned(),
        source,
    })?;
    // Unpinned, the link lives only as long as this descriptor: dropping it detaches.
    let link = link.unpin().map_err(|source| DatapathError::Io {
        what: "unpinning",
        path: pin.to_owned(),
        source,
    })?;
    drop(link);
    Ok(())
}

/// `agentseg uninstall`: detach everything and remove every pin under `pin_root`.
/// Errors are collected, not returned at the first: as much as possible is removed.
pub fn uninstall(pin_root: &Path) -> Vec<String> {
    let pins = PinDirs::new(pin_root);
    let mut errors = Vec::new();
    if let Ok(entries) = fs::read_dir(&pins.links) {
        for e in entries.filter_map(Result::ok) {
            if let Err(err) = unpin_link(&e.path()) {
                errors.push(format!("{}: {err}", e.path().display()));
                let _ = fs::remove_file(e.path());
            }
        }
    }
    for dir in [&pins.maps] {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.filter_map(Result::ok) {
                if let Err(err) = fs::remove_file(e.path()) {
                    errors.push(format!("{}: {err}", e.path().display()));
                }
            }
        }
    }
    for dir in [
        pins.links.clone(),
        pins.maps.clone(),
        pin_root.join(PIN_LAYOUT),
        pin_root.to_owned(),
    ] {
        if dir.exists()
            && let Err(err) = fs::remove_dir(&dir)
        {
            errors.push(format!("{}: {err}", dir.display()));
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pin_names_round_trip() {
        let pins = PinDirs::new(Path::new("/sys/fs/bpf/agentseg"));
        let p = link_pin(&pins, 4242, agentseg_common::prog_names::CONNECT6);
        assert_eq!(
            p,
            Path::new("/sys/fs/bpf/agentseg/v1/links/4242_agentseg_connect6")
        );
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(parse_pin_name(&name), Some(4242));
        assert_eq!(parse_pin_name("4242_other"), None);
        assert_eq!(parse_pin_name("x_agentseg_connect6"), None);
    }
}
