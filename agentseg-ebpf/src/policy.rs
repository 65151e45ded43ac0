//! The decision shared by every hook: who is asking (the deepest member on a cgroup path) and
//! whether its segment allows a peer.
//!
//! Who is asking, first row that applies wins:
//!
//! | situation on the cgroup path                            | result                          |
//! |---------------------------------------------------------|---------------------------------|
//! | a child of a guard (`MEMBER_GUARD`) is not registered   | deny (STAT_PENDING, RULE_PENDING) |
//! | no member (outsiders do not count)                      | caller's choice: deny (a program attached to a member cgroup: STAT_NO_MEMBER) or untouched (the enforcement root) |
//! | member flagged `MEMBER_FAILED`                          | deny (RULE_FAILED_MEMBER)       |
//! | member released in the live generation (`SEGMENT_RELEASED`) | untouched                  |
//! | member's segment id 0, or missing from SEGMENTS         | deny (STAT_NO_SEGMENT)          |
//!
//! What its segment allows, first row that applies wins:
//!
//! | situation                                          | verdict                         |
//! |----------------------------------------------------|---------------------------------|
//! | segment has the dead-man flag, heartbeat stale     | deny (RULE_DEADMAN)             |
//! | agent or segment quarantined                       | only `[quarantine] allow` peers, in any mode |
//! | longest prefix's ruleset has (protocol, port)      | allow                           |
//! | otherwise                                          | deny, or allow if mode = audit  |
use agentseg_common::{
    CONFIG_ANY_DEADMAN, CONFIG_ANY_QUARANTINE, Counters, DENY_SUMMARY_NS, DenyFlow, DenyFlowKey,
    Event, FlowVerdict, HOOK_SKB_INGRESS, INGRESS_BIT, LEARNED_SLOTS, LearnedKey, MAX_CGROUP_DEPTH,
    MEMBER_ATTACHED, MEMBER_FAILED, MEMBER_GUARD, MEMBER_OUTSIDER, MEMBER_QUARANTINED, MODE_AUDIT,
    PolicyKeyV4, PolicyKeyV6, QUARANTINE_BIT, RECORD_BURST, RECORD_INTERVAL_NS, RULE_DEADMAN,
    RULE_DEFAULT_DENY, RULE_FAILED_MEMBER, RULE_FIRST_SENTINEL, RULE_HITS_CHUNK, RULE_IP_OPTIONS,
    RULE_MALFORMED, RULE_PENDING, RULE_QUARANTINE, SEG_DEADMAN_QUARANTINE, SEG_QUARANTINED,
    SEGMENT_RELEASED, STAT_DEADMAN, STAT_EVENTS_LOST, STAT_FAILED_MEMBER, STAT_NO_MEMBER,
    STAT_NO_RULESET, STAT_NO_SEGMENT, STAT_PENDING, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY,
    rule_allows, ruleset_allows,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{
            self as raw, bpf_get_prandom_u32, bpf_get_smp_processor_id, bpf_ktime_get_boot_ns,
        },
    },
    macros::map,
    maps::{PerCpuArray, lpm_trie::Key},
};

use crate::maps::{
    CONFIG, COUNTERS, DENY_FLOWS, EVENTS, FLOWS, LEARNED, MEMBERS, POLICY_V4, POLICY_V6, RULE_HITS,
    RULESETS, SEGMENTS, STATS,
};

/// Return codes of cgroup sock_addr, sockopt and cgroup_skb programs alike.
pub const ALLOW: i32 = 1;
pub const DENY: i32 = 0;

/// A peer address as the hooks see it (network byte order). A plain struct, always fully
/// initialised: an enum with a 4- and a 16-byte variant leaves bytes the verifier calls
/// uninitialised ("!read_ok") when the value is copied.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Peer {
    pub v6: bool,
    /// IPv4 in the first 4 bytes, or IPv6.
    pub addr: [u8; 16],
}

impl Peer {
    #[inline(always)]
    pub fn v4(a: [u8; 4]) -> Self {
        Self {
            v6: false,
            addr: [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        }
    }

    #[inline(always)]
    pub fn v6(addr: [u8; 16]) -> Self {
        Self { v6: true, addr }
    }
}

#[inline(always)]
pub fn stat(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// Add to a per-CPU counter with one atomic instruction: a packet hook in softirq can
/// interrupt a task hook on the same CPU in the middle of a read-modify-write, and an exact
/// count must not lose that increment.
#[inline(always)]
pub fn bump(field: &mut u64, n: u64) {
    if n != 0 {
        // SAFETY: `field` is a valid, aligned u64 in map memory for the duration of the call.
        // (core's AtomicU64 has no fetch_add on this target; the intrinsic is one BPF atomic
        // add, which every kernel with these hooks verifies on map values.)
        #[cfg(target_arch = "bpf")]
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                field, n,
            );
        }
        #[cfg(not(target_arch = "bpf"))]
        {
            *field += n;
        }
    }
}

