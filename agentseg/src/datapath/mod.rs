//! The only module that names aya: loads the kernel objects with every map pinned (adopting
//! pins left by an earlier daemon), writes policy generations, attaches, pins and watches links.
//!
//! Layout under the pin root (default `/sys/fs/bpf/agentseg`, root-only 0700, checked before
//! anything is adopted): `<PIN_LAYOUT>/maps/<MAP>` and `<PIN_LAYOUT>/links/<cgroup id>_<program>`,
//! where `PIN_LAYOUT` is derived from the shared struct definitions. Pins outlive the daemon: a
//! crash or a restart never opens a gap; `agentseg uninstall` removes them.
mod bpffs;
mod generation;
mod learned;
mod links;
mod pins;
mod ring;
mod sys;
mod unix_loader;

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use agentseg_common::{
    Config, Counters, DenyFlow, DenyFlowKey, Member, PIN_LAYOUT, RULE_HITS_CHUNK, RULES_PER_GEN,
    RuleHitsChunk, STAT_COUNT, map_names, prog_names,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as AyaHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{CgroupSkb, CgroupSockAddr, CgroupSockopt},
};
pub use bpffs::ensure_bpffs;
pub use generation::{
    SegmentEntry, WriteStats, generation_of, segment_id as generation_segment_id,
};
pub use links::{LinkAlarm, UninstallReport, caller_is_member, pin_root_holders, uninstall};
pub use pins::PinCheckError;
pub use ring::{EventRing, KernelRecord, read_ring};

/// The main kernel object built by `build.rs` (empty when the eBPF build was skipped).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agentseg"));

/// SHA-256 of the embedded kernel objects: which build wrote a pinned generation.
pub fn objects_digest() -> [u8; 32] {
    static DIGEST: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    *DIGEST.get_or_init(|| {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update((EBPF_OBJECT.len() as u64).to_le_bytes());
        h.update(EBPF_OBJECT);
        h.update(unix_loader::UNIX_OBJECT);
        h.finalize().into()
    })
}

/// Programs attached to every member cgroup and to the agent root: the packet hooks, which
/// judge by the packet's socket.
pub const MEMBER_PROGRAMS: [&str; 2] = [prog_names::SKB_EGRESS, prog_names::SKB_INGRESS];

/// Programs attached once, at the enforcement root: they judge the calling task (or, for the
/// handoff hook, sockets whose cgroup is not a member's), so a socket made anywhere and used
/// by a member is judged, and a member cgroup is judged from its first instant.
pub const ROOT_PROGRAMS: [&str; 12] = [
    prog_names::CONNECT4,
    prog_names::CONNECT6,
    prog_names::SENDMSG4,
    prog_names::SENDMSG6,
    prog_names::RECVMSG4,
    prog_names::RECVMSG6,
    prog_names::GETPEERNAME4,
    prog_names::GETPEERNAME6,
    prog_names::SETSOCKOPT,
    prog_names::SKB_HANDOFF,
    prog_names::CONNECT_UNIX,
    prog_names::SENDMSG_UNIX,
];

/// Every program, for pin-name parsing and `program_sizes`.
fn all_programs() -> impl Iterator<Item = &'static str> {
    MEMBER_PROGRAMS.into_iter().chain(ROOT_PROGRAMS)
}

/// The kernel's `enum bpf_attach_type` value each program is attached with.
fn attach_type(name: &str) -> u32 {
    match name {
        prog_names::SKB_INGRESS => 0,
        prog_names::SKB_EGRESS | prog_names::SKB_HANDOFF => 1,
        prog_names::CONNECT4 => 10,
        prog_names::CONNECT6 => 11,
        prog_names::SENDMSG4 => 14,
        prog_names::SENDMSG6 => 15,
        prog_names::RECVMSG4 => 19,
        prog_names::RECVMSG6 => 20,
        prog_names::GETPEERNAME4 => 29,
        prog_names::GETPEERNAME6 => 30,
        prog_names::SETSOCKOPT => 22,
        prog_names::CONNECT_UNIX => unix_loader::BPF_CGROUP_UNIX_CONNECT,
        prog_names::SENDMSG_UNIX => unix_loader::BPF_CGROUP_UNIX_SENDMSG,
        _ => u32::MAX,
    }
}

