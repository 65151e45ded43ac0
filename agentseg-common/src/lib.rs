//! Types shared by the kernel programs (`agentseg-ebpf`) and user space (`agentseg`).
//!
//! Everything here is `#[repr(C)]` with explicit padding and a compile-time size check: an
//! implicit hole in a map key makes lookups miss at random. No `bool`, enum or `Option` crosses
//! the boundary: integers with named consts instead.
#![no_std]

/// Map names as the kernel sees them (at most 15 bytes: the kernel truncates silently).
pub mod map_names {
    /// cgroup id → [`crate::Member`].
    pub const MEMBERS: &str = "AS_MEMBERS";
    /// (segment id, IPv4 prefix) → [`crate::PolicyValue`].
    pub const POLICY_V4: &str = "AS_POLICY_V4";
    /// (segment id, IPv6 prefix) → [`crate::PolicyValue`].
    pub const POLICY_V6: &str = "AS_POLICY_V6";
    /// ruleset id → [`crate::RuleSet`].
    pub const RULESETS: &str = "AS_RULESETS";
    /// segment id → [`crate::SegmentInfo`].
    pub const SEGMENTS: &str = "AS_SEGMENTS";
    /// member cgroup id → per-CPU [`crate::Counters`].
    pub const COUNTERS: &str = "AS_COUNTERS";
    /// index ([`crate::STAT_*`](crate::STAT_NO_MEMBER)) → per-CPU u64.
    pub const STATS: &str = "AS_STATS";
    /// index 0 → [`crate::Config`].
    pub const CONFIG: &str = "AS_CONFIG";
    /// Ring buffer of [`crate::Event`]s: every deny and would-be deny.
    pub const EVENTS: &str = "AS_EVENTS";
    /// rule id (generation offset included) → per-CPU count of connects/sends/packets it allowed.
    pub const RULE_HITS: &str = "AS_RULE_HITS";
    /// (table id, AF_UNIX address bytes) → [`crate::UnixValue`]: `[[unix]]` rules.
    pub const UNIX: &str = "AS_UNIX";
    /// socket cookie → [`crate::FlowVerdict`]: the verdict the egress packet hook remembers for
    /// a socket's current destination (LRU: an evicted entry is judged again).
    pub const FLOWS: &str = "AS_FLOWS";
    /// [`crate::LearnedKey`] → [`crate::LearnedValue`]: addresses a segment's `fqdns` rules
    /// learned from the resolver's answers, until they expire.
    pub const LEARNED: &str = "AS_LEARNED";
    /// socket cookie → [`crate::DnsOrig`]: the server a steered DNS socket asked, to make
    /// replies appear to come from it (recvmsg, getpeername).
    pub const DNS_ORIG: &str = "AS_DNS_ORIG";
    /// [`crate::DenyFlowKey`] → per-CPU [`crate::DenyFlow`]: refused flows being aggregated
    /// (LRU: an evicted flow's unreported count is left to the member's exact counters).
    pub const DENY_FLOWS: &str = "AS_DENY_FLOWS";

    /// Every map, in the order the loader pins them.
    pub const ALL: [&str; 15] = [
        MEMBERS, POLICY_V4, POLICY_V6, RULESETS, SEGMENTS, COUNTERS, STATS, CONFIG, EVENTS,
        RULE_HITS, UNIX, FLOWS, LEARNED, DNS_ORIG, DENY_FLOWS,
    ];
}

/// Map capacities (`max_entries`), shared so that the layout version covers them and the
/// daemon can check adopted pins against them.
pub mod capacity {
    pub const MEMBERS: u32 = 65536;
    pub const POLICY_V4: u32 = 1 << 20;
    pub const POLICY_V6: u32 = 1 << 20;
    pub const RULESETS: u32 = 2 * crate::RULESETS_PER_GEN;
    pub const SEGMENTS: u32 = 8192;
    pub const COUNTERS: u32 = 65536;
    pub const STATS: u32 = crate::STAT_COUNT;
    pub const CONFIG: u32 = 1;
    pub const RULE_HITS: u32 = 2 * crate::RULES_PER_GEN / crate::RULE_HITS_CHUNK;
    pub const UNIX: u32 = 65536;
    pub const FLOWS: u32 = 262144;
    pub const LEARNED: u32 = 262144;
    pub const DNS_ORIG: u32 = 65536;
    pub const DENY_FLOWS: u32 = 16384;
}