#[inline(always)]
pub fn count(cgroup: u64, f: impl FnOnce(&mut Counters)) {
    match COUNTERS.get_ptr_mut(cgroup) {
        // SAFETY: per-CPU value, only this CPU writes it.
        Some(p) => f(unsafe { &mut *p }),
        None => {
            // The new value is built in a per-CPU scratch slot, not on the stack (the global
            // functions' frames add up with the hooks').
            let Some(slot) = claim!(SCRATCH_COUNTERS) else {
                return;
            };
            // SAFETY: this CPU's free slot, held until `release!`.
            let c = unsafe { &mut (*slot).counters };
            *c = Counters::default();
            f(c);
            // A failed insert (map full) loses one count, never the verdict. By reference: a
            // copy would land on the stack.
            #[allow(clippy::needless_borrows_for_generic_args)]
            let _ = COUNTERS.insert(cgroup, &*c, 0);
            release!(slot);
        }
    }
}

/// [`count`] for a cgroup that already has counters; nothing otherwise.
#[inline(always)]
pub fn count_existing(cgroup: u64, f: impl FnOnce(&mut Counters)) {
    if let Some(p) = COUNTERS.get_ptr_mut(cgroup) {
        // SAFETY: per-CPU value (updates are atomic adds or this CPU's own).
        f(unsafe { &mut *p });
    }
}

/// Scratch space of [`emit_inline`], one per CPU: what would not fit on the stack next to a
/// packet hook's frame. The key doubles as the record's description (every field a record
/// needs but the time and the counts), so that the writer keeps one pointer live, not a
/// dozen values spilled to the stack. Not pinned (nothing outlives a program run).
#[repr(C)]
pub struct EmitScratch {
    busy: u64,
    pub key: DenyFlowKey,
    pub flow: DenyFlow,
}

#[map(name = "AS_SCRATCH_EMIT")]
static SCRATCH_EMIT: PerCpuArray<EmitScratch> = PerCpuArray::with_max_entries(2, 0);

/// [`count`]'s new entries.
#[repr(C)]
pub struct CountersScratch {
    busy: u64,
    pub counters: Counters,
}

#[map(name = "AS_SCRATCH_COUNTERS")]
static SCRATCH_COUNTERS: PerCpuArray<CountersScratch> = PerCpuArray::with_max_entries(2, 0);

/// This CPU's free slot of a two-slot scratch map (its `busy` flag taken with an atomic
/// compare-and-swap), or None when both are taken. A hook in softirq can interrupt another
/// on the same CPU in the middle of its use of a slot, and on preemptible kernels another
/// task's hook can too (cgroup programs run with migration disabled, not preemption): each
/// takes a slot of its own, and a third finds none (its report is dropped and counted,
/// never mixed with another's).
macro_rules! claim {
    ($map:expr) => {{
        let mut got = None;
        let mut idx = 0;
        while idx < 2 {
            if let Some(p) = $map.get_ptr_mut(idx) {
                // SAFETY: a per-CPU map value; the flag is a u64 at its start.
                if unsafe { take_flag(core::ptr::addr_of_mut!((*p).busy)) } {
                    got = Some(p);
                    break;
                }
            }
            idx += 1;
        }
        got
    }};
}
use claim;

/// Give back a slot [`claim!`] returned.
macro_rules! release {
    ($slot:expr) => {
        // SAFETY: the slot `claim!` returned, still valid (a map value).
        unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!((*$slot).busy), 0) }
    };
}

/// Set a busy flag from 0 to 1 atomically; false when it was already set.
///
/// # Safety
/// `flag` points at a u64 in map memory.
#[inline(always)]
unsafe fn take_flag(flag: *mut u64) -> bool {
    #[cfg(target_arch = "bpf")]
    {
        // SAFETY: see the contract; one BPF_CMPXCHG.
        let (_, ok) = unsafe {
            core::intrinsics::atomic_cxchg::<
                u64,
                { core::intrinsics::AtomicOrdering::SeqCst },
                { core::intrinsics::AtomicOrdering::SeqCst },
            >(flag, 0, 1)
        };
        ok
    }
    #[cfg(not(target_arch = "bpf"))]
    {
        // SAFETY: see the contract (host builds never run it).
        unsafe {
            if *flag != 0 {
                return false;
            }
            *flag = 1;
        }
        true
    }
}
use release;

