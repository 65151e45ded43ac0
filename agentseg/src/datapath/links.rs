//! Attachments as pinned `bpf_link`s, one per (cgroup, program). The daemon keeps every link
//! open as well as pinned: a link whose pin is removed stays attached while the daemon lives
//! (and is pinned again), and a link detached from outside (`bpftool link detach`) is found
//! by [`Datapath::check_links`] and attached anew within a tick.
use std::{
    collections::BTreeSet,
    fs::{self, File},
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use agentseg_common::{PIN_LAYOUT, map_names};
use tracing::{debug, warn};

use super::{Datapath, DatapathError, PinDirs, all_programs, attach_type, sys};

/// A link this daemon holds.
pub(super) struct HeldLink {
    fd: OwnedFd,
    pin: PathBuf,
    /// The cgroup directory (to attach again after a detach).
    dir: PathBuf,
}

/// Something outside the daemon undid part of the enforcement, and what the daemon did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkAlarm {
    /// The link's pin, or the map's pin.
    pub pin: PathBuf,
    /// "link detached", "link pin removed", "map pin removed".
    pub what: &'static str,
    /// None when repaired; the error otherwise.
    pub error: Option<String>,
}

fn link_pin(pins: &PinDirs, cgroup_id: u64, prog: &str) -> PathBuf {
    pins.links.join(format!("{cgroup_id}_{prog}"))
}

fn parse_pin_name(name: &str) -> Option<u64> {
    let (id, prog) = name.split_once('_')?;
    all_programs().any(|p| p == prog).then_some(())?;
    id.parse().ok()
}

