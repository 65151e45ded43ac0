//! The pinned layout's version, derived from the shared definitions: the size and offset of
//! every field of every type that lives in a pinned map, the map capacities, and a manual
//! epoch for changes of meaning that keep every size. A daemon only adopts pins of its own
//! layout (`<pin root>/<PIN_LAYOUT>/`), so a struct change can never be adopted by mistake.
use core::mem::{offset_of, size_of};

use crate::{
    Config, Counters, DenyFlow, DenyFlowKey, DnsOrig, Event, FlowVerdict, LearnedKey, LearnedSlot,
    LearnedValue, Member, PolicyKeyV4, PolicyKeyV6, PolicyValue, PortRule, RuleSet, SegmentInfo,
    UnixEvent, UnixKey, UnixValue, capacity,
};

/// Bump when the meaning of a field or constant changes without any size or offset changing.
const EPOCH: u64 = 4;

macro_rules! shape {
    ($($ty:ident { $($field:ident),* }),* $(,)?) => {
        [$(size_of::<$ty>() as u64, $(offset_of!($ty, $field) as u64,)*)*]
    };
}

const SHAPES: &[u64] = &shape![
    Event {
        ts_ns,
        cgroup_id,
        pid_tgid,
        comm,
        segment_id,
        rule_id,
        hook,
        verdict,
        family,
        protocol,
        sport,
        dport,
        saddr,
        daddr,
        agg_flow_ns,
        agg_from,
        agg_to,
        cpu
    },
    UnixEvent {
        event,
        path,
        path_len
    },
    Member {
        segment_ids,
        kind,
        flags,
        agent_id,
        dns_slot
    },
    Config {
        active_gen,
        deadman_secs,
        heartbeat_ns,
        sample_allows,
        flags,
        epoch,
        dns_port
    },
    PolicyKeyV4 {
        segment_id_be,
        addr_be
    },
    PolicyKeyV6 {
        segment_id_be,
        addr_be
    },
    PolicyValue { ruleset_id },
    PortRule {
        port_lo,
        port_hi,
        protocols,
        proto_num,
        rule_id
    },
    RuleSet { len, rules },
    SegmentInfo { mode, flags, name },
    Counters {
        allowed,
        denied,
        audit_denied,
        inbound_denied,
        records_dropped,
        budget_tat_ns
    },
    DenyFlowKey {
        cgroup_id,
        pid,
        segment_id,
        rule_id,
        hook,
        verdict,
        family,
        protocol,
        sport,
        dport,
        saddr,
        daddr
    },
    DenyFlow {
        count,
        reported,
        first_ns,
        emit_ns
    },
    UnixKey { table_be, path },
    UnixValue { rule_id, verdict },
    FlowVerdict {
        daddr,
        dport,
        protocol,
        verdict,
        epoch,
        task_cgroup
    },
    LearnedKey {
        segment_id,
        family,
        addr
    },
    LearnedSlot {
        rule,
        pattern_hash,
        expires_ns
    },
    LearnedValue { slots },
    DnsOrig { addr, port, family },
];

const CAPACITIES: [u64; 14] = [
    capacity::MEMBERS as u64,
    capacity::POLICY_V4 as u64,
    capacity::POLICY_V6 as u64,
    capacity::RULESETS as u64,
    capacity::SEGMENTS as u64,
    capacity::COUNTERS as u64,
    capacity::STATS as u64,
    capacity::CONFIG as u64,
    capacity::RULE_HITS as u64,
    capacity::UNIX as u64,
    capacity::FLOWS as u64,
    capacity::LEARNED as u64,
    capacity::DNS_ORIG as u64,
    capacity::DENY_FLOWS as u64,
];

const fn fnv1a(mut hash: u64, words: &[u64]) -> u64 {
    let mut i = 0;
    while i < words.len() {
        let bytes = words[i].to_le_bytes();
        let mut j = 0;
        while j < 8 {
            hash ^= bytes[j] as u64;
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            j += 1;
        }
        i += 1;
    }
    hash
}

/// The layout hash: changes whenever a pinned type, a capacity or [`EPOCH`] does.
pub const LAYOUT_HASH: u64 = fnv1a(
    fnv1a(fnv1a(0xcbf2_9ce4_8422_2325, &[EPOCH]), SHAPES),
    &CAPACITIES,
);

const fn name() -> [u8; 18] {
    let mut out = *b"l-0000000000000000";
    let mut i = 0;
    while i < 16 {
        let nibble = ((LAYOUT_HASH >> (60 - 4 * i)) & 0xf) as u8;
        out[2 + i] = if nibble < 10 {
            b'0' + nibble
        } else {
            b'a' + nibble - 10
        };
        i += 1;
    }
    out
}

const NAME: [u8; 18] = name();

/// Directory under the pin root holding this layout's maps and links: `l-<hash>`.
pub const PIN_LAYOUT: &str = match core::str::from_utf8(&NAME) {
    Ok(s) => s,
    Err(_) => panic!("layout name is ASCII"),
};

#[cfg(test)]
mod tests {
    #[test]
    fn layout_name_is_stable_hex() {
        assert_eq!(super::PIN_LAYOUT.len(), 18);
        assert!(super::PIN_LAYOUT.starts_with("l-"));
        assert!(
            super::PIN_LAYOUT[2..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit())
        );
        // Any change of a shape changes the hash.
        let mut shapes = super::SHAPES.to_vec();
        shapes[0] += 1;
        assert_ne!(
            super::fnv1a(0xcbf2_9ce4_8422_2325, &shapes),
            super::fnv1a(0xcbf2_9ce4_8422_2325, super::SHAPES)
        );
    }
}