mod layout;
mod matching;
pub use layout::{LAYOUT_HASH, PIN_LAYOUT};
pub use matching::{has_ports, proto_class, rule_allows, ruleset_allows};

/// Program names (the Rust function names in `agentseg-ebpf`).
pub mod prog_names {
    pub const CONNECT4: &str = "agentseg_connect4";
    pub const CONNECT6: &str = "agentseg_connect6";
    pub const SENDMSG4: &str = "agentseg_sendmsg4";
    pub const SENDMSG6: &str = "agentseg_sendmsg6";
    /// cgroup_skb egress: ICMP, raw sockets, quarantine.
    pub const SKB_EGRESS: &str = "agentseg_skb_egress";
    /// cgroup_skb ingress: `[[ingress]]` rules, quarantine.
    pub const SKB_INGRESS: &str = "agentseg_skb_ingress";
    /// cgroup_skb egress at the enforcement root: sockets made outside every pen and used by
    /// a member (handed in), and member cgroups whose own packet programs are not attached yet.
    pub const SKB_HANDOFF: &str = "agentseg_skb_handoff";
    /// cgroup/setsockopt: members may not set IP options or IPv6 routing/option headers.
    pub const SETSOCKOPT: &str = "agentseg_setsockopt";
    /// Steered DNS replies appear to come from the server asked.
    pub const RECVMSG4: &str = "agentseg_recvmsg4";
    pub const RECVMSG6: &str = "agentseg_recvmsg6";
    pub const GETPEERNAME4: &str = "agentseg_getpeername4";
    pub const GETPEERNAME6: &str = "agentseg_getpeername6";
    /// cgroup/connect_unix and sendmsg_unix (second object, raw loader: aya 0.14 has no
    /// attach type for them).
    pub const CONNECT_UNIX: &str = "agentseg_connect_unix";
    pub const SENDMSG_UNIX: &str = "agentseg_sendmsg_unix";
}

/// Deepest cgroup level the kernel programs walk when looking for a member ancestor.
pub const MAX_CGROUP_DEPTH: u32 = 32;
/// Port rules one ruleset can hold; the compiler merges ranges and refuses more.
pub const RULESET_CAPACITY: usize = 16;
/// Ruleset 0 of each generation is the empty set: everything it covers is denied.
pub const RULESET_EMPTY: u32 = 0;
/// Rulesets per generation; generation `g` owns ids `g * RULESETS_PER_GEN ..`.
pub const RULESETS_PER_GEN: u32 = 4096;

/// Policy is double-buffered: every segment id carries its generation in this bit, and
/// [`Config::active_gen`] says which half the programs read. A reload writes the other half
/// completely, then flips `active_gen` with one map write.
pub const GEN_BIT: u32 = 1 << 31;
/// LPM key segment-id bit: the entry belongs to the segment's `[quarantine] allow` list.
pub const QUARANTINE_BIT: u32 = 1 << 30;
/// LPM key segment-id bit: the entry is an `[[ingress]]` rule (keyed by source address).
pub const INGRESS_BIT: u32 = 1 << 29;
/// Compiled segment ids stay below this (the bits above select generation and table).
pub const MAX_SEGMENT_ID: u32 = INGRESS_BIT - 1;
/// [`Member::segment_ids`] value: in this generation the cgroup belongs to no segment (it is
/// being released): allowed, as any cgroup outside all segments. An explicit value: 0 (an
/// entry never written) is not a segment and is denied.
pub const SEGMENT_RELEASED: u32 = 0x7fff_fffe;
/// [`Member::segment_ids`] value: the agent's segment no longer exists: everything is denied.
pub const SEGMENT_GONE: u32 = 0x7fff_ffff;

/// Protocol classes in [`PortRule::protocols`]: `tcp` (IPPROTO_TCP and MPTCP), `udp`
/// (IPPROTO_UDP only: UDP-Lite is its own protocol), `icmp` (ICMP and ICMPv6).
pub const PROTO_TCP: u8 = 1 << 0;
pub const PROTO_UDP: u8 = 1 << 1;
pub const PROTO_ICMP: u8 = 1 << 2;
/// [`PortRule::proto_num`] holds one more IP protocol number the rule allows (UDP-Lite, SCTP,
/// or any number a rule names).
pub const PROTO_NUMBERED: u8 = 1 << 3;
/// Every IP protocol, on every port (a `[quarantine] allow` list).
pub const PROTO_ALL: u8 = 1 << 4;

