//! What the daemon checks before it trusts pinned state: the pin tree is root's (owner 0, no
//! access for anyone else, no symlinks anywhere), and every adopted map has the type, key and
//! value sizes and capacity this build expects. A pin tree that fails is refused with the
//! reason; nothing of it is adopted.
use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use agentseg_common::{
    Config, Counters, DenyFlow, DenyFlowKey, DnsOrig, EVENTS_RING_BYTES, FlowVerdict, LearnedKey,
    LearnedValue, Member, PolicyKeyV4, PolicyKeyV6, PolicyValue, RuleSet, SegmentInfo, UnixKey,
    UnixValue, capacity, map_names,
};
use aya::{Ebpf, maps::MapType};

#[derive(Debug, thiserror::Error)]
pub enum PinCheckError {
    #[error("{0} is a symlink")]
    Symlink(PathBuf),
    #[error("{0} is not a directory")]
    NotDir(PathBuf),
    #[error("{path} is owned by uid {uid}, not root")]
    Owner { path: PathBuf, uid: u32 },
    #[error(
        "{path} has mode {mode:o}: group and others must have no access (expected 0700 or 0600)"
    )]
    Mode { path: PathBuf, mode: u32 },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn meta(path: &Path) -> Result<Option<std::fs::Metadata>, PinCheckError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PinCheckError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

fn owned_by_root(path: &Path, m: &std::fs::Metadata) -> Result<(), PinCheckError> {
    if m.file_type().is_symlink() {
        return Err(PinCheckError::Symlink(path.to_owned()));
    }
    if m.uid() != 0 {
        return Err(PinCheckError::Owner {
            path: path.to_owned(),
            uid: m.uid(),
        });
    }
    let mode = m.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PinCheckError::Mode {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// A pin directory, if it exists, is a root-owned directory that only root can enter.
pub fn check_dir(path: &Path) -> Result<(), PinCheckError> {
    let Some(m) = meta(path)? else {
        return Ok(());
    };
    if m.file_type().is_symlink() {
        return Err(PinCheckError::Symlink(path.to_owned()));
    }
    if !m.is_dir() {
        return Err(PinCheckError::NotDir(path.to_owned()));
    }
    owned_by_root(path, &m)
}

/// A pinned object, if it exists, is not a symlink and is root's alone.
pub fn check_pin(path: &Path) -> Result<(), PinCheckError> {
    match meta(path)? {
        None => Ok(()),
        Some(m) => owned_by_root(path, &m),
    }
}

/// (map, type, key size, value size, capacity) as this build defines them.
fn expected() -> [(&'static str, MapType, usize, usize, u32); 15] {
    use std::mem::size_of;
    let lpm = |key: usize| 4 + key;
    [
        (
            map_names::MEMBERS,
            MapType::Hash,
            8,
            size_of::<Member>(),
            capacity::MEMBERS,
        ),
        (
            map_names::POLICY_V4,
            MapType::LpmTrie,
            lpm(size_of::<PolicyKeyV4>()),
            size_of::<PolicyValue>(),
            capacity::POLICY_V4,
        ),
        (
            map_names::POLICY_V6,
            MapType::LpmTrie,
            lpm(size_of::<PolicyKeyV6>()),
            size_of::<PolicyValue>(),
            capacity::POLICY_V6,
        ),
        (
            map_names::RULESETS,
            MapType::Array,
            4,
            size_of::<RuleSet>(),
            capacity::RULESETS,
        ),
        (
            map_names::SEGMENTS,
            MapType::Hash,
            4,
            size_of::<SegmentInfo>(),
            capacity::SEGMENTS,
        ),
        (
            map_names::COUNTERS,
            MapType::PerCpuHash,
            8,
            size_of::<Counters>(),
            capacity::COUNTERS,
        ),
        (
            map_names::STATS,
            MapType::PerCpuArray,
            4,
            8,
            capacity::STATS,
        ),
        (
            map_names::CONFIG,
            MapType::Array,
            4,
            size_of::<Config>(),
            capacity::CONFIG,
        ),
        (map_names::EVENTS, MapType::RingBuf, 0, 0, EVENTS_RING_BYTES),
        (
            map_names::RULE_HITS,
            MapType::PerCpuArray,
            4,
            size_of::<agentseg_common::RuleHitsChunk>(),
            capacity::RULE_HITS,
        ),
        (
            map_names::UNIX,
            MapType::LpmTrie,
            lpm(size_of::<UnixKey>()),
            size_of::<UnixValue>(),
            capacity::UNIX,
        ),
        (
            map_names::FLOWS,
            MapType::LruHash,
            8,
            size_of::<FlowVerdict>(),
            capacity::FLOWS,
        ),
        (
            map_names::LEARNED,
            MapType::Hash,
            size_of::<LearnedKey>(),
            size_of::<LearnedValue>(),
            capacity::LEARNED,
        ),
        (
            map_names::DNS_ORIG,
            MapType::LruHash,
            8,
            size_of::<DnsOrig>(),
            capacity::DNS_ORIG,
        ),
        (
            map_names::DENY_FLOWS,
            MapType::LruPerCpuHash,
            size_of::<DenyFlowKey>(),
            size_of::<DenyFlow>(),
            capacity::DENY_FLOWS,
        ),
    ]
}

/// Every map (created or adopted) has the shape this build expects: a pin of another shape
/// under our layout name is tampering or corruption, never something to write into.
pub fn check_maps(ebpf: &Ebpf) -> Result<(), String> {
    for (name, ty, key, value, max) in expected() {
        let map = ebpf
            .map(name)
            .ok_or_else(|| format!("map {name} is missing from the eBPF object"))?;
        let data = super::map_data(map).ok_or_else(|| format!("map {name}: unexpected kind"))?;
        let info = data.info().map_err(|e| format!("map {name}: {e}"))?;
        let got_ty = info.map_type().map_err(|e| format!("map {name}: {e}"))?;
        let got = (
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        if got_ty != ty || got != (key, value, max) {
            return Err(format!(
                "pinned map {name} is a {got_ty:?} with key {} B, value {} B, {} entries; this \
                 build expects a {ty:?} with key {key} B, value {value} B, {max} entries (remove \
                 the pins with `agentseg uninstall` once no agent depends on them)",
                got.0, got.1, got.2
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_and_loose_modes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("pins");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let uid = unsafe { libc::geteuid() };
        let e = check_dir(&root).unwrap_err().to_string();
        if uid == 0 {
            assert!(e.contains("mode 755"), "{e}");
        } else {
            assert!(e.contains("not root"), "{e}");
        }
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&root, &link).unwrap();
        assert!(matches!(check_dir(&link), Err(PinCheckError::Symlink(_))));
        assert!(matches!(check_pin(&link), Err(PinCheckError::Symlink(_))));
        assert!(check_dir(&dir.path().join("absent")).is_ok());
    }
}