/// Default pin root.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/agentseg";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this agentseg binary was built without its eBPF objects (bpf-linker was missing); \
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
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bpffs: {0}")]
    Bpffs(String),
    #[error("{0}")]
    Capacity(String),
    #[error("refusing to adopt the pins under {root}: {reason}")]
    Adopt { root: PathBuf, reason: String },
    #[error("AF_UNIX hooks: {0}")]
    Unix(String),
}

/// Where this daemon's pins live.
#[derive(Debug, Clone)]
pub struct PinDirs {
    pub root: PathBuf,
    pub layout: PathBuf,
    pub maps: PathBuf,
    pub links: PathBuf,
    /// `progs/<build>/<program>`: the verified programs, reused by a restart of the same build
    /// on the same maps (verification is most of a start).
    pub progs: PathBuf,
}

impl PinDirs {
    pub fn new(root: &Path) -> Self {
        let layout = root.join(PIN_LAYOUT);
        Self {
            root: root.to_owned(),
            maps: layout.join("maps"),
            links: layout.join("links"),
            progs: layout.join("progs"),
            layout,
        }
    }

    /// Create the directories root-only (bpffs permissions are the only gate on a pin), after
    /// checking that whatever exists already is ours: root-owned, 0700, no symlinks.
    fn create(&self) -> Result<(), DatapathError> {
        for dir in [
            &self.root,
            &self.layout,
            &self.maps,
            &self.links,
            &self.progs,
        ] {
            pins::check_dir(dir).map_err(|e| DatapathError::Adopt {
                root: self.root.clone(),
                reason: e.to_string(),
            })?;
            if !dir.exists() {
                fs::create_dir(dir).map_err(|source| DatapathError::Io {
                    what: "creating",
                    path: dir.clone(),
                    source,
                })?;
            }
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
                DatapathError::Io {
                    what: "chmod 0700",
                    path: dir.clone(),
                    source,
                }
            })?;
        }
        Ok(())
    }
}