/// IP protocol numbers the kernel programs and the compiler name.
pub const IPPROTO_ICMP: u32 = 1;
pub const IPPROTO_TCP: u32 = 6;
pub const IPPROTO_UDP: u32 = 17;
pub const IPPROTO_DCCP: u32 = 33;
pub const IPPROTO_ICMPV6: u32 = 58;
pub const IPPROTO_SCTP: u32 = 132;
pub const IPPROTO_UDPLITE: u32 = 136;
/// MPTCP sockets say 262 in `socket()` and in the sock_addr context; on the wire it is TCP.
pub const IPPROTO_MPTCP: u32 = 262;

/// [`SegmentInfo::mode`]: deny what the rules do not allow.
pub const MODE_ENFORCE: u32 = 0;
/// [`SegmentInfo::mode`]: allow everything, count what would have been denied.
pub const MODE_AUDIT: u32 = 1;

/// [`Member::kind`]: a cgroup named in a segment's `[members]`.
pub const MEMBER_CGROUP: u32 = 0;
/// [`Member::kind`]: an agent started with `agentseg run`.
pub const MEMBER_AGENT: u32 = 1;
/// [`Member::kind`]: a cgroup the daemon knows is in no segment (a known child of a
/// [`MEMBER_GUARD`] cgroup, or a guard that is not a member itself). Never a match.
pub const MEMBER_OUTSIDER: u32 = 2;

// Global per-CPU statistics (indices into the STATS array).
/// A packet program attached to a member cgroup found no member entry on the socket's cgroup
/// path: denied (fail closed).
pub const STAT_NO_MEMBER: u32 = 0;
/// A member pointed at a segment id the SEGMENTS map does not hold (or at 0): denied.
pub const STAT_NO_SEGMENT: u32 = 1;
/// A ruleset id with no entry: denied (fail closed).
pub const STAT_NO_RULESET: u32 = 2;
/// Denied because the daemon's heartbeat is older than the dead-man bound.
pub const STAT_DEADMAN: u32 = 3;
/// An event could not be reserved in the ring buffer (full): the verdict stood, the record
/// was lost.
pub const STAT_EVENTS_LOST: u32 = 4;
/// Denied: a child of a guarded cgroup that the daemon has not registered yet (a declared
/// member cgroup in its first instants).
pub const STAT_PENDING: u32 = 5;
/// Denied: a member's packet the hook could not parse, or a non-canonical AF_UNIX path.
pub const STAT_MALFORMED: u32 = 6;
/// Denied: a member whose registration or attachment failed ([`MEMBER_FAILED`]).
pub const STAT_FAILED_MEMBER: u32 = 7;
/// Denied: IPv4 options, an IPv6 routing header, or a setsockopt that would set them.
pub const STAT_IP_OPTIONS: u32 = 8;
/// The egress packet hook judged a flow's destination on the wire (first packet, or a new
/// destination): its verdict is now remembered per socket.
pub const STAT_FLOW_JUDGED: u32 = 9;
pub const STAT_COUNT: u32 = 16;

/// Size of the event ring buffer (a power of two, a multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 4 << 20;
/// Rule ids per generation in RULE_HITS; generation `g` owns `g * RULES_PER_GEN ..`.
pub const RULES_PER_GEN: u32 = 32768;
/// Rule hit counters per RULE_HITS entry: rule `r` counts in entry `r / RULE_HITS_CHUNK`, slot
/// `r % RULE_HITS_CHUNK`. 32 KiB values (the per-CPU maximum) make 16 per-CPU allocations at
/// map creation instead of 65,536 (about 50 ms of a cold start).
pub const RULE_HITS_CHUNK: u32 = 4096;

/// One RULE_HITS entry: the hit counters of [`RULE_HITS_CHUNK`] consecutive rule ids.
pub type RuleHitsChunk = [u64; RULE_HITS_CHUNK as usize];