/// The member a decision is about.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Subject {
    /// Member cgroup id (the counters' key).
    pub cgroup: u64,
    /// Live segment id (generation bit included).
    pub segment_id: u32,
    pub audit: bool,
    pub quarantined: bool,
    /// The daemon's heartbeat is stale and the segment asked to be cut off then.
    pub deadman: bool,
    /// The member's own packet programs are attached.
    pub attached: bool,
    /// The member's DNS slot (0: none, its DNS is refused).
    pub dns_slot: u32,
    /// One allow in this many becomes an event (0: none).
    pub sample_allows: u32,
}

/// A refusal decided before any segment applies (pending or failed member).
#[derive(Clone, Copy)]
pub struct Refusal {
    /// The cgroup the refusal is about: the unregistered child, or the failed member.
    pub cgroup: u64,
    /// `RULE_PENDING`, `RULE_FAILED_MEMBER`, or `RULE_DEFAULT_DENY` for the counted-only cases
    /// (no member, no segment).
    pub rule: u32,
}

pub enum Resolved {
    /// Not (or no longer) in a segment: untouched.
    Untouched,
    /// Fail closed.
    Deny(Refusal),
    Subject(Subject),
}

/// What a path without any member means to the caller.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NoMember {
    /// A program attached to a member cgroup: the socket is a member's, so the path must have
    /// one (fail closed).
    Deny,
    /// A program at the enforcement root: most paths are not members'.
    Untouched,
}

/// Resolve the deepest member on a cgroup path. `ancestor(level)` returns the path's cgroup
/// id at `level` or 0 past its end. Plain values, not `Option`, in the walk: LLVM leaves an
/// `Option` payload uninitialised and the verifier rejects the read.
#[inline(always)]
pub fn resolve(own: u64, ancestor: impl Fn(i32) -> u64, none: NoMember) -> Resolved {
    // (own: the cgroup the hook is about, or 0.)
    let mut found_id: u64 = 0;
    // Only the fields a decision needs are copied (the agent id stays in the map): the packet
    // hooks' frames are close to the 512-byte limit.
    let (mut seg0, mut seg1, mut member_flags, mut dns_slot) = (0u32, 0u32, 0u32, 0u32);
    // An agent almost always runs in its own member cgroup, the deepest possible match: one
    // lookup instead of one per level.
    // SAFETY: read at once; MEMBERS values are plain integers.
    if own != 0
        && let Some(m) = unsafe { MEMBERS.get(own) }
        && m.kind != MEMBER_OUTSIDER
    {
        found_id = own;
        (seg0, seg1, member_flags, dns_slot) =
            (m.segment_ids[0], m.segment_ids[1], m.flags, m.dns_slot);
    }
    let mut level: i32 = if found_id != 0 {
        MAX_CGROUP_DEPTH as i32
    } else {
        1
    };
    // The previous level was a guard: this level's cgroup must be registered.
    let mut guarded = false;
    let mut pending: u64 = 0;
    while level < MAX_CGROUP_DEPTH as i32 {
        let id = ancestor(level);
        if id == 0 {
            break;
        }
        // SAFETY: read at once; MEMBERS values are plain integers.
        match unsafe { MEMBERS.get(id) } {
            Some(m) => {
                if m.kind != MEMBER_OUTSIDER {
                    found_id = id;
                    (seg0, seg1, member_flags, dns_slot) =
                        (m.segment_ids[0], m.segment_ids[1], m.flags, m.dns_slot);
                }
                guarded = m.flags & MEMBER_GUARD != 0;
            }
            None => {
                if guarded {
                    pending = id;
                    break;
                }
            }
        }
        level += 1;
    }
    if pending != 0 {
        stat(STAT_PENDING);
        return Resolved::Deny(Refusal {
            cgroup: pending,
            rule: RULE_PENDING,
        });
    }
    if found_id == 0 {
        if none == NoMember::Untouched {
            return Resolved::Untouched;
        }
        stat(STAT_NO_MEMBER);
        return Resolved::Deny(Refusal {
            cgroup: 0,
            rule: RULE_DEFAULT_DENY,
        });
    }
    if member_flags & MEMBER_FAILED != 0 {
        stat(STAT_FAILED_MEMBER);
        return Resolved::Deny(Refusal {
            cgroup: found_id,
            rule: RULE_FAILED_MEMBER,
        });
    }
    let (generation, deadman_secs, heartbeat_ns, sample_allows) = match CONFIG.get(0) {
        Some(c) => (
            c.active_gen & 1,
            c.deadman_secs,
            c.heartbeat_ns,
            c.sample_allows,
        ),
        None => (0, 0, 0, 0),
    };
    let segment_id = if generation == 0 { seg0 } else { seg1 };
    if segment_id == SEGMENT_RELEASED {
        return Resolved::Untouched;
    }
    // Only mode and flags are read (the name, most of the record, stays in the map). Id 0 is
    // never written: denied here too.
    // SAFETY: read at once; plain integers.
    let Some((mode, seg_flags)) = (unsafe { SEGMENTS.get(segment_id) }).map(|s| (s.mode, s.flags))
    else {
        stat(STAT_NO_SEGMENT);
        return Resolved::Deny(Refusal {
            cgroup: found_id,
            rule: RULE_DEFAULT_DENY,
        });
    };
    let mut deadman = false;
    if seg_flags & SEG_DEADMAN_QUARANTINE != 0 && deadman_secs != 0 {
        // SAFETY: plain helper call.
        let now = unsafe { bpf_ktime_get_boot_ns() };
        if now.saturating_sub(heartbeat_ns) > u64::from(deadman_secs) * 1_000_000_000 {
            stat(STAT_DEADMAN);
            deadman = true;
        }
    }
    Resolved::Subject(Subject {
        cgroup: found_id,
        segment_id,
        audit: mode == MODE_AUDIT,
        quarantined: member_flags & MEMBER_QUARANTINED != 0 || seg_flags & SEG_QUARANTINED != 0,
        deadman,
        attached: member_flags & MEMBER_ATTACHED != 0,
        dns_slot,
        sample_allows,
    })
}

