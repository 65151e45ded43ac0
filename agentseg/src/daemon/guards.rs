//! Member cgroups are judged from the moment they exist. The daemon cannot register a cgroup
//! before someone makes it, so it guards its parent: the parent's membership entry carries
//! `MEMBER_GUARD`, every child the daemon knows is registered (a member, or an outsider), and
//! the kernel denies a task or socket in a child it has not registered yet (pending). A new
//! child is classified within milliseconds (inotify on the guarded directory, and every tick).
//!
//! Parents of declared `cgroups` are created by the daemon when missing (empty cgroups, so
//! that a guard always sits right above the member). Not guarded: a member directly under the
//! cgroup2 root (every top-level cgroup of the host would be held at creation) and systemd
//! units (a slice's services come and go; they are registered on the inotify event, and
//! `check --show` prints the unit settings that confine a unit by itself).
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
};

use agentseg_common::{MEMBER_GUARD, MEMBER_OUTSIDER, Member, SEGMENT_RELEASED};
use nix::sys::inotify::{AddWatchFlags, Inotify, WatchDescriptor};
use tracing::{info, warn};

use super::engine::Engine;
use crate::{cgroup, compile::Compiled};

/// A guarded directory and the children the daemon registered as outsiders.
#[derive(Debug, Default)]
pub(super) struct GuardDir {
    pub id: u64,
    pub outsiders: BTreeMap<PathBuf, u64>,
}

/// Inotify on the directories where member cgroups appear (guards, unit slices). The engine
/// adds and removes watches; a thread of the daemon reads the events and asks for a sync.
pub struct CgroupWatch {
    pub inotify: Arc<Inotify>,
    watches: BTreeMap<PathBuf, WatchDescriptor>,
}

impl CgroupWatch {
    pub fn new(inotify: Arc<Inotify>) -> Self {
        Self {
            inotify,
            watches: BTreeMap::new(),
        }
    }

    fn set(&mut self, wanted: &BTreeSet<PathBuf>) {
        let stale: Vec<PathBuf> = self
            .watches
            .keys()
            .filter(|p| !wanted.contains(*p))
            .cloned()
            .collect();
        for p in stale {
            if let Some(wd) = self.watches.remove(&p) {
                let _ = self.inotify.rm_watch(wd);
            }
        }
        for p in wanted {
            if self.watches.contains_key(p) {
                continue;
            }
            match self
                .inotify
                .add_watch(p, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_DELETE)
            {
                Ok(wd) => {
                    self.watches.insert(p.clone(), wd);
                }
                Err(e) => {
                    warn!(dir = %p.display(), "cannot watch for new member cgroups ({e}); the tick still finds them")
                }
            }
        }
    }
}

impl Engine {
    /// An outsider entry: in no segment, never a match; `flags` may carry MEMBER_GUARD.
    pub(super) fn outsider(flags: u32) -> Member {
        Member {
            segment_ids: [SEGMENT_RELEASED; 2],
            kind: MEMBER_OUTSIDER,
            flags,
            agent_id: [0; 16],
            dns_slot: 0,
            _pad: 0,
        }
    }

    pub(super) fn is_guard(&self, id: u64) -> bool {
        self.guards.values().any(|g| g.id == id)
    }

    /// The guard flag a member entry for `id` must carry.
    pub(super) fn guard_flag(&self, id: u64) -> u32 {
        if self.is_guard(id) { MEMBER_GUARD } else { 0 }
    }

    /// The directories to guard for `compiled`: the parents of its member cgroups (created
    /// when missing), except the cgroup2 root.
    pub(super) fn wanted_guards(&self, compiled: &Compiled) -> BTreeSet<PathBuf> {
        let mut out = BTreeSet::new();
        for seg in &compiled.segments {
            for rel in &seg.member_cgroups {
                let Ok(rel) = cgroup::check_relative(rel) else {
                    continue;
                };
                let path = self.cgroup2.join(rel);
                let Some(parent) = path.parent() else {
                    continue;
                };
                if parent == self.cgroup2 {
                    warn!(cgroup = %path.display(), "a member cgroup directly under the cgroup2 root is not guarded: nest it under a parent of its own to have it judged from its first instant");
                    continue;
                }
                if let Err(e) = cgroup::create(parent) {
                    warn!(dir = %parent.display(), "cannot create the parent of a member cgroup ({e}); it is not guarded");
                    continue;
                }
                out.insert(parent.to_owned());
            }
        }
        out
    }