/// `BPF_F_NO_PREALLOC`: hash map elements allocated when inserted, not all at map creation
/// (the preallocated per-CPU COUNTERS cost about 50 ms of a cold start).
pub const BPF_F_NO_PREALLOC: u32 = 1;

/// [`Event::rule_id`] when no rule matched (default deny, or an `except` carve-out).
pub const RULE_DEFAULT_DENY: u32 = u32::MAX;
/// [`Event::rule_id`] for a denial by quarantine.
pub const RULE_QUARANTINE: u32 = u32::MAX - 1;
/// [`Event::rule_id`] for a denial by the dead-man switch.
pub const RULE_DEADMAN: u32 = u32::MAX - 2;
/// [`Event::rule_id`]: a declared member cgroup not registered yet (fail closed).
pub const RULE_PENDING: u32 = u32::MAX - 3;
/// [`Event::rule_id`]: a packet the hook could not parse, or a non-canonical AF_UNIX path.
pub const RULE_MALFORMED: u32 = u32::MAX - 4;
/// [`Event::rule_id`]: IPv4 options / IPv6 routing header on the wire, or a setsockopt of them.
pub const RULE_IP_OPTIONS: u32 = u32::MAX - 5;
/// [`Event::rule_id`]: the daemon's own control socket, refused to every member.
pub const RULE_CONTROL_SOCKET: u32 = u32::MAX - 6;
/// [`Event::rule_id`]: a member whose registration or attachment failed.
pub const RULE_FAILED_MEMBER: u32 = u32::MAX - 7;
/// [`Event::rule_id`]: a member's DNS traffic that cannot go through the resolver (its socket
/// is bound to another address, IPv6-only, MPTCP; or it addresses the resolver directly), or
/// a query the resolver refused.
pub const RULE_DNS: u32 = u32::MAX - 8;
/// Every value from here up is a sentinel, not a rule id.
pub const RULE_FIRST_SENTINEL: u32 = RULE_DNS;

/// [`Event::hook`] values.
pub const HOOK_CONNECT4: u8 = 1;
pub const HOOK_CONNECT6: u8 = 2;
pub const HOOK_SENDMSG4: u8 = 3;
pub const HOOK_SENDMSG6: u8 = 4;
pub const HOOK_SKB_EGRESS: u8 = 5;
pub const HOOK_SKB_INGRESS: u8 = 6;
pub const HOOK_CONNECT_UNIX: u8 = 7;
pub const HOOK_SENDMSG_UNIX: u8 = 8;
pub const HOOK_SETSOCKOPT: u8 = 9;
/// The enforcement root's egress packet hook: a socket made outside every pen, used by a
/// member (handed in), or a member cgroup whose packet programs are not attached yet.
pub const HOOK_SKB_HANDOFF: u8 = 10;
/// The resolver (user space): a DNS query refused.
pub const HOOK_DNS: u8 = 11;

/// [`Event::verdict`] values.
pub const VERDICT_DENY: u8 = 0;
/// Would have been denied; let through because the segment is in audit mode.
pub const VERDICT_AUDIT: u8 = 1;
pub const VERDICT_ALLOW: u8 = 2;

/// One decision, as the kernel reports it through the EVENTS ring buffer. Written by the
/// hooks; read (and enriched with names) by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// CLOCK_BOOTTIME nanoseconds.
    pub ts_ns: u64,
    /// The member cgroup (agent or member cgroup) the decision was about.
    pub cgroup_id: u64,
    /// `bpf_get_current_pid_tgid` (tgid in the high half); 0 in packet hooks.
    pub pid_tgid: u64,
    /// Task name, NUL padded; empty in packet hooks.
    pub comm: [u8; 16],
    /// Live segment id (generation bit included).
    pub segment_id: u32,
    /// Rule that decided (generation offset included), or a `RULE_*` sentinel.
    pub rule_id: u32,
    /// `HOOK_*`.
    pub hook: u8,
    /// `VERDICT_*`.
    pub verdict: u8,
    /// 4 or 6.
    pub family: u8,
    /// IP protocol number.
    pub protocol: u8,
    /// Host byte order; 0 when unknown (sock_addr hooks do not know the source).
    pub sport: u16,
    pub dport: u16,
    /// Network byte order; IPv4 in the first 4 bytes.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Repeated denials of one flow are aggregated in the kernel (`AS_DENY_FLOWS`, per CPU):
    /// this record stands for the flow's denials `agg_from + 1 ..= agg_to` on CPU `cpu` of the
    /// flow entry made at `agg_flow_ns` (0 for records that are not aggregated: allow samples,
    /// AF_UNIX decisions; then it stands for one decision, `agg_from` 0 and `agg_to` 1).
    pub agg_flow_ns: u64,
    pub agg_from: u64,
    pub agg_to: u64,
    pub cpu: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Event>() == 120);

