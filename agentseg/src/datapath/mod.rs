//! The only module that names aya: loads the kernel object, writes maps, attaches programs.
//!
//! Callers hand it compiled, validated state; it turns that into syscalls, map by map, with
//! policy written *before* any program is attached so no connection is judged half-configured.
mod bpffs;

use std::{
    collections::BTreeMap,
    fs::File,
    path::{Path, PathBuf},
};

use agentseg_common::{
    Counters, Member, PolicyKeyV4, PolicyKeyV6, PolicyValue, SEGMENT_PREFIX_BITS, STAT_COUNT,
    SegmentInfo, map_names, prog_names,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, PerCpuArray, PerCpuHashMap,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{CgroupAttachMode, CgroupSockAddr},
};
pub use bpffs::ensure_bpffs;

use crate::compile::Compiled;

/// The kernel object built by `build.rs` (empty when the eBPF build was skipped).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agentseg"));

const PROGRAMS: [&str; 4] = [
    prog_names::CONNECT4,
    prog_names::CONNECT6,
    prog_names::SENDMSG4,
    prog_names::SENDMSG6,
];

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this agentseg binary was built without its eBPF object (bpf-linker was missing); \
         rebuild with `cargo xtask build`"
    )]
    NoObject,
    #[error("loading the eBPF object")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("program {0} missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("opening cgroup {path}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bpffs: {0}")]
    Bpffs(String),
}

/// Map capacities, chosen from the compiled policy at load time.
#[derive(Debug, Clone, Copy)]
pub struct Capacities {
    pub policy_v4: u32,
    pub policy_v6: u32,
    pub rulesets: u32,
    pub members: u32,
}

impl Capacities {
    /// Room for the compiled policy plus growth (hot reload writes a second copy).
    pub fn for_policy(compiled: &Compiled) -> Self {
        let (mut v4, mut v6) = (0usize, 0usize);
        for s in &compiled.segments {
            v4 += s.egress_v4.len() + s.ingress_v4.len();
            v6 += s.egress_v6.len() + s.ingress_v6.len();
        }
        let room = |n: usize, min: u32| (n.saturating_mul(2) as u32).max(min);
        Self {
            policy_v4: room(v4, 1 << 16),
            policy_v6: room(v6, 1 << 16),
            rulesets: room(compiled.rulesets.len(), 4096),
            members: 1 << 16,
        }
    }
}

pub struct Datapath {
    ebpf: Ebpf,
    /// Attached cgroups (absolute paths) → the links of the four programs on it.
    attached: BTreeMap<
        PathBuf,
        Vec<(
            &'static str,
            aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId,
        )>,
    >,
}

macro_rules! map_mut {
    ($self:expr, $ty:ident, $name:expr) => {
        $ty::<&mut MapData, _, _>::try_from(
            $self
                .ebpf
                .map_mut($name)
                .ok_or(DatapathError::MissingMap($name))?,
        )
        .map_err(|source| DatapathError::Map {
            name: $name,
            source,
        })?
    };
}