pub struct Datapath {
    ebpf: Ebpf,
    pins: PinDirs,
    /// Whether the maps existed before this daemon (state adopted from a predecessor).
    adopted: bool,
    /// Whether every map existed before this daemon (none was created empty).
    complete: bool,
    /// Whether no map existed before this daemon (every one was created empty).
    fresh: bool,
    /// The AF_UNIX programs (loaded by the raw loader, not by aya).
    unix_programs: Vec<(&'static str, OwnedFd)>,
    /// Every program, when a predecessor of the same build pinned them on these maps (then
    /// nothing was loaded or verified).
    pinned_programs: Vec<(&'static str, OwnedFd)>,
    /// Every link this daemon holds, by (cgroup id, program): kept open so that a removed pin
    /// does not detach it, and checked every tick.
    links: BTreeMap<(u64, &'static str), links::HeldLink>,
    /// The event ring's descriptor once the reader took the map out of `ebpf`.
    events_fd: Option<OwnedFd>,
}

macro_rules! map_mut {
    ($self:expr, $ty:ident, $name:expr) => {
        $ty::try_from(
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
macro_rules! map_ref {
    ($self:expr, $ty:ident, $name:expr) => {
        $ty::try_from(
            $self
                .ebpf
                .map($name)
                .ok_or(DatapathError::MissingMap($name))?,
        )
        .map_err(|source| DatapathError::Map {
            name: $name,
            source,
        })?
    };
}
pub(crate) use {map_mut, map_ref};

impl Datapath {
    /// Load the programs; every map is opened from its pin when one exists (adoption, after
    /// checking the pin tree and each adopted map's shape) and created and pinned otherwise.
    pub fn open(pin_root: &Path) -> Result<Self, DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        let pins = PinDirs::new(pin_root);
        pins.create()?;
        let adopted = pins.maps.join(map_names::CONFIG).exists();
        let refuse = |reason: String| DatapathError::Adopt {
            root: pin_root.to_owned(),
            reason,
        };
        let paths: Vec<(&str, PathBuf)> = map_names::ALL
            .iter()
            .map(|&name| (name, pins.maps.join(name)))
            .collect();
        // Every map a predecessor pinned is still there (none will be created empty): only
        // then may its programs and its live generation be taken as they are.
        let existing = paths.iter().filter(|(_, path)| path.exists()).count();
        let (complete, fresh) = (existing == paths.len(), existing == 0);
        for (_, path) in &paths {
            pins::check_pin(path).map_err(|e| refuse(e.to_string()))?;
        }
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let started = std::time::Instant::now();
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            "object parsed and maps opened"
        );
        pins::check_maps(&ebpf).map_err(refuse)?;
        let map_fds: HashMap<String, std::os::fd::RawFd> = ebpf
            .maps()
            .filter_map(|(name, map)| {
                Some((name.to_owned(), map_data(map)?.fd().as_fd().as_raw_fd()))
            })
            .collect();
        let build = programs_build_dir(&pins);
        let reused = if complete {
            adopt_programs(&build, &ebpf)
        } else {
            None
        };
        let (unix_programs, pinned_programs) = match reused {
            Some(pinned) => {
                tracing::info!(
                    dir = %build.display(),
                    "reusing the programs this build verified and pinned on these maps"
                );
                (Vec::new(), pinned)
            }
            None => (load_all(&mut ebpf, &map_fds)?, Vec::new()),
        };
        for (_, path) in &paths {
            let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o600));
        }
        let loaded_here = pinned_programs.is_empty();
        let mut dp = Self {
            ebpf,
            pins,
            adopted,
            complete,
            fresh,
            unix_programs,
            pinned_programs,
            links: BTreeMap::new(),
            events_fd: None,
        };
        if loaded_here {
            dp.pin_programs(&build);
        }
        Ok(dp)
    }

    /// Pin every program under `build` (and drop other builds' pins) for the next restart.
    /// A failure only costs that restart a verification.
    fn pin_programs(&mut self, build: &Path) {
        let progs = self.pins.progs.clone();
        if let Ok(entries) = fs::read_dir(&progs) {
            for e in entries.filter_map(Result::ok) {
                let _ = remove_program_dir(&e.path());
            }
        }
        let result = (|| -> Result<(), String> {
            fs::create_dir(build).map_err(|e| format!("{}: {e}", build.display()))?;
            fs::set_permissions(build, fs::Permissions::from_mode(0o700))
                .map_err(|e| format!("{}: {e}", build.display()))?;
            for name in all_programs() {
                let path = build.join(name);
                let fd = self.prog_fd(name).map_err(|e| e.to_string())?;
                sys::obj_pin(fd, &path).map_err(|e| format!("{}: {e}", path.display()))?;
                let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o600));
            }
            Ok(())
        })();
        if let Err(e) = result {
            tracing::warn!("pinning the programs for the next restart: {e}");
            let _ = remove_program_dir(build);
        }
    }

    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Every map was created empty by this daemon: both policy generations hold nothing.
    pub fn fresh(&self) -> bool {
        self.fresh
    }

    /// Every pinned map was adopted, none created empty: what a predecessor left is whole.
    pub fn adopted_whole(&self) -> bool {
        self.complete
    }

    pub fn pin_dirs(&self) -> &PinDirs {
        &self.pins
    }