    /// Register `wanted` guards (before a policy switch: only additions) and classify their
    /// children.
    pub(super) fn add_guards(&mut self, wanted: &BTreeSet<PathBuf>, declared: &[(usize, PathBuf)]) {
        for dir in wanted {
            if self.guards.contains_key(dir) {
                continue;
            }
            let Ok(id) = cgroup::cgroup_id(dir) else {
                continue;
            };
            let entry = match self.dp.member(id) {
                Some(mut m) => {
                    m.flags |= MEMBER_GUARD;
                    m
                }
                None => Self::outsider(MEMBER_GUARD),
            };
            match self.dp.set_member(id, entry) {
                Ok(()) => {
                    info!(dir = %dir.display(), "guarding: its new child cgroups are denied until registered");
                    self.guards.insert(
                        dir.clone(),
                        GuardDir {
                            id,
                            outsiders: BTreeMap::new(),
                        },
                    );
                }
                Err(e) => warn!(dir = %dir.display(), "guarding: {e:#}"),
            }
        }
        self.classify_guard_children(declared);
        self.update_watches(declared);
    }

    /// Drop the guards `wanted` no longer has (after a policy switch), with their outsiders.
    pub(super) fn retain_guards(&mut self, wanted: &BTreeSet<PathBuf>) {
        let stale: Vec<PathBuf> = self
            .guards
            .keys()
            .filter(|p| !wanted.contains(*p))
            .cloned()
            .collect();
        for dir in stale {
            let Some(guard) = self.guards.remove(&dir) else {
                continue;
            };
            for id in guard.outsiders.values() {
                self.remove_outsider(*id);
            }
            match self.dp.member(guard.id) {
                Some(m) if m.kind == MEMBER_OUTSIDER => self.remove_outsider(guard.id),
                Some(mut m) => {
                    m.flags &= !MEMBER_GUARD;
                    let _ = self.dp.set_member(guard.id, m);
                }
                None => {}
            }
            info!(dir = %dir.display(), "no longer guarding");
        }
    }

    fn remove_outsider(&mut self, id: u64) {
        if self
            .dp
            .member(id)
            .is_some_and(|m| m.kind == MEMBER_OUTSIDER)
            && let Err(e) = self.dp.remove_member(id)
        {
            warn!(cgroup_id = id, "removing an outsider entry: {e:#}");
        }
    }

    /// Every child of a guard is registered: declared members by membership tracking, the
    /// rest here as outsiders. Children that went away are forgotten.
    pub(super) fn classify_guard_children(&mut self, declared: &[(usize, PathBuf)]) {
        let declared: BTreeSet<&Path> = declared.iter().map(|(_, p)| p.as_path()).collect();
        let dirs: Vec<PathBuf> = self.guards.keys().cloned().collect();
        let mut changed = false;
        for dir in dirs {
            let children: BTreeMap<PathBuf, u64> = std::fs::read_dir(&dir)
                .map(|entries| {
                    entries
                        .filter_map(Result::ok)
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .filter_map(|e| Some((e.path(), cgroup::cgroup_id(&e.path()).ok()?)))
                        .collect()
                })
                .unwrap_or_default();
            let Some(known) = self.guards.get(&dir).map(|g| g.outsiders.clone()) else {
                continue;
            };
            for (path, id) in &known {
                if children.get(path) != Some(id) {
                    self.remove_outsider(*id);
                    if let Some(g) = self.guards.get_mut(&dir) {
                        g.outsiders.remove(path);
                    }
                }
            }
            for (path, id) in children {
                if declared.contains(path.as_path())
                    || known.get(&path) == Some(&id)
                    || self.dp.member(id).is_some()
                {
                    continue;
                }
                match self.dp.set_member(id, Self::outsider(0)) {
                    Ok(()) => {
                        changed = true;
                        if let Some(g) = self.guards.get_mut(&dir) {
                            g.outsiders.insert(path, id);
                        }
                    }
                    Err(e) => warn!(cgroup = %path.display(), "registering an outsider: {e:#}"),
                }
            }
        }
        if changed {
            self.bump_epoch();
        }
    }

    /// Watch the guards and the parents of unit cgroups for new directories.
    pub(super) fn update_watches(&mut self, declared: &[(usize, PathBuf)]) {
        let mut wanted: BTreeSet<PathBuf> = self.guards.keys().cloned().collect();
        wanted.extend(
            declared
                .iter()
                .filter_map(|(_, p)| p.parent().map(Path::to_owned))
                .filter(|p| p.exists() && *p != self.cgroup2),
        );
        if let Some(w) = self.watch.as_mut() {
            w.set(&wanted);
        }
    }

    /// Remembered flow verdicts of an older epoch are judged again (membership or policy
    /// changed).
    pub(super) fn bump_epoch(&mut self) {
        let result = self.dp.config().and_then(|mut c| {
            c.epoch = c.epoch.wrapping_add(1);
            self.dp.set_config(c).map(|()| c.epoch)
        });
        match result {
            // The record names the epoch: a restart compares it with the kernel's.
            Ok(epoch) => {
                if let Some(digest) = self.live_digest.clone() {
                    self.record_live(self.generation, epoch, &digest);
                }
            }
            Err(e) => warn!("bumping the epoch: {e:#}"),
        }
    }
}
