//! The decision: which segment a task belongs to and whether its segment allows a destination.
//!
//! Precedence, first row that applies wins:
//!
//! | situation                                      | verdict                       |
//! |------------------------------------------------|-------------------------------|
//! | no member on the task's cgroup path            | deny (STAT_NO_MEMBER)         |
//! | member released in the live generation         | allow (in no segment)         |
//! | member's segment missing from SEGMENTS         | deny (STAT_NO_SEGMENT)        |
//! | segment has the dead-man flag, heartbeat stale | deny (STAT_DEADMAN)           |
//! | longest prefix's ruleset has (proto, port)     | allow                         |
//! | no prefix, empty ruleset, or no matching entry | deny, or allow if mode=audit  |
//!
//! A program only runs for sockets of cgroups it is attached to (member cgroups and the agent
//! root), so "no member" means the socket is a member's but the calling task is not: deny.
use agentseg_common::{
    Counters, MAX_CGROUP_DEPTH, MODE_AUDIT, Member, PROTO_ICMP, PROTO_TCP, PROTO_UDP, PolicyKeyV4,
    PolicyKeyV6, RULESET_CAPACITY, SEG_DEADMAN_QUARANTINE, SEGMENT_NONE, STAT_DEADMAN,
    STAT_NO_MEMBER, STAT_NO_RULESET, STAT_NO_SEGMENT,
};
use aya_ebpf::{
    helpers::generated::{bpf_get_current_ancestor_cgroup_id, bpf_ktime_get_boot_ns},
    maps::lpm_trie::Key,
};

use crate::maps::{CONFIG, COUNTERS, MEMBERS, POLICY_V4, POLICY_V6, RULESETS, SEGMENTS, STATS};

/// Return codes of cgroup sock_addr programs.
pub const SOCK_ALLOW: i32 = 1;
pub const SOCK_DENY: i32 = 0;

const IPPROTO_ICMP: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const IPPROTO_ICMPV6: u32 = 58;
const IPPROTO_UDPLITE: u32 = 136;
const IPPROTO_MPTCP: u32 = 262;

/// Protocol bit for a socket's protocol; 0 (matches no rule) for anything else.
#[inline(always)]
pub fn proto_bit(protocol: u32) -> u8 {
    match protocol {
        IPPROTO_TCP | IPPROTO_MPTCP => PROTO_TCP,
        IPPROTO_UDP | IPPROTO_UDPLITE => PROTO_UDP,
        IPPROTO_ICMP | IPPROTO_ICMPV6 => PROTO_ICMP,
        _ => 0,
    }
}

/// A destination as the hooks see it.
pub enum Dest {
    V4([u8; 4]),
    V6([u8; 16]),
}

#[inline(always)]
fn stat(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// Deepest member entry on the current task's cgroup path: (cgroup id, member), with cgroup id
/// 0 when there is none. Plain values, not `Option`: LLVM leaves an `Option` payload
/// uninitialised and the verifier rejects the read ("R8 !read_ok").
#[inline(always)]
fn find_member() -> (u64, Member) {
    let mut found_id: u64 = 0;
    let mut found = Member {
        segment_ids: [0; 2],
        kind: 0,
        _pad: 0,
        agent_id: [0; 16],
    };
    let mut level: i32 = 1;
    while level < MAX_CGROUP_DEPTH as i32 {
        // SAFETY: plain helper call; returns 0 past the task's own level.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            break;
        }
        // SAFETY: the value is copied out at once; MEMBERS values are plain integers.
        if let Some(m) = unsafe { MEMBERS.get(id) } {
            found_id = id;
            found = *m;
        }
        level += 1;
    }
    (found_id, found)
}

#[inline(always)]
fn count(cgroup: u64, f: impl Fn(&mut Counters)) {
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

#[inline(always)]
fn ruleset_allows(ruleset_id: u32, proto: u8, port: u16) -> Option<bool> {
    let rs = RULESETS.get(ruleset_id)?;
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
            return Some(true);
        }
        i += 1;
    }
    Some(false)
}

/// Judge one connect or send. `port` is in host byte order.
#[inline(always)]
pub fn judge(dest: Dest, protocol: u32, port: u16) -> i32 {
    let (cgroup, member) = find_member();
    if cgroup == 0 {
        stat(STAT_NO_MEMBER);
        return SOCK_DENY;
    }
    let (generation, deadman_secs, heartbeat_ns) = match CONFIG.get(0) {
        Some(c) => (c.active_gen & 1, c.deadman_secs, c.heartbeat_ns),
        None => (0, 0, 0),
    };
    let segment_id = if generation == 0 {
        member.segment_ids[0]
    } else {
        member.segment_ids[1]
    };
    if segment_id == SEGMENT_NONE {
        return SOCK_ALLOW;
    }
    // SAFETY: copied out at once; plain integers.
    let Some(seg) = (unsafe { SEGMENTS.get(segment_id) }).copied() else {
        stat(STAT_NO_SEGMENT);
        return SOCK_DENY;
    };
    if seg.flags & SEG_DEADMAN_QUARANTINE != 0 && deadman_secs != 0 {
        // SAFETY: plain helper call.
        let now = unsafe { bpf_ktime_get_boot_ns() };
        if now.saturating_sub(heartbeat_ns) > u64::from(deadman_secs) * 1_000_000_000 {
            stat(STAT_DEADMAN);
            count(cgroup, |c| c.denied += 1);
            return SOCK_DENY;
        }
    }
    let seg_be = segment_id.to_be_bytes();
    let ruleset_id = match dest {
        Dest::V4(addr_be) => POLICY_V4
            .get(Key::new(
                64,
                PolicyKeyV4 {
                    segment_id_be: seg_be,
                    addr_be,
                },
            ))
            .map(|v| v.ruleset_id),
        Dest::V6(addr_be) => POLICY_V6
            .get(Key::new(
                160,
                PolicyKeyV6 {
                    segment_id_be: seg_be,
                    addr_be,
                },
            ))
            .map(|v| v.ruleset_id),
    }
    .unwrap_or(agentseg_common::RULESET_EMPTY);
    let allowed = match ruleset_allows(ruleset_id, proto_bit(protocol), port) {
        Some(a) => a,
        None => {
            stat(STAT_NO_RULESET);
            false
        }
    };
    if allowed {
        count(cgroup, |c| c.allowed += 1);
        SOCK_ALLOW
    } else if seg.mode == MODE_AUDIT {
        count(cgroup, |c| c.audit_denied += 1);
        SOCK_ALLOW
    } else {
        count(cgroup, |c| c.denied += 1);
        SOCK_DENY
    }
}