/// Which table of the segment to consult.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Egress,
    Ingress,
    QuarantineAllow,
}

/// The table an egress decision of `s` reads: its rules, or its quarantine allow list.
#[inline(always)]
pub fn egress_table(s: &Subject) -> Table {
    if s.quarantined || s.deadman {
        Table::QuarantineAllow
    } else {
        Table::Egress
    }
}

/// The table id an LPM key of `table` starts with.
#[inline(always)]
pub fn table_id(s: &Subject, table: Table) -> u32 {
    match table {
        Table::Egress => s.segment_id,
        Table::Ingress => s.segment_id | INGRESS_BIT,
        Table::QuarantineAllow => s.segment_id | QUARANTINE_BIT,
    }
}

/// The rule of `table` of the subject's segment that allows (peer, IP protocol number, port),
/// or [`RULE_DEFAULT_DENY`] (quarantine: [`RULE_QUARANTINE`]; dead-man: [`RULE_DEADMAN`]).
#[inline(always)]
pub fn allows(s: &Subject, table: Table, peer: &Peer, protocol: u32, port: u16) -> u32 {
    if s.deadman {
        return RULE_DEADMAN;
    }
    let mut flags = 0;
    if peer.v6 {
        flags |= LOOKUP_V6;
    }
    match table {
        Table::Egress => flags |= LOOKUP_LEARNED,
        Table::QuarantineAllow => flags |= LOOKUP_QUARANTINE,
        Table::Ingress => {}
    }
    // By a pointer to the caller's stack, never a per-CPU scratch slot: a packet hook in
    // softirq can interrupt a hook on the same CPU between the write and the read, and a
    // verdict must never be computed on someone else's peer.
    // SAFETY: `peer` lives for the call.
    unsafe { agentseg_lookup(table_id(s, table), flags, peer, protocol, u32::from(port)) }
}

const LOOKUP_V6: u32 = 1;
/// Egress: consult the addresses the segment learned from DNS after a miss.
const LOOKUP_LEARNED: u32 = 2;
/// A miss is [`RULE_QUARANTINE`] rather than [`RULE_DEFAULT_DENY`].
const LOOKUP_QUARANTINE: u32 = 4;