    /// The descriptor of a loaded program.
    fn prog_fd(&mut self, name: &'static str) -> Result<BorrowedFd<'_>, DatapathError> {
        if let Some((_, fd)) = self
            .pinned_programs
            .iter()
            .chain(&self.unix_programs)
            .find(|(n, _)| *n == name)
        {
            return Ok(fd.as_fd());
        }
        let err = |source| DatapathError::Program { name, source };
        Ok(match program(&mut self.ebpf, name)? {
            Prog::SockAddr(p) => p.fd().map_err(err)?.as_fd(),
            Prog::Skb(p) => p.fd().map_err(err)?.as_fd(),
            Prog::Sockopt(p) => p.fd().map_err(err)?.as_fd(),
        })
    }

    /// Instruction counts of the aya-loaded programs (verifier blow-ups show up here first).
    /// (program, instructions, instructions the verifier walked to accept it): the second
    /// is the one with a budget (a million) and the load time.
    pub fn program_sizes(&self) -> Vec<(&'static str, usize, u32)> {
        let build = programs_build_dir(&self.pins);
        all_programs()
            .filter_map(|name| {
                let info = match self.ebpf.program(name).and_then(|p| p.info().ok()) {
                    Some(info) => info,
                    None => aya::programs::ProgramInfo::from_pin(build.join(name)).ok()?,
                };
                Some((
                    name,
                    info.size_translated().unwrap_or(0) as usize / 8,
                    info.verified_instruction_count().unwrap_or(0),
                ))
            })
            .collect()
    }

    pub fn config(&self) -> Result<Config, DatapathError> {
        let config: Array<&MapData, Config> = map_ref!(self, Array, map_names::CONFIG);
        config.get(&0, 0).map_err(|source| DatapathError::Map {
            name: map_names::CONFIG,
            source,
        })
    }

    pub fn set_config(&mut self, value: Config) -> Result<(), DatapathError> {
        let mut config: Array<&mut MapData, Config> = map_mut!(self, Array, map_names::CONFIG);
        config
            .set(0, value, 0)
            .map_err(|source| DatapathError::Map {
                name: map_names::CONFIG,
                source,
            })
    }

    /// Every membership entry the kernel holds.
    pub fn members(&self) -> Result<Vec<(u64, Member)>, DatapathError> {
        let members: AyaHashMap<&MapData, u64, Member> =
            map_ref!(self, AyaHashMap, map_names::MEMBERS);
        members
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| DatapathError::Map {
                name: map_names::MEMBERS,
                source,
            })
    }

    pub fn member(&self, cgroup_id: u64) -> Option<Member> {
        let map = self.ebpf.map(map_names::MEMBERS)?;
        let members = AyaHashMap::<&MapData, u64, Member>::try_from(map).ok()?;
        members.get(&cgroup_id, 0).ok()
    }

    pub fn set_member(&mut self, cgroup_id: u64, member: Member) -> Result<(), DatapathError> {
        let mut members: AyaHashMap<&mut MapData, u64, Member> =
            map_mut!(self, AyaHashMap, map_names::MEMBERS);
        members
            .insert(cgroup_id, member, 0)
            .map_err(|source| DatapathError::Map {
                name: map_names::MEMBERS,
                source,
            })
    }