impl Datapath {
    /// Load (not attach) the programs with maps sized by `caps`.
    pub fn load(caps: Capacities) -> Result<Self, DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map_names::POLICY_V4, caps.policy_v4)
            .map_max_entries(map_names::POLICY_V6, caps.policy_v6)
            .map_max_entries(map_names::RULESETS, caps.rulesets)
            .map_max_entries(map_names::MEMBERS, caps.members)
            .map_max_entries(map_names::COUNTERS, caps.members)
            .load(EBPF_OBJECT)?;
        for name in PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?
                .try_into()
                .map_err(|source| DatapathError::Program { name, source })?;
            prog.load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(Self {
            ebpf,
            attached: BTreeMap::new(),
        })
    }

    /// Instruction counts of the loaded programs (verifier blow-ups show up here first).
    pub fn program_sizes(&self) -> Vec<(&'static str, usize)> {
        PROGRAMS
            .iter()
            .filter_map(|&name| {
                let info = self.ebpf.program(name)?.info().ok()?;
                Some((name, info.size_translated().unwrap_or(0) as usize / 8))
            })
            .collect()
    }

    /// Write segments, rulesets and prefixes. Entries are only added or overwritten here.
    pub fn write_policy(&mut self, compiled: &Compiled) -> Result<(), DatapathError> {
        {
            let map = self
                .ebpf
                .map_mut(map_names::RULESETS)
                .ok_or(DatapathError::MissingMap(map_names::RULESETS))?;
            let mut rulesets: Array<&mut MapData, agentseg_common::RuleSet> = Array::try_from(map)
                .map_err(|source| DatapathError::Map {
                    name: map_names::RULESETS,
                    source,
                })?;
            for (id, rs) in compiled.rulesets.iter().enumerate() {
                rulesets
                    .set(id as u32, *rs, 0)
                    .map_err(|source| DatapathError::Map {
                        name: map_names::RULESETS,
                        source,
                    })?;
            }
        }
        {
            let mut v4: LpmTrie<&mut MapData, PolicyKeyV4, PolicyValue> =
                map_mut!(self, LpmTrie, map_names::POLICY_V4);
            for seg in &compiled.segments {
                let segment_id_be = seg.id.to_be_bytes();
                for (net, ruleset_id) in &seg.egress_v4 {
                    let key = Key::new(
                        SEGMENT_PREFIX_BITS + u32::from(net.prefix_len()),
                        PolicyKeyV4 {
                            segment_id_be,
                            addr_be: net.network().octets(),
                        },
                    );
                    v4.insert(
                        &key,
                        PolicyValue {
                            ruleset_id: *ruleset_id,
                        },
                        0,
                    )
                    .map_err(|source| DatapathError::Map {
                        name: map_names::POLICY_V4,
                        source,
                    })?;
                }
            }
        }
        {
            let mut v6: LpmTrie<&mut MapData, PolicyKeyV6, PolicyValue> =
                map_mut!(self, LpmTrie, map_names::POLICY_V6);
            for seg in &compiled.segments {
                let segment_id_be = seg.id.to_be_bytes();
                for (net, ruleset_id) in &seg.egress_v6 {
                    let key = Key::new(
                        SEGMENT_PREFIX_BITS + u32::from(net.prefix_len()),
                        PolicyKeyV6 {
                            segment_id_be,
                            addr_be: net.network().octets(),
                        },
                    );
                    v6.insert(
                        &key,
                        PolicyValue {
                            ruleset_id: *ruleset_id,
                        },
                        0,
                    )
                    .map_err(|source| DatapathError::Map {
                        name: map_names::POLICY_V6,
                        source,
                    })?;
                }
            }
        }
        let mut segments: HashMap<&mut MapData, u32, SegmentInfo> =
            map_mut!(self, HashMap, map_names::SEGMENTS);
        for seg in &compiled.segments {
            segments
                .insert(
                    seg.id,
                    SegmentInfo {
                        mode: seg.mode,
                        _pad: 0,
                    },
                    0,
                )
                .map_err(|source| DatapathError::Map {
                    name: map_names::SEGMENTS,
                    source,
                })?;
        }
        Ok(())
    }

    pub fn set_member(&mut self, cgroup_id: u64, member: Member) -> Result<(), DatapathError> {
        let mut members: HashMap<&mut MapData, u64, Member> =
            map_mut!(self, HashMap, map_names::MEMBERS);
        members
            .insert(cgroup_id, member, 0)
            .map_err(|source| DatapathError::Map {
                name: map_names::MEMBERS,
                source,
            })
    }

    pub fn remove_member(&mut self, cgroup_id: u64) -> Result<(), DatapathError> {
        let mut members: HashMap<&mut MapData, u64, Member> =
            map_mut!(self, HashMap, map_names::MEMBERS);
        match members.remove(&cgroup_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(source) => {
                return Err(DatapathError::Map {
                    name: map_names::MEMBERS,
                    source,
                });
            }
        }
        let mut counters: PerCpuHashMap<&mut MapData, u64, Counters> =
            map_mut!(self, PerCpuHashMap, map_names::COUNTERS);
        let _ = counters.remove(&cgroup_id);
        Ok(())
    }

    /// Attach all four programs to a cgroup directory (idempotent).
    pub fn attach(&mut self, cgroup_dir: &Path) -> Result<(), DatapathError> {
        if self.attached.contains_key(cgroup_dir) {
            return Ok(());
        }
        let file = File::open(cgroup_dir).map_err(|source| DatapathError::Cgroup {
            path: cgroup_dir.to_owned(),
            source,
        })?;
        let mut links = Vec::with_capacity(PROGRAMS.len());
        for name in PROGRAMS {
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?
                .try_into()
                .map_err(|source| DatapathError::Program { name, source })?;
            // aya attaches with bpf_link here (kernel >= 5.7): link attachments always coexist
            // with other programs on the cgroup (all must allow) and the kernel refuses any
            // flag with them, so the mode is the default.
            let link = prog
                .attach(&file, CgroupAttachMode::Single)
                .map_err(|source| DatapathError::Program { name, source })?;
            links.push((name, link));
        }
        self.attached.insert(cgroup_dir.to_owned(), links);
        Ok(())
    }

    /// Detach from a cgroup (a no-op when not attached).
    pub fn detach(&mut self, cgroup_dir: &Path) -> Result<(), DatapathError> {
        let Some(links) = self.attached.remove(cgroup_dir) else {
            return Ok(());
        };
        for (name, link) in links {
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?
                .try_into()
                .map_err(|source| DatapathError::Program { name, source })?;
            prog.detach(link)
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(())
    }

    pub fn attached(&self) -> impl Iterator<Item = &Path> {
        self.attached.keys().map(PathBuf::as_path)
    }

    /// Decision counters of one member cgroup, summed over CPUs.
    pub fn counters(&self, cgroup_id: u64) -> Counters {
        let Some(map) = self.ebpf.map(map_names::COUNTERS) else {
            return Counters::default();
        };
        let Ok(counters) = PerCpuHashMap::<&MapData, u64, Counters>::try_from(map) else {
            return Counters::default();
        };
        let mut sum = Counters::default();
        if let Ok(values) = counters.get(&cgroup_id, 0) {
            for c in values.iter() {
                sum.allowed += c.allowed;
                sum.denied += c.denied;
                sum.audit_denied += c.audit_denied;
            }
        }
        sum
    }

    /// Fail-closed statistics (`STAT_*`), summed over CPUs.
    pub fn stats(&self) -> [u64; STAT_COUNT as usize] {
        let mut out = [0u64; STAT_COUNT as usize];
        let Some(map) = self.ebpf.map(map_names::STATS) else {
            return out;
        };
        let Ok(stats) = PerCpuArray::<&MapData, u64>::try_from(map) else {
            return out;
        };
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = stats.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }
}

/// Raise RLIMIT_MEMLOCK for kernels that still charge BPF memory to it (before 5.11).
pub fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid pointer to a stack value.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        tracing::debug!("setrlimit(RLIMIT_MEMLOCK) failed; fine on kernels with memcg accounting");
    }
}