/// The policy lookup proper: LPM trie, ruleset scan, learned addresses. A *global* function
/// (exported to the linker by `agentseg-ebpf/build.rs`): the verifier checks it once per
/// program instead of once per path that reaches it, which kept the packet hooks under the
/// verifier's million-instruction budget and cut their load time.
///
/// # Safety
/// `peer` is null or points at a Peer.
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn agentseg_lookup(
    table_seg: u32,
    flags: u32,
    peer: *const Peer,
    protocol: u32,
    port: u32,
) -> u32 {
    // The verifier checks a global function for any caller: the pointer may be null.
    // SAFETY: see the contract.
    let Some(peer) = (unsafe { peer.as_ref() }) else {
        return RULE_DEFAULT_DENY;
    };
    let port = port as u16;
    let none = if flags & LOOKUP_QUARANTINE != 0 {
        RULE_QUARANTINE
    } else {
        RULE_DEFAULT_DENY
    };
    let seg_be = table_seg.to_be_bytes();
    let a = peer.addr;
    let found = if flags & LOOKUP_V6 != 0 {
        POLICY_V6.get(Key::new(
            160,
            PolicyKeyV6 {
                segment_id_be: seg_be,
                addr_be: a,
            },
        ))
    } else {
        let addr_be = [a[0], a[1], a[2], a[3]];
        POLICY_V4.get(Key::new(
            64,
            PolicyKeyV4 {
                segment_id_be: seg_be,
                addr_be,
            },
        ))
    };
    let rule = match found {
        Some(value) => match RULESETS.get(value.ruleset_id) {
            Some(rs) => ruleset_allows(rs, protocol, port),
            None => {
                stat(STAT_NO_RULESET);
                RULE_DEFAULT_DENY
            }
        },
        None => RULE_DEFAULT_DENY,
    };
    if rule != RULE_DEFAULT_DENY {
        return rule;
    }
    if flags & LOOKUP_LEARNED != 0 {
        let rule = learned(table_seg, flags & LOOKUP_V6 != 0, &a, protocol, port);
        if rule != RULE_DEFAULT_DENY {
            return rule;
        }
    }
    none
}