    pub fn remove_member(&mut self, cgroup_id: u64) -> Result<(), DatapathError> {
        let mut members: AyaHashMap<&mut MapData, u64, Member> =
            map_mut!(self, AyaHashMap, map_names::MEMBERS);
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
                sum.add(c);
            }
        }
        sum
    }

    /// Every refused flow the kernel is aggregating, per CPU (only CPUs where it was seen):
    /// `(key, cpu, value)`. One batched read of the whole map.
    pub fn deny_flows(&self) -> Result<Vec<(DenyFlowKey, u32, DenyFlow)>, DatapathError> {
        let name = map_names::DENY_FLOWS;
        // Slot i of a per-CPU value is the i-th possible CPU (records carry the CPU id; the two
        // differ when the list has holes).
        let possible = possible_cpus(name)?;
        let cpus = possible.len();
        let (key_size, slot) = (
            size_of::<DenyFlowKey>(),
            size_of::<DenyFlow>().next_multiple_of(8),
        );
        let mut out = Vec::new();
        self.read_all(name, key_size, slot * cpus, |k, v| {
            // SAFETY: the kernel wrote a DenyFlowKey (repr(C), integers) of exactly this size.
            let key = unsafe { std::ptr::read_unaligned(k.as_ptr().cast::<DenyFlowKey>()) };
            for (i, bytes) in v.chunks_exact(slot).enumerate() {
                // SAFETY: as above, one DenyFlow per CPU slot.
                let f = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DenyFlow>()) };
                if f.count > 0 {
                    out.push((key, possible[i], f));
                }
            }
        })?;
        Ok(out)
    }

    /// Every member's decision counters, summed over CPUs, in one batched read of the map
    /// (the tick reads them all: one syscall per member would not scale).
    pub fn all_counters(&self) -> Result<HashMap<u64, Counters>, DatapathError> {
        let name = map_names::COUNTERS;
        let cpus = possible_cpus(name)?.len();
        let slot = size_of::<Counters>().next_multiple_of(8);
        let mut out = HashMap::new();
        self.read_all(name, 8, slot * cpus, |k, v| {
            let mut sum = Counters::default();
            for bytes in v.chunks_exact(slot) {
                // SAFETY: the kernel wrote one Counters (repr(C), integers) per CPU slot.
                sum.add(&unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Counters>()) });
            }
            let mut key = [0u8; 8];
            key.copy_from_slice(k);
            out.insert(u64::from_ne_bytes(key), sum);
        })?;
        Ok(out)
    }

    /// Every entry of hash map `name` (packed key, value), in batched reads of 256.
    fn read_all(
        &self,
        name: &'static str,
        key_size: usize,
        value_size: usize,
        each: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), DatapathError> {
        let fd = self
            .ebpf
            .map(name)
            .and_then(map_data)
            .ok_or(DatapathError::MissingMap(name))?
            .fd()
            .as_fd();
        sys::lookup_all(fd, key_size, value_size, 256, each).map_err(|source| DatapathError::Map {
            name,
            source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_lookup_batch",
                io_error: source,
            }),
        })
    }

    /// Allows decided by each rule of `generation`, summed over CPUs (index = compiled rule id).
    pub fn rule_hits(&self, generation: u32, rules: usize) -> Vec<u64> {
        let mut out = vec![0u64; rules];
        let Some(map) = self.ebpf.map(map_names::RULE_HITS) else {
            return out;
        };
        let Ok(hits) = PerCpuArray::<&MapData, RuleHitsChunk>::try_from(map) else {
            return out;
        };
        for (n, part) in out.chunks_mut(RULE_HITS_CHUNK as usize).enumerate() {
            let Ok(values) = hits.get(&rule_hits_key(generation, n), 0) else {
                continue;
            };
            for cpu in values.iter() {
                for (slot, v) in part.iter_mut().zip(cpu.iter()) {
                    *slot += v;
                }
            }
        }
        out
    }

    /// Zero the hit counters of a generation's first `rules` rules (before it is written anew).
    pub fn clear_rule_hits(&mut self, generation: u32, rules: usize) -> Result<(), DatapathError> {
        let nr_cpus =
            aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Bpffs(format!("nr_cpus: {e}")))?;
        let mut hits: PerCpuArray<&mut MapData, RuleHitsChunk> =
            map_mut!(self, PerCpuArray, map_names::RULE_HITS);
        let chunks = rules
            .min(RULES_PER_GEN as usize)
            .div_ceil(RULE_HITS_CHUNK as usize);
        for n in 0..chunks {
            let zero =
                aya::maps::PerCpuValues::try_from(vec![[0u64; RULE_HITS_CHUNK as usize]; nr_cpus])
                    .map_err(|e| DatapathError::Capacity(format!("per-CPU values: {e}")))?;
            hits.set(rule_hits_key(generation, n), zero, 0)
                .map_err(|source| DatapathError::Map {
                    name: map_names::RULE_HITS,
                    source,
                })?;
        }
        Ok(())
    }

    /// Take the event ring buffer out, for the async reader ([`read_ring`]).
    pub fn take_events(&mut self) -> Result<EventRing, DatapathError> {
        // A copy of its descriptor stays here, to pin it again if its pin is removed.
        self.events_fd = self
            .ebpf
            .map(map_names::EVENTS)
            .and_then(map_data)
            .and_then(|d| d.fd().as_fd().try_clone_to_owned().ok());
        let map = self
            .ebpf
            .take_map(map_names::EVENTS)
            .ok_or(DatapathError::MissingMap(map_names::EVENTS))?;
        RingBuf::try_from(map)
            .map(EventRing)
            .map_err(|source| DatapathError::Map {
                name: map_names::EVENTS,
                source,
            })
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

/// The first 16 hex digits of the build's objects digest: names this build's pinned programs
/// (`progs/<id>`) and labels `agentseg_build_info`.
pub fn build_id() -> String {
    hex::encode(&objects_digest()[..8])
}

fn programs_build_dir(pins: &PinDirs) -> PathBuf {
    pins.progs.join(build_id())
}

/// Every program pinned under `build`, if each is root's, not a symlink, and uses only maps
/// this daemon holds (a program loaded against maps since replaced would enforce from stale
/// state): then they are this build's programs on these maps, already verified.
fn adopt_programs(build: &Path, ebpf: &Ebpf) -> Option<Vec<(&'static str, OwnedFd)>> {
    pins::check_dir(build).ok()?;
    if !build.is_dir() {
        return None;
    }
    let ours: std::collections::HashSet<u32> = ebpf
        .maps()
        .filter_map(|(_, m)| Some(map_data(m)?.info().ok()?.id()))
        .collect();
    let mut out = Vec::new();
    for name in all_programs() {
        let path = build.join(name);
        let reason = (|| -> Result<OwnedFd, String> {
            pins::check_pin(&path).map_err(|e| e.to_string())?;
            let info = aya::programs::ProgramInfo::from_pin(&path).map_err(|e| e.to_string())?;
            let ids = info
                .map_ids()
                .map_err(|e| e.to_string())?
                .unwrap_or_default();
            // Maps it uses besides ours may only be unpinned ones (per-CPU scratch, global
            // data): a map named like a pinned one is a replaced map, i.e. stale state.
            for id in ids.iter().filter(|id| !ours.contains(id)) {
                let info = aya::maps::MapInfo::from_id(*id).map_err(|e| e.to_string())?;
                let name = info.name();
                if map_names::ALL
                    .iter()
                    .any(|n| n.as_bytes().get(..name.len()) == Some(name) && !name.is_empty())
                {
                    return Err(format!(
                        "uses map {id} ({}), not the pinned one",
                        String::from_utf8_lossy(name)
                    ));
                }
            }
            sys::obj_get(&path).map_err(|e| e.to_string())
        })();
        match reason {
            Ok(fd) => out.push((name, fd)),
            Err(e) => {
                tracing::info!(program = %path.display(), "pinned program not reused, loading all: {e}");
                return None;
            }
        }
    }
    Some(out)
}

/// Remove a `progs/<build>` directory and its program pins (all it can; the first error).
pub(super) fn remove_program_dir(dir: &Path) -> std::io::Result<()> {
    let mut first = Ok(());
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            if let Err(err) = fs::remove_file(e.path()) {
                first = first.and(Err(err));
            }
        }
    }
    first.and(fs::remove_dir(dir))
}