fn open_dir(dir: &Path) -> Result<File, DatapathError> {
    File::open(dir).map_err(|source| DatapathError::Io {
        what: "opening cgroup",
        path: dir.to_owned(),
        source,
    })
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

    /// Attach `programs` to the cgroup `dir` (id `cgroup_id`), pin and hold the links. A link
    /// already pinned for it is switched to this daemon's program in place (BPF_LINK_UPDATE):
    /// adoption without a detached instant and without a duplicate attachment.
    pub fn attach(
        &mut self,
        cgroup_id: u64,
        dir: &Path,
        programs: &[&'static str],
    ) -> Result<(), DatapathError> {
        for &name in programs {
            if self.links.contains_key(&(cgroup_id, name)) {
                continue;
            }
            let pin = link_pin(&self.pins, cgroup_id, name);
            let fd = match self.adopt_link(&pin, name, cgroup_id) {
                Some(fd) => fd,
                None => {
                    let fd = self.create_link(dir, name)?;
                    sys::obj_pin(fd.as_fd(), &pin).map_err(|source| DatapathError::Io {
                        what: "pinning link",
                        path: pin.clone(),
                        source,
                    })?;
                    debug!(cgroup = %dir.display(), program = name, "attached and pinned");
                    fd
                }
            };
            self.links.insert(
                (cgroup_id, name),
                HeldLink {
                    fd,
                    pin,
                    dir: dir.to_owned(),
                },
            );
        }
        Ok(())
    }

    /// A link pinned by an earlier daemon, switched to this daemon's program; None (and the
    /// stale pin removed) when there is none or it is no longer attached to that cgroup.
    fn adopt_link(&mut self, pin: &Path, name: &'static str, cgroup_id: u64) -> Option<OwnedFd> {
        if !pin.exists() {
            return None;
        }
        let result = sys::obj_get(pin).and_then(|link| {
            let info = sys::cgroup_link_info(link.as_fd())?;
            if info.cgroup_id != cgroup_id {
                return Err(std::io::Error::other("the link is no longer attached"));
            }
            Ok(link)
        });
        let link = match result {
            Ok(link) => link,
            Err(e) => {
                warn!(link = %pin.display(), "pinned link not reusable, replacing it: {e}");
                let _ = fs::remove_file(pin);
                return None;
            }
        };
        let prog = self.prog_fd(name).ok()?;
        match sys::link_update(link.as_fd(), prog) {
            Ok(()) => Some(link),
            Err(e) => {
                warn!(link = %pin.display(), "updating pinned link failed, replacing it: {e}");
                let _ = fs::remove_file(pin);
                None
            }
        }
    }

    fn create_link(&mut self, dir: &Path, name: &'static str) -> Result<OwnedFd, DatapathError> {
        let cgroup = open_dir(dir)?;
        let prog = self.prog_fd(name)?;
        // Links always coexist with other programs on the cgroup (all must allow).
        sys::link_create(prog, cgroup.as_fd(), attach_type(name)).map_err(|source| {
            DatapathError::Io {
                what: "attaching",
                path: dir.join(name),
                source,
            }
        })
    }

    /// Detach every program from cgroup `cgroup_id`: drop the held links and remove the pins
    /// (a link goes with its last reference).
    pub fn detach(&mut self, cgroup_id: u64) -> Result<(), DatapathError> {
        for name in all_programs() {
            if let Some(held) = self.links.remove(&(cgroup_id, name)) {
                let _ = sys::link_detach(held.fd.as_fd());
            }
            remove_link_pin(&link_pin(&self.pins, cgroup_id, name)).map_err(|source| {
                DatapathError::Io {
                    what: "unpinning",
                    path: link_pin(&self.pins, cgroup_id, name),
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// How many links this daemon holds.
    pub fn link_count(&self) -> usize {
        self.links.len()
    }

    /// Check every held link and pin, repair what was undone from outside, say what it was.
    /// A link whose cgroup is gone is dropped silently (membership tracking forgets it).
    pub fn check_links(&mut self) -> Vec<LinkAlarm> {
        let mut alarms = Vec::new();
        let keys: Vec<(u64, &'static str)> = self.links.keys().copied().collect();
        for key in keys {
            let Some(held) = self.links.get(&key) else {
                continue;
            };
            let attached = sys::cgroup_link_info(held.fd.as_fd())
                .map(|i| i.cgroup_id == key.0)
                .unwrap_or(false);
            if attached {
                if !held.pin.exists() {
                    let error = sys::obj_pin(held.fd.as_fd(), &held.pin)
                        .err()
                        .map(|e| e.to_string());
                    alarms.push(LinkAlarm {
                        pin: held.pin.clone(),
                        what: "link pin removed",
                        error,
                    });
                }
                continue;
            }
            let (dir, pin) = (held.dir.clone(), held.pin.clone());
            if !dir.exists() {
                self.links.remove(&key);
                let _ = fs::remove_file(&pin);
                continue;
            }
            let repaired = self.create_link(&dir, key.1).and_then(|fd| {
                let _ = fs::remove_file(&pin);
                sys::obj_pin(fd.as_fd(), &pin).map_err(|source| DatapathError::Io {
                    what: "pinning link",
                    path: pin.clone(),
                    source,
                })?;
                Ok(fd)
            });
            let error = match repaired {
                Ok(fd) => {
                    self.links.insert(
                        key,
                        HeldLink {
                            fd,
                            pin: pin.clone(),
                            dir,
                        },
                    );
                    None
                }
                Err(e) => Some(format!("{e:#}")),
            };
            alarms.push(LinkAlarm {
                pin,
                what: "link detached",
                error,
            });
        }
        for name in map_names::ALL {
            let pin = self.pins.maps.join(name);
            if pin.exists() {
                continue;
            }
            let error = match self.ebpf.map(name).and_then(super::map_data) {
                Some(data) => data.pin(&pin).err().map(|e| e.to_string()),
                // The ring buffer was taken out for the reader: pin its descriptor.
                None => self
                    .events_fd
                    .as_ref()
                    .map(|fd| sys::obj_pin(fd.as_fd(), &pin))
                    .and_then(|r| r.err())
                    .map(|e| e.to_string()),
            };
            alarms.push(LinkAlarm {
                pin,
                what: "map pin removed",
                error,
            });
        }
        alarms
    }

    /// Remove the pins of other layouts under the pin root (a daemon of another build left
    /// them): called once this daemon's own links are attached, so there is no gap.
    pub fn remove_other_layouts(&self) -> UninstallReport {
        let mut report = UninstallReport::default();
        for dir in layout_dirs(&self.pins.root) {
            if dir.file_name().is_some_and(|n| n == PIN_LAYOUT) {
                continue;
            }
            report.absorb(uninstall_layout(&dir));
        }
        report
    }
}

/// What `uninstall` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UninstallReport {
    pub links_removed: usize,
    pub maps_removed: usize,
    pub errors: Vec<String>,
}

impl UninstallReport {
    fn absorb(&mut self, other: UninstallReport) {
        self.links_removed += other.links_removed;
        self.maps_removed += other.maps_removed;
        self.errors.extend(other.errors);
    }
}

/// Layout directories under a pin root (`v1` of old builds, `l-<hash>` since).
fn layout_dirs(root: &Path) -> Vec<PathBuf> {
    fs::read_dir(root)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    e.file_type().is_ok_and(|t| t.is_dir())
                        && (name.starts_with("l-") || name == "v1")
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// The processes (other than this one) that hold the pinned CONFIG map of `layout` open: a
/// daemon running on these pins. Checked on the pins themselves (`map_id` in
/// `/proc/PID/fdinfo`), not by whether some socket path answers.
pub fn pin_holders(layout: &Path) -> Result<Vec<u32>, String> {
    let pin = layout.join("maps").join(map_names::CONFIG);
    if !pin.exists() {
        return Ok(Vec::new());
    }
    let data = aya::maps::MapData::from_pin(&pin).map_err(|e| format!("{}: {e}", pin.display()))?;
    let id = data
        .info()
        .map_err(|e| format!("{}: {e}", pin.display()))?
        .id();
    let needle = format!("map_id:\t{id}");
    let me = std::process::id();
    let mut out = Vec::new();
    for proc_entry in fs::read_dir("/proc").map_err(|e| format!("/proc: {e}"))? {
        let Ok(proc_entry) = proc_entry else { continue };
        let Ok(pid) = proc_entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = fs::read_dir(proc_entry.path().join("fdinfo")) else {
            continue;
        };
        let holds = fds.filter_map(Result::ok).any(|fd| {
            fs::read_to_string(fd.path())
                .is_ok_and(|text| text.lines().any(|l| l.trim_end() == needle))
        });
        if holds {
            out.push(pid);
        }
    }
    Ok(out)
}

/// `agentseg uninstall`: detach everything and remove every pin under `pin_root`, every
/// layout. Errors are collected, not returned at the first: as much as possible is removed.
pub fn uninstall(pin_root: &Path) -> UninstallReport {
    let mut report = UninstallReport::default();
    for dir in layout_dirs(pin_root) {
        report.absorb(uninstall_layout(&dir));
    }
    if pin_root.exists()
        && let Err(err) = fs::remove_dir(pin_root)
    {
        report.errors.push(format!("{}: {err}", pin_root.display()));
    }
    report
}

/// Detach the link pinned at `pin` (if it is one and still attached) and remove the pin. A
/// link that is only unpinned is freed later (RCU, then a workqueue): detaching it first means
/// it is gone when this returns. Not found is not an error.
fn remove_link_pin(pin: &Path) -> std::io::Result<()> {
    if let Ok(link) = sys::obj_get(pin) {
        let _ = sys::link_detach(link.as_fd());
    }
    match fs::remove_file(pin) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn uninstall_layout(layout: &Path) -> UninstallReport {
    let mut report = UninstallReport::default();
    let mut remove_all =
        |dir: &Path, count: &mut usize, remove: fn(&Path) -> std::io::Result<()>| {
            if let Ok(entries) = fs::read_dir(dir) {
                for e in entries.filter_map(Result::ok) {
                    match remove(&e.path()) {
                        Ok(()) => *count += 1,
                        Err(err) => report.errors.push(format!("{}: {err}", e.path().display())),
                    }
                }
            }
        };
    let (mut links, mut maps) = (0, 0);
    // Links first, each detached before its pin goes: gone when this returns.
    remove_all(&layout.join("links"), &mut links, remove_link_pin);
    remove_all(&layout.join("maps"), &mut maps, |p| fs::remove_file(p));
    // Program pins: `progs/<build>/<program>`.
    let mut programs = 0;
    remove_all(
        &layout.join("progs"),
        &mut programs,
        super::remove_program_dir,
    );
    report.links_removed = links;
    report.maps_removed = maps;
    for dir in [
        layout.join("links"),
        layout.join("maps"),
        layout.join("progs"),
        layout.to_owned(),
    ] {
        if dir.exists()
            && let Err(err) = fs::remove_dir(&dir)
        {
            report.errors.push(format!("{}: {err}", dir.display()));
        }
    }
    report
}

/// Whether the calling process lives in a member cgroup (or below one) of any layout's pinned
/// membership. An error (the pins cannot be read: inside a sandbox, `bpf()` is refused) is
/// for the caller to treat as "cannot tell".
pub fn caller_is_member(pin_root: &Path) -> Result<bool, String> {
    use agentseg_common::{MEMBER_OUTSIDER, Member};
    let own = crate::cgroup::of_pid(std::process::id()).map_err(|e| e.to_string())?;
    let mount = crate::cgroup::cgroup2_mount().map_err(|e| e.to_string())?;
    let mut ids = Vec::new();
    let mut path = mount.join(own);
    while path.starts_with(&mount) {
        if let Ok(id) = crate::cgroup::cgroup_id(&path) {
            ids.push(id);
        }
        if !path.pop() {
            break;
        }
    }
    for layout in layout_dirs(pin_root) {
        let pin = layout.join("maps").join(map_names::MEMBERS);
        if !pin.exists() {
            continue;
        }
        let data =
            aya::maps::MapData::from_pin(&pin).map_err(|e| format!("{}: {e}", pin.display()))?;
        let members: aya::maps::HashMap<_, u64, Member> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))
                .map_err(|e| format!("{}: {e}", pin.display()))?;
        if ids
            .iter()
            .any(|id| members.get(id, 0).is_ok_and(|m| m.kind != MEMBER_OUTSIDER))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The processes holding any layout's pins under `pin_root` (see [`pin_holders`]).
pub fn pin_root_holders(pin_root: &Path) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for layout in layout_dirs(pin_root) {
        out.extend(pin_holders(&layout)?);
    }
    Ok(out)
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
            Path::new("/sys/fs/bpf/agentseg")
                .join(PIN_LAYOUT)
                .join("links/4242_agentseg_connect6")
        );
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(parse_pin_name(&name), Some(4242));
        assert_eq!(parse_pin_name("4242_other"), None);
        assert_eq!(parse_pin_name("x_agentseg_connect6"), None);
    }
}