/// Bytes of an AF_UNIX address (`sun_path`).
pub const UNIX_PATH_LEN: usize = 108;

/// An AF_UNIX decision: the [`Event`] (family 1, no addresses or ports) followed by the
/// address. Told apart from an [`Event`] by its size in the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixEvent {
    pub event: Event,
    /// `sun_path` as the caller gave it: a path (NUL terminated when shorter), or an abstract
    /// name (first byte 0).
    pub path: [u8; UNIX_PATH_LEN],
    /// Bytes of `path` that belong to the address (abstract names may hold NULs).
    pub path_len: u32,
}
const _: () = assert!(core::mem::size_of::<UnixEvent>() == 120 + UNIX_PATH_LEN + 4);

/// Value of MEMBERS, keyed by the cgroup id (the cgroup directory's inode number, host u64).
/// Written by the daemon when it applies policy or starts an agent; read by every hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Segment this cgroup and all its descendants belong to, per generation (index =
    /// generation; each id carries its [`GEN_BIT`]), or [`SEGMENT_RELEASED`]/[`SEGMENT_GONE`].
    pub segment_ids: [u32; 2],
    /// [`MEMBER_CGROUP`], [`MEMBER_AGENT`] or [`MEMBER_OUTSIDER`].
    pub kind: u32,
    /// `MEMBER_*` flags ([`MEMBER_QUARANTINED`], [`MEMBER_GUARD`], [`MEMBER_FAILED`],
    /// [`MEMBER_ATTACHED`]).
    pub flags: u32,
    /// Random 128-bit agent id (all zero for plain member cgroups).
    pub agent_id: [u8; 16],
    /// The member's DNS slot (0: none): its steered queries come from [`dns_slot_addr`], so
    /// the resolver knows who asks.
    pub dns_slot: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Member>() == 40);

/// The one entry of CONFIG. Written by the daemon; read by every hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Which half of the double-buffered policy is live: 0 or 1.
    pub active_gen: u32,
    /// Dead-man bound in seconds: segments flagged [`SEG_DEADMAN_QUARANTINE`] deny everything
    /// once the heartbeat is older than this. 0 disables the switch.
    pub deadman_secs: u32,
    /// Last daemon heartbeat, CLOCK_BOOTTIME nanoseconds (`bpf_ktime_get_boot_ns`).
    pub heartbeat_ns: u64,
    /// Report about one allow in this many as an event (0: none, the default). Allows are
    /// always counted per rule.
    pub sample_allows: u32,
    /// `CONFIG_*` flags: whether any quarantine or dead-man switch is armed anywhere. When
    /// neither is, the packet hooks pass the packets of flows whose destination they already
    /// judged without resolving who they belong to.
    pub flags: u32,
    /// Bumped by the daemon at every policy switch, quarantine and release: a remembered
    /// [`FlowVerdict`] of an older epoch is judged again.
    pub epoch: u32,
    /// The resolver's port (host byte order) on [`DNS_RESOLVER_V4`] in every network namespace
    /// agentseg serves; 0: DNS is not steered.
    pub dns_port: u16,
    pub _pad: u16,
}

/// The resolver's IPv4 address (network byte order) in every namespace it serves: 127.64.0.1.
pub const DNS_RESOLVER_V4: [u8; 4] = [127, 64, 0, 1];
/// DNS slots are the addresses of 127.64.0.0/10 (22 bits); 0 and 1 are never handed out.
pub const DNS_SLOT_BITS: u32 = 22;
/// The first slot handed out.
pub const DNS_SLOT_FIRST: u32 = 2;