/// One of our programs, by kind.
enum Prog<'a> {
    SockAddr(&'a mut CgroupSockAddr),
    Skb(&'a mut CgroupSkb),
    Sockopt(&'a mut CgroupSockopt),
}

/// Verification order, heaviest first (the debug log's `verified` times at 100k rules, the
/// AF_UNIX pair ~90 ms each, the packet hooks 45-90, the sock_addr hooks 30-60): a queue that
/// hands out the longest jobs first leaves no core idle at the end. Unlisted programs (the
/// trivial recvmsg/getpeername hooks) come last.
const LOAD_ORDER: [&str; 10] = [
    prog_names::SKB_HANDOFF,
    prog_names::CONNECT_UNIX,
    prog_names::SENDMSG_UNIX,
    prog_names::SKB_INGRESS,
    prog_names::SKB_EGRESS,
    prog_names::CONNECT4,
    prog_names::CONNECT6,
    prog_names::SENDMSG4,
    prog_names::SENDMSG6,
    prog_names::SETSOCKOPT,
];

/// One program to load (verify).
enum Load<'a> {
    Main(&'static str, &'a mut aya::programs::Program),
    Unix(&'a unix_loader::UnixProgram),
}

impl Load<'_> {
    fn name(&self) -> &'static str {
        match self {
            Load::Main(name, _) => name,
            Load::Unix(p) => p.name,
        }
    }
}

