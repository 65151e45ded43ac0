//! Every map the kernel programs use. All are pinned by the daemon and adopted on restart;
//! their capacities come from `agentseg_common::capacity` so that the pinned layout version
//! covers them.
use agentseg_common::{
    BPF_F_NO_PREALLOC, Config, Counters, DenyFlow, DenyFlowKey, DnsOrig, EVENTS_RING_BYTES,
    FlowVerdict, LearnedKey, LearnedValue, Member, PolicyKeyV4, PolicyKeyV6, PolicyValue,
    RuleHitsChunk, RuleSet, SegmentInfo, UnixKey, UnixValue, capacity,
};
use aya_ebpf::{
    macros::map,
    maps::{
        Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap, RingBuf,
    },
};

/// cgroup id → membership. Written by the daemon, read by every hook (ancestor walk).
#[map(name = "AS_MEMBERS")]
pub static MEMBERS: HashMap<u64, Member> = HashMap::with_max_entries(capacity::MEMBERS, 0);

/// (segment, IPv4 prefix) → ruleset. Written by the daemon (compiled policy).
#[map(name = "AS_POLICY_V4")]
pub static POLICY_V4: LpmTrie<PolicyKeyV4, PolicyValue> =
    LpmTrie::with_max_entries(capacity::POLICY_V4, 0);

/// (segment, IPv6 prefix) → ruleset. Written by the daemon (compiled policy).
#[map(name = "AS_POLICY_V6")]
pub static POLICY_V6: LpmTrie<PolicyKeyV6, PolicyValue> =
    LpmTrie::with_max_entries(capacity::POLICY_V6, 0);

/// ruleset id → merged port rules. Written by the daemon; the first id of each generation's
/// half is the empty (deny) set.
#[map(name = "AS_RULESETS")]
pub static RULESETS: Array<RuleSet> = Array::with_max_entries(capacity::RULESETS, 0);

/// segment id (with generation bit) → mode, flags, name. Written by the daemon.
#[map(name = "AS_SEGMENTS")]
pub static SEGMENTS: HashMap<u32, SegmentInfo> = HashMap::with_max_entries(capacity::SEGMENTS, 0);

/// Entry 0: active generation, epoch and daemon heartbeat. Written by the daemon.
#[map(name = "AS_CONFIG")]
pub static CONFIG: Array<Config> = Array::with_max_entries(capacity::CONFIG, 0);

/// member cgroup id → decision counters (per CPU). Written here, read and pruned by the daemon.
#[map(name = "AS_COUNTERS")]
pub static COUNTERS: PerCpuHashMap<u64, Counters> =
    PerCpuHashMap::with_max_entries(capacity::COUNTERS, BPF_F_NO_PREALLOC);

/// Fail-closed events that point at a daemon bug or a race (per CPU), by `STAT_*` index.
#[map(name = "AS_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(capacity::STATS, 0);

/// Every deny and would-be deny, for the daemon's audit log and detectors. A full ring never
/// blocks a hook: the loss is counted in STATS and the verdict stands.
#[map(name = "AS_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// A member's refused flow → its denials on this CPU and how many records reported. Written
/// here (one record when a flow first appears, then at most one summary per second); read by
/// the daemon's sweep, which reports what a flow that went quiet left over. LRU: under a flood
/// of distinct flows the oldest go, and their leftover is only in the member's exact counters.
#[map(name = "AS_DENY_FLOWS")]
pub static DENY_FLOWS: LruPerCpuHashMap<DenyFlowKey, DenyFlow> =
    LruPerCpuHashMap::with_max_entries(capacity::DENY_FLOWS, 0);

/// rule id / RULE_HITS_CHUNK → allows decided by each rule of the chunk (per CPU). Written
/// here; read by the daemon for `audit`.
#[map(name = "AS_RULE_HITS")]
pub static RULE_HITS: PerCpuArray<RuleHitsChunk> =
    PerCpuArray::with_max_entries(capacity::RULE_HITS, 0);

/// (table id, AF_UNIX address) → verdict. Written by the daemon (compiled `[[unix]]` rules,
/// the `[unix] allow` baseline and the control socket's deny); read by the AF_UNIX hooks.
#[map(name = "AS_UNIX")]
pub static UNIX: LpmTrie<UnixKey, UnixValue> = LpmTrie::with_max_entries(capacity::UNIX, 0);

/// socket cookie → the egress verdict for its current destination: only the first packet of
/// a flow (or of a new destination) is judged. Written and read by the packet hooks; LRU, so an
/// evicted entry only costs a new judgement.
#[map(name = "AS_FLOWS")]
pub static FLOWS: LruHashMap<u64, FlowVerdict> = LruHashMap::with_max_entries(capacity::FLOWS, 0);

/// (segment, address) → the fqdns rule's ruleset and an expiry: what the resolver learned from
/// an allowed answer. Written by the daemon before it releases the answer; read by every
/// egress decision after the segment's prefixes.
#[map(name = "AS_LEARNED")]
pub static LEARNED: HashMap<LearnedKey, LearnedValue> =
    HashMap::with_max_entries(capacity::LEARNED, BPF_F_NO_PREALLOC);

/// socket cookie → the DNS server a steered socket asked. Written by the connect/sendmsg
/// hooks when they steer port 53 to the resolver; read by recvmsg and getpeername.
#[map(name = "AS_DNS_ORIG")]
pub static DNS_ORIG: LruHashMap<u64, DnsOrig> = LruHashMap::with_max_entries(capacity::DNS_ORIG, 0);
