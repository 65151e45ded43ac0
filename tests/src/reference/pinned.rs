//! The kernel's side: a daemon's pinned policy maps, opened read-only, and the lookup the
//! hooks make (longest prefix with a full-length key, a mapped address in the IPv4 trie, then
//! `agentseg_common::ruleset_allows` on the ruleset).
use std::{
    collections::HashMap,
    net::IpAddr,
    os::fd::{FromRawFd as _, OwnedFd},
    path::Path,
};

use agentseg_common::{
    Config, GEN_BIT, PIN_LAYOUT, PolicyKeyV4, PolicyKeyV6, PolicyValue, RULE_DEFAULT_DENY,
    RULES_PER_GEN, RULESETS_PER_GEN, RuleSet, SegmentInfo, map_names, ruleset_allows,
};
use aya::maps::{
    Array, HashMap as BpfHashMap, MapData, MapError, lpm_trie::Key, lpm_trie::LpmTrie,
};

use super::judged_as;

/// What the kernel holds for a daemon, through read-only descriptors on its pinned maps.
pub struct Pinned {
    v4: LpmTrie<MapData, PolicyKeyV4, PolicyValue>,
    v6: LpmTrie<MapData, PolicyKeyV6, PolicyValue>,
    rulesets: Array<MapData, RuleSet>,
    segments: BpfHashMap<MapData, u32, SegmentInfo>,
    config: Array<MapData, Config>,
    cache: HashMap<u32, RuleSet>,
}

/// `BPF_OBJ_GET` with `BPF_F_RDONLY`: this test can read the daemon's maps, never write them.
fn open_read_only(path: &Path) -> MapData {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_F_RDONLY: u32 = 1 << 3;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("pin path");
    let mut attr = [0u8; 128];
    // obj: pathname (u64) at 0, bpf_fd at 8, file_flags at 12.
    attr[0..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    attr[12..16].copy_from_slice(&BPF_F_RDONLY.to_ne_bytes());
    // SAFETY: attr and the path outlive the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, attr.as_mut_ptr(), attr.len()) };
    assert!(
        fd >= 0,
        "opening {} read-only: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: a descriptor the kernel just gave us, owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    MapData::from_fd(fd).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn typed<M: TryFrom<aya::maps::Map, Error = MapError>>(dir: &Path, name: &str) -> M {
    let map = aya::maps::Map::from_map_data(open_read_only(&dir.join(name)))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    M::try_from(map).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The verdict the kernel's lookup gives one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelVerdict {
    /// The ruleset the longest prefix pointed at (None: no prefix matched).
    pub ruleset: Option<u32>,
    /// The rule that allows, or `RULE_DEFAULT_DENY`.
    pub rule: u32,
}

impl KernelVerdict {
    pub fn allows(&self) -> bool {
        self.rule != RULE_DEFAULT_DENY
    }
}

impl Pinned {
    pub fn open(pin_root: &Path) -> Self {
        let dir = pin_root.join(PIN_LAYOUT).join("maps");
        Self {
            v4: typed(&dir, map_names::POLICY_V4),
            v6: typed(&dir, map_names::POLICY_V6),
            rulesets: typed(&dir, map_names::RULESETS),
            segments: typed(&dir, map_names::SEGMENTS),
            config: typed(&dir, map_names::CONFIG),
            cache: HashMap::new(),
        }
    }

    pub fn active_gen(&self) -> u32 {
        self.config.get(&0, 0).expect("AS_CONFIG[0]").active_gen & 1
    }

    /// Live segment ids by name (the generation bit says which half is live).
    pub fn live_segments(&self) -> HashMap<String, u32> {
        self.segments_in(self.active_gen())
    }

    /// Segment ids by name of one generation.
    pub fn segments_in(&self, generation: u32) -> HashMap<String, u32> {
        let live = generation & 1;
        self.segments
            .iter()
            .map(|e| e.expect("AS_SEGMENTS entry"))
            .filter(|(id, _)| u32::from(id & GEN_BIT != 0) == live)
            .map(|(id, info)| {
                let end = info
                    .name
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap_or(info.name.len());
                (String::from_utf8_lossy(&info.name[..end]).into_owned(), id)
            })
            .collect()
    }

    /// Segment ids (table bits cleared) of every LPM entry in both tries.
    pub fn entry_segments(&self) -> Vec<u32> {
        let v4 = self
            .v4
            .keys()
            .map(|k| k.expect("v4 key").data().segment_id_be);
        let v6 = self
            .v6
            .keys()
            .map(|k| k.expect("v6 key").data().segment_id_be);
        v4.chain(v6).map(u32::from_be_bytes).collect()
    }

    fn ruleset(&mut self, id: u32) -> RuleSet {
        if let Some(rs) = self.cache.get(&id) {
            return *rs;
        }
        let rs = self.rulesets.get(&id, 0).expect("AS_RULESETS entry");
        self.cache.insert(id, rs);
        rs
    }

    /// Forget cached rulesets (after a policy switch).
    pub fn forget(&mut self) {
        self.cache.clear();
    }

    /// The ruleset the longest prefix of `addr` points at in table `table_id` (a live segment
    /// id, with `INGRESS_BIT` or `QUARANTINE_BIT` for those tables), the way the hooks look it
    /// up (a mapped address in the IPv4 trie, full-length key).
    pub fn lookup(&self, table_id: u32, addr: IpAddr) -> Option<u32> {
        let seg = table_id.to_be_bytes();
        let found = match judged_as(addr) {
            IpAddr::V4(a) => self.v4.get(
                &Key::new(
                    64,
                    PolicyKeyV4 {
                        segment_id_be: seg,
                        addr_be: a.octets(),
                    },
                ),
                0,
            ),
            IpAddr::V6(a) => self.v6.get(
                &Key::new(
                    160,
                    PolicyKeyV6 {
                        segment_id_be: seg,
                        addr_be: a.octets(),
                    },
                ),
                0,
            ),
        };
        match found {
            Ok(v) => Some(v.ruleset_id),
            Err(MapError::KeyNotFound) => None,
            Err(e) => panic!("LPM lookup of {addr} in table {table_id:#x}: {e}"),
        }
    }

    /// The kernel's verdict for (protocol, port) on a ruleset found by [`Self::lookup`].
    pub fn verdict(&mut self, ruleset: Option<u32>, protocol: u32, port: u16) -> KernelVerdict {
        let rule = match ruleset {
            None => RULE_DEFAULT_DENY,
            Some(id) => ruleset_allows(&self.ruleset(id), protocol, port),
        };
        KernelVerdict { ruleset, rule }
    }

    /// The entries of a ruleset, for reports.
    pub fn describe(&mut self, id: u32) -> String {
        let rs = self.ruleset(id);
        let rules = &rs.rules[..(rs.len as usize).min(rs.rules.len())];
        format!("ruleset {id}: {rules:?}")
    }
}

/// Whether a ruleset id and a rule id belong to generation `generation`'s halves.
pub fn in_generation(generation: u32, v: &KernelVerdict) -> bool {
    let rs_ok = v
        .ruleset
        .is_none_or(|id| id / RULESETS_PER_GEN == generation);
    let rule_ok = !v.allows() || v.rule / RULES_PER_GEN == generation;
    rs_ok && rule_ok
}
