//! The decision shared by every hook: who is asking (the deepest member on a cgroup path) and
//! whether its segment allows a peer.
//!
//! Precedence, first row that applies wins:
//!
//! | situation                                          | verdict                       |
//! |----------------------------------------------------|-------------------------------|
//! | no member on the cgroup path                       | deny (STAT_NO_MEMBER)         |
//! | member released in the live generation             | allow (in no segment)         |
//! | member's segment missing from SEGMENTS             | deny (STAT_NO_SEGMENT)        |
//! | segment has the dead-man flag, heartbeat stale     | deny (STAT_DEADMAN)           |
//! | agent or segment quarantined                       | allow only `[quarantine] allow` peers, in any mode |
//! | longest prefix's ruleset has (proto, port)         | allow                         |
//! | no prefix, empty ruleset, or no matching entry     | deny, or allow if mode=audit  |
//!
//! A program only runs for sockets of cgroups it is attached to (member cgroups and the agent
//! root), so "no member" means the socket is a member's but the path walked is not: deny.
use agentseg_common::{
    Counters, Event, INGRESS_BIT, MAX_CGROUP_DEPTH, MEMBER_QUARANTINED, MODE_AUDIT, PROTO_ICMP,
    PROTO_TCP, PROTO_UDP, PolicyKeyV4, PolicyKeyV6, QUARANTINE_BIT, RULE_DEADMAN,
    RULE_DEFAULT_DENY, RULE_QUARANTINE, RULESET_CAPACITY, SEG_DEADMAN_QUARANTINE, SEG_QUARANTINED,
    SEGMENT_NONE, STAT_DEADMAN, STAT_EVENTS_LOST, STAT_NO_MEMBER, STAT_NO_RULESET, STAT_NO_SEGMENT,
    VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{bpf_get_prandom_u32, bpf_ktime_get_boot_ns},
    },
    maps::lpm_trie::Key,
};

use crate::maps::{
    CONFIG, COUNTERS, EVENTS, MEMBERS, POLICY_V4, POLICY_V6, RULE_HITS, RULESETS, SEGMENTS, STATS,
};

/// Return codes of cgroup sock_addr and cgroup_skb programs alike.
pub const ALLOW: i32 = 1;
pub const DENY: i32 = 0;

pub const IPPROTO_ICMP: u32 = 1;
pub const IPPROTO_TCP: u32 = 6;
pub const IPPROTO_UDP: u32 = 17;
pub const IPPROTO_ICMPV6: u32 = 58;
pub const IPPROTO_UDPLITE: u32 = 136;
const IPPROTO_MPTCP: u32 = 262;

/// Protocol bit for a protocol number; 0 (matches no rule) for anything else.
#[inline(always)]
pub fn proto_bit(protocol: u32) -> u8 {
    match protocol {
        IPPROTO_TCP | IPPROTO_MPTCP => PROTO_TCP,
        IPPROTO_UDP | IPPROTO_UDPLITE => PROTO_UDP,
        IPPROTO_ICMP | IPPROTO_ICMPV6 => PROTO_ICMP,
        _ => 0,
    }
}