/// The fqdns rule that allows (peer, protocol, port) through an address the segment learned
/// from an allowed DNS answer and that has not expired, or [`RULE_DEFAULT_DENY`].
#[inline(always)]
fn learned(segment_id: u32, v6: bool, addr: &[u8; 16], protocol: u32, port: u16) -> u32 {
    let key = LearnedKey {
        segment_id,
        family: if v6 { 6 } else { 4 },
        addr: *addr,
    };
    // SAFETY: read in place; LearnedValue is plain integers (a concurrent update by the daemon
    // can at worst pair one slot's rule with another's expiry, both of this segment).
    let Some(v) = (unsafe { LEARNED.get(key) }) else {
        return RULE_DEFAULT_DENY;
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let mut i = 0;
    while i < LEARNED_SLOTS {
        let slot = &v.slots[i];
        if slot.expires_ns > now && rule_allows(&slot.rule, protocol, port) {
            return slot.rule.rule_id;
        }
        i += 1;
    }
    RULE_DEFAULT_DENY
}

/// Whether a value returned by [`allows`] is a rule (an allow) rather than a sentinel.
#[inline(always)]
pub fn is_rule(rule: u32) -> bool {
    rule < RULE_FIRST_SENTINEL
}

/// Whether an audit-mode segment lets this refusal through (counted as a would-be denial).
/// Quarantine, the dead-man switch, pending and failed members, the control socket: never.
#[inline(always)]
fn auditable(rule: u32) -> bool {
    rule == RULE_DEFAULT_DENY || rule == RULE_IP_OPTIONS || rule == RULE_MALFORMED
}

/// What a decision was about, for its event.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Flow {
    pub hook: u8,
    /// Whether the hook runs in the task's context (pid and comm mean something).
    pub task: bool,
    pub family: u8,
    pub protocol: u8,
    pub sport: u16,
    pub dport: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// Report a decision. A denial (or would-be denial) is aggregated per flow: the first of a
/// flow writes a record at once, later ones only count, and a summary record carries the
/// count at most once per [`DENY_SUMMARY_NS`]. Every record spends the member's budget on this
/// CPU, so one member's flood cannot fill the ring for the others. A record not written (no
/// budget, ring full) is counted for the member, never the verdict.
///
/// Hooks reach it through [`agentseg_finish`] and [`agentseg_refuse`], *global* functions:
/// the verifier checks each once, on its own, instead of once per path that reaches it
/// (inlined, it pushed `agentseg_skb_egress` past the verifier's million instructions and the
/// 512-byte stack). Their arguments travel in a per-CPU scratch slot, not on the stack.
#[inline(always)]
fn emit_inline(cgroup: u64, segment_id: u32, verdict: u8, rule: u32, flow: &Flow, task: bool) {
    // Everything about the record goes into a per-CPU scratch slot first (see EmitScratch).
    let Some(slot) = claim!(SCRATCH_EMIT) else {
        // Both slots in use on this CPU (nested hooks): the report is dropped, and counted.
        count_existing(cgroup, |c| bump(&mut c.records_dropped, 1));
        return;
    };
    // SAFETY: this CPU's free slot, held until `release!`.
    emit_in(
        unsafe { &mut *slot },
        cgroup,
        segment_id,
        verdict,
        rule,
        flow,
        task,
    );
    release!(slot);
}

#[inline(always)]
fn emit_in(
    sc: &mut EmitScratch,
    cgroup: u64,
    segment_id: u32,
    verdict: u8,
    rule: u32,
    flow: &Flow,
    task: bool,
) {
    let key = &mut sc.key;
    key.cgroup_id = cgroup;
    key.pid = if task {
        (bpf_get_current_pid_tgid() >> 32) as u32
    } else {
        0
    };
    key.segment_id = segment_id;
    key.rule_id = rule;
    key.hook = flow.hook;
    key.verdict = verdict;
    key.family = flow.family;
    key.protocol = flow.protocol;
    key.sport = flow.sport;
    key.dport = flow.dport;
    key.saddr = flow.saddr;
    key.daddr = flow.daddr;
    key._pad = 0;
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if verdict == VERDICT_ALLOW {
        if record_budget(cgroup, now) {
            write_event(&sc.key, task, now, 0, 0, 1);
        }
        return;
    }
    // The flow's entry, or a new one built in the scratch slot. A per-CPU entry another CPU
    // made reads as zeros here: a flow new on this CPU, started in place.
    #[allow(clippy::needless_borrows_for_generic_args)] // a copy would land on the stack
    let (f, new) = match DENY_FLOWS.get_ptr_mut(&sc.key) {
        // SAFETY: per-CPU value, only this CPU writes it (the daemon only reads).
        Some(p) => (unsafe { &mut *p }, false),
        None => (&mut sc.flow, true),
    };
    let fresh = new || f.first_ns == 0;
    if fresh {
        f.count = 0;
        f.reported = 0;
        f.first_ns = now;
        f.emit_ns = 0;
    }
    f.count += 1;
    // A new flow writes its record now; a known one at most once per interval.
    if (fresh || now.wrapping_sub(f.emit_ns) >= DENY_SUMMARY_NS)
        && record_budget(cgroup, now)
        && write_event(&sc.key, task, now, f.first_ns, f.reported, f.count)
    {
        f.reported = f.count;
        f.emit_ns = now;
    } else if fresh || now.wrapping_sub(f.emit_ns) >= DENY_SUMMARY_NS {
        // Due but not written (budget, ring): try again in an interval, not at every denial.
        f.emit_ns = now;
    }
    if new {
        // Without an entry (the insert failed) the record written still stood for this one.
        #[allow(clippy::needless_borrows_for_generic_args)]
        let _ = DENY_FLOWS.insert(&sc.key, &sc.flow, 0);
    }
}

/// Spend one record of the member's budget on this CPU (GCRA: one per
/// [`RECORD_INTERVAL_NS`], bursts of [`RECORD_BURST`]); false (and counted) when spent.
#[inline(always)]
pub fn record_budget(cgroup: u64, now: u64) -> bool {
    let mut ok = true;
    // Only members have counters (their decision made one): a refusal of a cgroup that is no
    // member (a pending child of a guard) must not create entries nobody removes.
    count_existing(cgroup, |c| {
        let tat = if c.budget_tat_ns > now {
            c.budget_tat_ns
        } else {
            now
        };
        if tat - now > (RECORD_BURST - 1) * RECORD_INTERVAL_NS {
            bump(&mut c.records_dropped, 1);
            ok = false;
        } else {
            c.budget_tat_ns = tat + RECORD_INTERVAL_NS;
        }
    });
    ok
}

/// Write one record described by `k`, standing for the flow's denials `from + 1 ..= to` of
/// the entry made at `flow_ns` (0: not aggregated); false when the ring is full (counted).
#[inline(always)]
fn write_event(k: &DenyFlowKey, task: bool, now: u64, flow_ns: u64, from: u64, to: u64) -> bool {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        stat(STAT_EVENTS_LOST);
        count_existing(k.cgroup_id, |c| bump(&mut c.records_dropped, 1));
        return false;
    };
    // Field by field into the ring: an Event built on the stack first would cost 120 bytes.
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points at the reserved record; every field is written before submit.
    unsafe {
        if task {
            (*e).pid_tgid = bpf_get_current_pid_tgid();
            // Straight into the record (the safe wrapper goes through a stack buffer).
            let comm = core::ptr::addr_of_mut!((*e).comm);
            if raw::bpf_get_current_comm(comm.cast(), 16) != 0 {
                (*e).comm = [0; 16];
            }
        } else {
            (*e).pid_tgid = 0;
            (*e).comm = [0; 16];
        }
        (*e).ts_ns = now;
        (*e).cgroup_id = k.cgroup_id;
        (*e).segment_id = k.segment_id;
        (*e).rule_id = k.rule_id;
        (*e).hook = k.hook;
        (*e).verdict = k.verdict;
        (*e).family = k.family;
        (*e).protocol = k.protocol;
        (*e).sport = k.sport;
        (*e).dport = k.dport;
        (*e).saddr = k.saddr;
        (*e).daddr = k.daddr;
        (*e).agg_flow_ns = flow_ns;
        (*e).agg_from = from;
        (*e).agg_to = to;
        (*e).cpu = bpf_get_smp_processor_id();
        (*e)._pad = 0;
    }
    entry.submit(0);
    true
}