/// The source address (network byte order) a member's steered DNS queries come from.
pub const fn dns_slot_addr(slot: u32) -> [u8; 4] {
    (0x7f40_0000u32 | (slot & ((1 << DNS_SLOT_BITS) - 1))).to_be_bytes()
}

/// The slot an address of 127.64.0.0/10 names, or None for any other address.
pub const fn dns_slot_of(addr: [u8; 4]) -> Option<u32> {
    let a = u32::from_be_bytes(addr);
    if a & !((1 << DNS_SLOT_BITS) - 1) == 0x7f40_0000 {
        Some(a & ((1 << DNS_SLOT_BITS) - 1))
    } else {
        None
    }
}

/// [`Config::flags`]: some agent or segment is quarantined.
pub const CONFIG_ANY_QUARANTINE: u32 = 1 << 0;
/// [`Config::flags`]: some segment has `on_daemon_loss = "quarantine"`.
pub const CONFIG_ANY_DEADMAN: u32 = 1 << 1;
const _: () = assert!(core::mem::size_of::<Config>() == 32);

/// [`SegmentInfo::flags`]: quarantine the segment when the daemon's heartbeat stops.
pub const SEG_DEADMAN_QUARANTINE: u32 = 1 << 0;
/// [`SegmentInfo::flags`]: the whole segment is quarantined: only its `[quarantine] allow`
/// peers are reachable, packets of established flows included.
pub const SEG_QUARANTINED: u32 = 1 << 1;
/// [`Member::flags`]: this agent (or member cgroup) is quarantined.
pub const MEMBER_QUARANTINED: u32 = 1 << 0;
/// [`Member::flags`]: every child cgroup must be registered; a task or socket in an
/// unregistered child is denied (a declared member cgroup in its first instants).
pub const MEMBER_GUARD: u32 = 1 << 1;
/// [`Member::flags`]: registering or attaching this member failed: everything is denied.
pub const MEMBER_FAILED: u32 = 1 << 2;
/// [`Member::flags`]: the member's own packet programs are attached (until then the
/// enforcement root's handoff hook judges its packets).
pub const MEMBER_ATTACHED: u32 = 1 << 3;
/// Bytes of a segment name kept in [`SegmentInfo::name`] (names are at most 98 bytes; the
/// name only serves to re-map members after a restart, and is NUL padded).
pub const SEGMENT_NAME_LEN: usize = 104;

/// LPM key data for POLICY_V4. The trie matches bits in memory order, so the segment id comes
/// first and every entry's prefix length is `32 + address prefix length`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyKeyV4 {
    /// Segment id in big-endian so that the trie's bit order is the id's numeric order.
    pub segment_id_be: [u8; 4],
    /// IPv4 address, network byte order.
    pub addr_be: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<PolicyKeyV4>() == 8);

/// LPM key data for POLICY_V6: as [`PolicyKeyV4`] with a 128-bit address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyKeyV6 {
    pub segment_id_be: [u8; 4],
    /// IPv6 address, network byte order.
    pub addr_be: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<PolicyKeyV6>() == 20);

/// Bits of the LPM key taken by the segment id.
pub const SEGMENT_PREFIX_BITS: u32 = 32;

/// Value of POLICY_V4/V6: which ruleset covers this prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyValue {
    pub ruleset_id: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 4);

/// One allowed (protocols, port range) pair inside a ruleset.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PortRule {
    /// First allowed destination port, host byte order.
    pub port_lo: u16,
    /// Last allowed destination port (inclusive), host byte order.
    pub port_hi: u16,
    /// Bitmask of `PROTO_*`. The range applies to protocols with ports (see [`has_ports`]).
    pub protocols: u8,
    /// With [`PROTO_NUMBERED`]: the IP protocol number this entry allows.
    pub proto_num: u8,
    pub _pad: [u8; 2],
    /// Index of the policy rule that produced this entry (for counters and audit).
    pub rule_id: u32,
}
const _: () = assert!(core::mem::size_of::<PortRule>() == 12);

/// Value of RULESETS: the union of every rule that covers one prefix, merged by the compiler.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleSet {
    /// Number of valid entries in `rules` (at most [`RULESET_CAPACITY`]).
    pub len: u32,
    pub rules: [PortRule; RULESET_CAPACITY],
}
const _: () = assert!(core::mem::size_of::<RuleSet>() == 4 + 12 * RULESET_CAPACITY);