/// A peer address as the hooks see it (network byte order). A plain struct, always fully
/// initialised: an enum with a 4- and a 16-byte variant leaves bytes the verifier calls
/// uninitialised ("!read_ok") when the value is copied.
#[derive(Clone, Copy)]
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
fn stat(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn count(cgroup: u64, f: impl Fn(&mut Counters)) {
    match COUNTERS.get_ptr_mut(cgroup) {
        // SAFETY: per-CPU value, only this CPU writes it.
        Some(p) => f(unsafe { &mut *p }),
        None => {
            let mut c = Counters::default();
            f(&mut c);
            // A failed insert (map full) loses one count, never the verdict.
            let _ = COUNTERS.insert(cgroup, c, 0);
        }
    }
}

/// The member a decision is about.
#[derive(Clone, Copy)]
pub struct Subject {
    /// Member cgroup id (the counters' key).
    pub cgroup: u64,
    /// Live segment id (generation bit included).
    pub segment_id: u32,
    pub audit: bool,
    pub quarantined: bool,
    /// The daemon's heartbeat is stale and the segment asked to be cut off then.
    pub deadman: bool,
    /// One allow in this many becomes an event (0: none).
    pub sample_allows: u32,
}

pub enum Resolved {
    /// Not (or no longer) in a segment: untouched.
    Untouched,
    /// Fail closed.
    Deny,
    Subject(Subject),
}

/// Resolve the deepest member on a cgroup path. `ancestor(level)` returns the path's cgroup
/// id at `level` or 0 past its end. Plain values, not `Option`, in the walk: LLVM leaves an
/// `Option` payload uninitialised and the verifier rejects the read.
#[inline(always)]
pub fn resolve(own: u64, ancestor: impl Fn(i32) -> u64) -> Resolved {
    // (own: the cgroup the hook runs for, or 0.)
    let mut found_id: u64 = 0;
    // Only the fields a decision needs are copied (the agent id stays in the map): the packet
    // hooks' frames are close to the 512-byte limit.
    let (mut seg0, mut seg1, mut member_flags) = (0u32, 0u32, 0u32);
    // An agent almost always runs in its own member cgroup, the deepest possible match: one
    // lookup instead of one per level. `own == 0` skips it (the packet hooks, whose frames
    // cannot afford the extra copy; their fast path rarely resolves at all).
    // SAFETY: read at once; MEMBERS values are plain integers.
    if own != 0
        && let Some(m) = unsafe { MEMBERS.get(own) }
    {
        found_id = own;
        (seg0, seg1, member_flags) = (m.segment_ids[0], m.segment_ids[1], m.flags);
    }
    let mut level: i32 = if found_id != 0 {
        MAX_CGROUP_DEPTH as i32
    } else {
        1
    };
    while level < MAX_CGROUP_DEPTH as i32 {
        let id = ancestor(level);
        if id == 0 {
            break;
        }
        // SAFETY: read at once; MEMBERS values are plain integers.
        if let Some(m) = unsafe { MEMBERS.get(id) } {
            found_id = id;
            (seg0, seg1, member_flags) = (m.segment_ids[0], m.segment_ids[1], m.flags);
        }
        level += 1;
    }
    if found_id == 0 {
        stat(STAT_NO_MEMBER);
        return Resolved::Deny;
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
    if segment_id == SEGMENT_NONE {
        return Resolved::Untouched;
    }
    // SAFETY: copied out at once; plain integers.
    let Some(seg) = (unsafe { SEGMENTS.get(segment_id) }).copied() else {
        stat(STAT_NO_SEGMENT);
        return Resolved::Deny;
    };
    let mut deadman = false;
    if seg.flags & SEG_DEADMAN_QUARANTINE != 0 && deadman_secs != 0 {
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
        audit: seg.mode == MODE_AUDIT,
        quarantined: member_flags & MEMBER_QUARANTINED != 0 || seg.flags & SEG_QUARANTINED != 0,
        deadman,
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

/// The rule of `table` of the subject's segment that allows (peer, protocol bit, port), or
/// [`RULE_DEFAULT_DENY`] (quarantine: [`RULE_QUARANTINE`]; dead-man: [`RULE_DEADMAN`]).
#[inline(always)]
pub fn allows(s: &Subject, table: Table, peer: Peer, proto: u8, port: u16) -> u32 {
    if s.deadman {
        return RULE_DEADMAN;
    }
    let none = if table == Table::QuarantineAllow {
        RULE_QUARANTINE
    } else {
        RULE_DEFAULT_DENY
    };
    let key_id = match table {
        Table::Egress => s.segment_id,
        Table::Ingress => s.segment_id | INGRESS_BIT,
        Table::QuarantineAllow => s.segment_id | QUARANTINE_BIT,
    };
    let seg_be = key_id.to_be_bytes();
    let a = peer.addr;
    let found = if peer.v6 {
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
    let Some(value) = found else { return none };
    let ruleset_id = value.ruleset_id;
    let Some(rs) = RULESETS.get(ruleset_id) else {
        stat(STAT_NO_RULESET);
        return none;
    };
    let len = if (rs.len as usize) < RULESET_CAPACITY {
        rs.len as usize
    } else {
        RULESET_CAPACITY
    };
    let mut i = 0;
    while i < len {
        let r = &rs.rules[i];
        if r.protocols & proto != 0
            && (proto == PROTO_ICMP || (port >= r.port_lo && port <= r.port_hi))
        {
            return r.rule_id;
        }
        i += 1;
    }
    none
}

/// Whether a value returned by [`allows`] is a rule (an allow) rather than a sentinel.
#[inline(always)]
pub fn is_rule(rule: u32) -> bool {
    rule < RULE_DEADMAN
}

/// What a decision was about, for its event.
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

/// Write one event; a full ring loses the record (counted), never the verdict. Out of line
/// (a BPF-to-BPF call): the 88-byte record gets its own frame, which keeps the packet hooks'
/// frames under the 512-byte limit.
#[inline(always)]
fn emit(s: &Subject, verdict: u8, rule: u32, flow: &Flow) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        stat(STAT_EVENTS_LOST);
        return;
    };
    let (pid_tgid, comm) = if flow.task {
        (
            bpf_get_current_pid_tgid(),
            bpf_get_current_comm().unwrap_or([0; 16]),
        )
    } else {
        (0, [0; 16])
    };
    entry.write(Event {
        // SAFETY: plain helper call.
        ts_ns: unsafe { bpf_ktime_get_boot_ns() },
        cgroup_id: s.cgroup,
        pid_tgid,
        comm,
        segment_id: s.segment_id,
        rule_id: rule,
        hook: flow.hook,
        verdict,
        family: flow.family,
        protocol: flow.protocol,
        sport: flow.sport,
        dport: flow.dport,
        saddr: flow.saddr,
        daddr: flow.daddr,
    });
    entry.submit(0);
}

/// Turn a rule lookup into a verdict: an allow counts its rule; a denial (or a would-be denial
/// of an audit-mode segment) is reported as an event. Quarantine and the dead-man switch deny
/// in every mode.
#[inline(always)]
pub fn finish(s: &Subject, rule: u32, flow: &Flow) -> i32 {
    if is_rule(rule) {
        if let Some(p) = RULE_HITS.get_ptr_mut(rule) {
            // SAFETY: per-CPU slot, no concurrent writer on this CPU.
            unsafe { *p += 1 };
        }
        count(s.cgroup, |c| c.allowed += 1);
        // SAFETY: plain helper call.
        if s.sample_allows != 0 && unsafe { bpf_get_prandom_u32() } % s.sample_allows == 0 {
            emit(s, VERDICT_ALLOW, rule, flow);
        }
        ALLOW
    } else if s.audit && rule == RULE_DEFAULT_DENY {
        count(s.cgroup, |c| c.audit_denied += 1);
        emit(s, VERDICT_AUDIT, rule, flow);
        ALLOW
    } else {
        count(s.cgroup, |c| c.denied += 1);
        emit(s, VERDICT_DENY, rule, flow);
        DENY
    }
}