/// A refusal decided before any segment applied: reported when it has a reason of its own
/// (pending or failed member), only counted otherwise (in STATS).
#[inline(always)]
pub fn refuse(r: &Refusal, flow: &Flow) -> i32 {
    if r.rule != RULE_DEFAULT_DENY {
        // SAFETY: `flow` lives for the call.
        unsafe { agentseg_refuse(r.cgroup, r.rule, flow) };
    }
    DENY
}

/// [`refuse`]'s report. Global: see [`emit_inline`].
///
/// # Safety
/// `flow` is null or points at a Flow.
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn agentseg_refuse(cgroup: u64, rule: u32, flow: *const Flow) -> i32 {
    // SAFETY: see the contract (the verifier checks a global function for any caller).
    let Some(flow) = (unsafe { flow.as_ref() }) else {
        return DENY;
    };
    emit_inline(cgroup, 0, VERDICT_DENY, rule, flow, flow.task);
    DENY
}

/// [`finish`]'s decision and report. Global: see [`emit_inline`]. Subject and flow come by
/// pointers to the caller's stack, never a per-CPU scratch slot: a hook in softirq can
/// interrupt another on the same CPU, and a verdict must never be taken on someone else's
/// subject.
///
/// # Safety
/// `s` and `flow` are null or point at a Subject and a Flow.
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn agentseg_finish(
    s: *const Subject,
    rule: u32,
    flow: *const Flow,
    count_allow: u32,
) -> i32 {
    // SAFETY: see the contract.
    let (Some(s), Some(flow)) = (unsafe { s.as_ref() }, unsafe { flow.as_ref() }) else {
        return DENY;
    };
    let inbound = flow.hook == HOOK_SKB_INGRESS;
    let (ret, report) = decide(s, rule, count_allow != 0, inbound);
    if let Some((verdict, rule)) = report {
        emit_inline(s.cgroup, s.segment_id, verdict, rule, flow, flow.task);
    }
    ret
}

/// Turn a rule lookup into a verdict: an allow counts its rule (unless `count_allow` is false:
/// the packet hook re-checking what connect or sendmsg already counted); a denial (or a
/// would-be denial of an audit-mode segment) is reported as an event.
#[inline(always)]
pub fn finish(s: &Subject, rule: u32, flow: &Flow, count_allow: bool) -> i32 {
    // SAFETY: `s` and `flow` live for the call.
    unsafe {
        // A global function's result is any scalar to the verifier: the hook's return value
        // must be provably ALLOW or DENY. The volatile read keeps LLVM from folding this test
        // away with what it knows of the function's body.
        let verdict = agentseg_finish(s, rule, flow, u32::from(count_allow));
        if core::ptr::read_volatile(&verdict) == ALLOW {
            ALLOW
        } else {
            DENY
        }
    }
}

/// [`finish`] with the report written by `report(verdict, rule)` (the AF_UNIX hooks send a
/// record with the address).
#[inline(always)]
pub fn finish_with(s: &Subject, rule: u32, count_allow: bool, report: impl Fn(u8, u32)) -> i32 {
    let (ret, r) = decide(s, rule, count_allow, false);
    if let Some((verdict, rule)) = r {
        report(verdict, rule);
    }
    ret
}