/// Value of SEGMENTS, keyed by segment id (generation bit included).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    /// [`MODE_ENFORCE`] or [`MODE_AUDIT`].
    pub mode: u32,
    /// `SEG_*` flags.
    pub flags: u32,
    /// The segment's name, NUL padded: lets a restarted daemon map old ids to names.
    pub name: [u8; SEGMENT_NAME_LEN],
}
const _: () = assert!(core::mem::size_of::<SegmentInfo>() == 8 + SEGMENT_NAME_LEN);

/// Key of UNIX: an LPM key whose first 32 bits are the table id (segment id, with
/// [`QUARANTINE_BIT`] for the quarantine allow list), then the AF_UNIX address as `sun_path`
/// holds it. An exact path ends with its NUL (`/run/x.sock\0`); a prefix pattern
/// (`/run/tools/*`) stops before the `*`. Abstract names start with their 0 byte.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UnixKey {
    pub table_be: [u8; 4],
    pub path: [u8; UNIX_PATH_LEN],
}
const _: () = assert!(core::mem::size_of::<UnixKey>() == 4 + UNIX_PATH_LEN);

/// [`UnixValue::verdict`]: connecting or sending to the address is allowed.
pub const UNIX_ALLOW: u32 = 1;
/// [`UnixValue::verdict`]: refused even when a shorter pattern allows it (the daemon's own
/// control socket).
pub const UNIX_DENY: u32 = 2;

/// Value of UNIX.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixValue {
    /// Rule that decides (generation offset included), or a `RULE_*` sentinel.
    pub rule_id: u32,
    /// [`UNIX_ALLOW`] or [`UNIX_DENY`].
    pub verdict: u32,
}
const _: () = assert!(core::mem::size_of::<UnixValue>() == 8);

/// [`FlowVerdict::verdict`] values.
pub const FLOW_ALLOW: u8 = 1;
pub const FLOW_DENY: u8 = 2;
/// The socket is in no segment and was used by a task in no segment.
pub const FLOW_UNTOUCHED: u8 = 3;

/// Value of FLOWS: what the egress packet hook decided for a socket's destination, so that
/// only the first packet of a flow (or of a new destination) is judged.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowVerdict {
    /// Destination on the wire, network byte order (IPv4 in the first 4 bytes).
    pub daddr: [u8; 16],
    /// Host byte order.
    pub dport: u16,
    pub protocol: u8,
    /// `FLOW_*`.
    pub verdict: u8,
    /// [`Config::epoch`] when judged.
    pub epoch: u32,
    /// Who judged: 0 for a member's own packet hook; otherwise the cgroup of the task the
    /// enforcement root's handoff hook judged for (a handed-in socket is judged again when
    /// another task uses it).
    pub task_cgroup: u64,
    /// For [`FLOW_DENY`]: the rule (or sentinel) that refused, for the event of every later
    /// datagram (each is an attempt; a TCP retransmit is not).
    pub rule: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<FlowVerdict>() == 40);

/// Key of LEARNED: an address a segment learned from an allowed DNS answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LearnedKey {
    /// Live segment id (generation bit included: the daemon writes both generations).
    pub segment_id: u32,
    /// 4 or 6.
    pub family: u32,
    /// Network byte order; IPv4 in the first 4 bytes, the rest zero.
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<LearnedKey>() == 24);

/// Rule entries one learned address can carry at once (an address several names or patterns
/// led to: a CDN); the daemon replaces the one expiring first when all are taken.
pub const LEARNED_SLOTS: usize = 4;

/// One rule's claim on a learned address: one entry of the fqdns rule's ruleset (a rule with
/// several port ranges takes a slot per range), until it expires.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LearnedSlot {
    /// What the rule allows to the address; its `rule_id` is the live generation's.
    pub rule: PortRule,
    /// FNV-1a of the name pattern that allowed it (lets a restarted daemon map the entry to
    /// the rule of its own policy).
    pub pattern_hash: u32,
    /// CLOCK_BOOTTIME nanoseconds after which the slot no longer allows anything (TTL,
    /// clamped, plus grace); 0: unused.
    pub expires_ns: u64,
}
const _: () = assert!(core::mem::size_of::<LearnedSlot>() == 24);