/// Load (verify) every program, the main object's and the AF_UNIX pair, on as many threads as
/// there are CPUs, each taking the heaviest program left: the kernel verifies loads in
/// parallel, and verification is most of a cold start. Returns the AF_UNIX programs' fds (aya
/// holds the others). On the first error the queue is emptied and that error returned.
fn load_all(
    ebpf: &mut Ebpf,
    map_fds: &HashMap<String, std::os::fd::RawFd>,
) -> Result<Vec<(&'static str, OwnedFd)>, DatapathError> {
    let unix = unix_loader::prepare(map_fds)?;
    let mut jobs: Vec<Load> = ebpf
        .programs_mut()
        .filter_map(|(name, prog)| {
            let name = all_programs().find(|n| *n == name && !is_unix(n))?;
            Some(Load::Main(name, prog))
        })
        .chain(unix.iter().map(Load::Unix))
        .collect();
    // Popped from the end: the heaviest last in the vector.
    jobs.sort_by_key(|j| {
        std::cmp::Reverse(
            LOAD_ORDER
                .iter()
                .position(|n| *n == j.name())
                .unwrap_or(LOAD_ORDER.len()),
        )
    });
    let queue = std::sync::Mutex::new(jobs);
    let unix_fds = std::sync::Mutex::new(Vec::new());
    let work = || -> Result<(), DatapathError> {
        loop {
            let job = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some(job) = job else {
                return Ok(());
            };
            let name = job.name();
            let started = std::time::Instant::now();
            let loaded = match job {
                Load::Main(name, prog) => load_one(name, prog),
                Load::Unix(p) => p.load().map(|fd| {
                    unix_fds
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((p.name, fd));
                }),
            };
            if let Err(e) = loaded {
                queue.lock().unwrap_or_else(|e| e.into_inner()).clear();
                return Err(e);
            }
            // The verifier's time: a program that grows past its budget shows here first.
            tracing::debug!(
                program = name,
                ms = started.elapsed().as_millis() as u64,
                "verified"
            );
        }
    };
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
    std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads).map(|_| scope.spawn(work)).collect();
        let mut result = work();
        for h in helpers {
            let joined = h.join().unwrap_or_else(|_| {
                Err(DatapathError::Unix(
                    "a program loader thread panicked".to_owned(),
                ))
            });
            result = result.and(joined);
        }
        result
    })?;
    Ok(unix_fds.into_inner().unwrap_or_else(|e| e.into_inner()))
}

fn load_one(name: &'static str, prog: &mut aya::programs::Program) -> Result<(), DatapathError> {
    let result = match typed(name, prog)? {
        Prog::SockAddr(p) => p.load(),
        Prog::Skb(p) => p.load(),
        Prog::Sockopt(p) => p.load(),
    };
    result.map_err(|source| DatapathError::Program { name, source })
}