/// The verdict, the counters it moves, and the (verdict, rule) to report if any. `inbound`
/// for a packet coming in (counted apart: peers knocking never count as the member's own
/// denials). No closure: an outlined closure became a subprogram the verifier walked once per
/// call site.
#[inline(always)]
fn decide(s: &Subject, rule: u32, count_allow: bool, inbound: bool) -> (i32, Option<(u8, u32)>) {
    if is_rule(rule) {
        let mut report = None;
        if count_allow {
            if let Some(p) = RULE_HITS.get_ptr_mut(rule / RULE_HITS_CHUNK) {
                // SAFETY: per-CPU slot, no concurrent writer on this CPU; the index is below
                // the chunk's length.
                unsafe { (*p)[(rule % RULE_HITS_CHUNK) as usize] += 1 };
            }
            count(s.cgroup, |c| bump(&mut c.allowed, 1));
            // SAFETY: plain helper call.
            if s.sample_allows != 0 && unsafe { bpf_get_prandom_u32() } % s.sample_allows == 0 {
                report = Some((VERDICT_ALLOW, rule));
            }
        }
        (ALLOW, report)
    } else if s.audit && auditable(rule) {
        count(s.cgroup, |c| {
            bump(&mut c.audit_denied, 1);
            bump(&mut c.inbound_denied, inbound as u64);
        });
        (ALLOW, Some((VERDICT_AUDIT, rule)))
    } else {
        count(s.cgroup, |c| {
            bump(&mut c.denied, 1);
            bump(&mut c.inbound_denied, inbound as u64);
        });
        (DENY, Some((VERDICT_DENY, rule)))
    }
}

/// (armed, epoch) from CONFIG: whether a quarantine is in force anywhere, or a dead-man switch
/// has actually fired (the daemon's heartbeat is stale): then nothing is remembered and every
/// packet is judged. A dead-man switch merely configured keeps the fast paths (the clock is
/// read only then). And the epoch remembered verdicts carry.
#[inline(always)]
pub fn flow_config() -> (bool, u32) {
    let Some(c) = CONFIG.get(0) else {
        return (true, 0);
    };
    let mut armed = c.flags & CONFIG_ANY_QUARANTINE != 0;
    if !armed && c.flags & CONFIG_ANY_DEADMAN != 0 {
        // SAFETY: plain helper call.
        let now = unsafe { bpf_ktime_get_boot_ns() };
        armed = now.saturating_sub(c.heartbeat_ns) > u64::from(c.deadman_secs) * 1_000_000_000;
    }
    (armed, c.epoch)
}

/// The resolver's port (0: DNS is not steered).
#[inline(always)]
pub fn dns_port() -> u16 {
    match CONFIG.get(0) {
        Some(c) => c.dns_port,
        None => 0,
    }
}

/// Whether (address, port) is the resolver's, where steered DNS goes: 127.64.0.1 (or its
/// IPv4-mapped form, as a dual-stack socket sees it) on the resolver's port.
#[inline(always)]
pub fn is_resolver(peer: &Peer, port: u16, dns_port: u16) -> bool {
    if dns_port == 0 || port != dns_port {
        return false;
    }
    let a = peer.addr;
    let r = agentseg_common::DNS_RESOLVER_V4;
    if !peer.v6 {
        return a[0] == r[0] && a[1] == r[1] && a[2] == r[2] && a[3] == r[3];
    }
    let zero10 = a[0] | a[1] | a[2] | a[3] | a[4] | a[5] | a[6] | a[7] | a[8] | a[9] == 0;
    zero10
        && a[10] == 0xff
        && a[11] == 0xff
        && a[12] == r[0]
        && a[13] == r[1]
        && a[14] == r[2]
        && a[15] == r[3]
}

/// Remember a verdict for a socket's destination (protocol as on the wire), for the egress
/// packet hook: `judge` is 0 for a member's own hooks, or the task cgroup the handoff hook
/// judged for. A failed insert only means the next packet is judged again.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn remember_flow(
    cookie: u64,
    dst: &Peer,
    dport: u16,
    protocol: u32,
    verdict: u8,
    epoch: u32,
    judge: u64,
    rule: u32,
) {
    if cookie == 0 {
        return;
    }
    let v = FlowVerdict {
        daddr: dst.addr,
        dport,
        protocol: protocol as u8,
        verdict,
        epoch,
        task_cgroup: judge,
        rule,
        _pad: 0,
    };
    let _ = FLOWS.insert(cookie, v, 0);
}