/// Value of LEARNED.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LearnedValue {
    pub slots: [LearnedSlot; LEARNED_SLOTS],
}
const _: () = assert!(core::mem::size_of::<LearnedValue>() == 96);

/// Value of DNS_ORIG: the server a steered socket asked.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsOrig {
    /// Network byte order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// 4 or 6.
    pub family: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<DnsOrig>() == 24);

/// Per-CPU decision counters of one member cgroup (agent or member cgroup), summed by user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connects and sends allowed by a rule.
    pub allowed: u64,
    /// Connects and sends denied (enforce mode).
    pub denied: u64,
    /// Would-be denials let through because the segment is in audit mode.
    pub audit_denied: u64,
    /// Of `denied + audit_denied`: inbound packets refused (peers knocking on the member's
    /// ports). They never count toward the member's own `deny_rate`.
    pub inbound_denied: u64,
    /// Records the member's denials would have written but did not: its record budget on this
    /// CPU was spent, or the ring was full. The denials themselves are counted above and, for
    /// aggregated flows, reported by a later summary.
    pub records_dropped: u64,
    /// The member's record budget on this CPU (GCRA): the theoretical arrival time of its next
    /// record, CLOCK_BOOTTIME ns. Not a counter (user space ignores it).
    pub budget_tat_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Counters>() == 48);

impl Counters {
    /// Add another's counts (CPUs summed, or members folded into a segment); the budget field
    /// is state, not a count, and is left out.
    pub fn add(&mut self, other: &Counters) {
        self.allowed += other.allowed;
        self.denied += other.denied;
        self.audit_denied += other.audit_denied;
        self.inbound_denied += other.inbound_denied;
        self.records_dropped += other.records_dropped;
    }
}

/// Key of `AS_DENY_FLOWS`: one refused flow of one member, as its records name it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DenyFlowKey {
    pub cgroup_id: u64,
    /// The process (tgid) for the task hooks, 0 for packet hooks: each process's attempts
    /// keep their own records.
    pub pid: u32,
    pub segment_id: u32,
    pub rule_id: u32,
    pub hook: u8,
    pub verdict: u8,
    pub family: u8,
    pub protocol: u8,
    pub sport: u16,
    pub dport: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<DenyFlowKey>() == 64);

/// Value of `AS_DENY_FLOWS` (per CPU): how many denials the flow had on this CPU, how many of
/// them records have reported, when the entry was made and when it last wrote a record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyFlow {
    pub count: u64,
    pub reported: u64,
    pub first_ns: u64,
    pub emit_ns: u64,
}
const _: () = assert!(core::mem::size_of::<DenyFlow>() == 32);

/// A flow that keeps being refused writes at most one summary record per this interval (per
/// CPU); the daemon sweeps what a flow that went quiet left unreported.
pub const DENY_SUMMARY_NS: u64 = 1_000_000_000;
/// A member's record budget per CPU: one record per this interval on average ...
pub const RECORD_INTERVAL_NS: u64 = 4_000_000;
/// ... with bursts of this many records (a port scan of 256 ports is reported record by record).
pub const RECORD_BURST: u64 = 512;

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all of these are repr(C), made of integers and byte arrays, with no implicit
    // padding (checked by the size asserts above): every bit pattern is a valid value.
    unsafe impl aya::Pod for Member {}
    unsafe impl aya::Pod for PolicyKeyV4 {}
    unsafe impl aya::Pod for PolicyKeyV6 {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for PortRule {}
    unsafe impl aya::Pod for RuleSet {}
    unsafe impl aya::Pod for SegmentInfo {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for UnixEvent {}
    unsafe impl aya::Pod for UnixKey {}
    unsafe impl aya::Pod for UnixValue {}
    unsafe impl aya::Pod for FlowVerdict {}
    unsafe impl aya::Pod for LearnedKey {}
    unsafe impl aya::Pod for LearnedValue {}
    unsafe impl aya::Pod for DnsOrig {}
    unsafe impl aya::Pod for DenyFlowKey {}
    unsafe impl aya::Pod for DenyFlow {}

    impl Default for RuleSet {
        fn default() -> Self {
            Self {
                len: 0,
                rules: [PortRule::default(); RULESET_CAPACITY],
            }
        }
    }
}