fn is_unix(name: &str) -> bool {
    name == prog_names::CONNECT_UNIX || name == prog_names::SENDMSG_UNIX
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<Prog<'a>, DatapathError> {
    let prog = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?;
    typed(name, prog)
}

/// A program of the main object as its kind, known by its name.
fn typed<'a>(
    name: &'static str,
    prog: &'a mut aya::programs::Program,
) -> Result<Prog<'a>, DatapathError> {
    let err = |source| DatapathError::Program { name, source };
    Ok(match name {
        prog_names::SKB_EGRESS | prog_names::SKB_INGRESS | prog_names::SKB_HANDOFF => {
            Prog::Skb(prog.try_into().map_err(err)?)
        }
        prog_names::SETSOCKOPT => Prog::Sockopt(prog.try_into().map_err(err)?),
        _ => Prog::SockAddr(prog.try_into().map_err(err)?),
    })
}

/// The possible CPUs' ids, in the order of a per-CPU map value's slots (`name`: the map the
/// caller reads, for the error).
fn possible_cpus(name: &'static str) -> Result<Vec<u32>, DatapathError> {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|text| cpu_list(text.trim()))
        .ok_or_else(|| DatapathError::Map {
            name,
            source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "reading /sys/devices/system/cpu/possible",
                io_error: std::io::Error::other("unreadable CPU list"),
            }),
        })
}

/// A kernel CPU list ("0-3,5,7-8") as ids; None when it does not parse.
fn cpu_list(text: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi): (u32, u32) = (lo.parse().ok()?, hi.parse().ok()?);
                if hi < lo || hi - lo > 65_536 {
                    return None;
                }
                out.extend(lo..=hi);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The `MapData` inside any map kind aya hands out (for its descriptor).
fn map_data(map: &aya::maps::Map) -> Option<&MapData> {
    use aya::maps::Map;
    Some(match map {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LpmTrie(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::RingBuf(d) => d,
        _ => return None,
    })
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

/// CLOCK_BOOTTIME in nanoseconds: the clock `bpf_ktime_get_boot_ns` reads.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod cpu_list_tests {
    use super::cpu_list;

    #[test]
    fn cpu_lists_parse_with_holes() {
        assert_eq!(cpu_list("0-1"), Some(vec![0, 1]));
        assert_eq!(cpu_list("0,2-3,7"), Some(vec![0, 2, 3, 7]));
        assert_eq!(cpu_list(""), None);
        assert_eq!(cpu_list("3-1"), None);
        assert_eq!(cpu_list("x"), None);
    }
}

/// The RULE_HITS entry of a generation's `n`th chunk of rules.
fn rule_hits_key(generation: u32, n: usize) -> u32 {
    ((generation & 1) * RULES_PER_GEN) / RULE_HITS_CHUNK + n as u32
}

#[cfg(test)]
mod rule_hits_tests {
    use agentseg_common::{RULE_HITS_CHUNK, RULES_PER_GEN, capacity};

    use super::rule_hits_key;

    #[test]
    fn each_generation_owns_its_own_entries_within_the_map() {
        let per_gen = RULES_PER_GEN / RULE_HITS_CHUNK;
        assert_eq!(rule_hits_key(0, 0), 0);
        assert_eq!(rule_hits_key(1, 0), per_gen);
        assert_eq!(
            rule_hits_key(2, 3),
            3,
            "generations alternate between two halves"
        );
        assert_eq!(
            rule_hits_key(1, per_gen as usize - 1),
            capacity::RULE_HITS - 1
        );
        // The kernel side indexes by rule id: rule id / chunk is the same entry.
        let rule = RULES_PER_GEN + 5000;
        assert_eq!(rule / RULE_HITS_CHUNK, rule_hits_key(1, 1));
    }
}
